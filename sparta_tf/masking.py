"""Gradient-masking checks: pure functions on a robustness report.

After Carlini et al., "On Evaluating Adversarial Robustness" (arXiv:1902.06705, 2019).
Each check reads the numbers of a report (`evaluation.robustness_report`) and returns
`{"name", "passed", "detail"}`; none runs a model. Noise is allowed up to `slack`, the
larger of the report's tolerance (`TOLERANCE` by default) and one example.

- `eps_monotone`: accuracy under PGD does not rise with eps.
- `steps_monotone_{loss}`: PGD with more steps is not less successful than with fewer.
- `large_eps`: accuracy at a huge eps (0.5: any image can be turned into uniform grey) is ~0.
- `black_box_weaker`: Square (black-box) does not beat the best white-box PGD; if it does,
  the gradients mislead PGD: the classic sign of masking. sparta-compare's cells run it on
  the images that Square attacked (`black_box_weaker_on_subset`).
- `restarts`: PGD with several random restarts is not less successful than with one. The
  runs share a seed, so for a deterministic model restart 0 is the 1-restart run, and
  only a model that is random at inference (or a broken attack) can fail.

A report here is a dict with `eps`, `examples`, `accuracy` (name -> accuracy at eps:
`pgd{steps}_{loss}` for each PGD run with `restarts` restarts, and `square`), `eps_sweep`
([eps, accuracy] of PGD-steps[0] with losses[0] and one restart, sorted by eps, including
eps and `large_eps`) and `settings` (`steps`, `losses`, `restarts`, `tolerance`,
`large_eps`).
"""


TOLERANCE = 0.01  # the noise a check allows by default, as a fraction of the examples


def _check(name, passed, detail):
    return {"name": name, "passed": bool(passed), "detail": detail}


def allowed_noise(tolerance, examples):
    """The noise a check allows: `tolerance`, or one example of `examples` if that is more."""
    return max(tolerance, 1 / examples)


def slack(report):
    """The noise each check of `report` allows (`allowed_noise`)."""
    return allowed_noise(report["settings"]["tolerance"], report["examples"])


def eps_monotone(report):
    sweep, s = report["eps_sweep"], slack(report)
    rises = [(a, b) for a, b in zip(sweep, sweep[1:]) if b[1] > a[1] + s]
    return _check("eps_monotone", not rises, "; ".join(
        f"{a[1]:.1%} at eps {a[0]:.4g} -> {b[1]:.1%} at {b[0]:.4g}" for a, b in rises)
        or "accuracy does not rise with eps")


def steps_monotone(report, loss):
    steps, acc = report["settings"]["steps"], report["accuracy"]
    few, many = acc[f"pgd{steps[0]}_{loss}"], acc[f"pgd{steps[-1]}_{loss}"]
    return _check(f"steps_monotone_{loss}", many <= few + slack(report),
                  f"PGD-{steps[-1]} {loss.upper()} {many:.1%} vs PGD-{steps[0]} {few:.1%}")


def _at(report, eps):
    """The sweep's accuracy at `eps`."""
    return next(a for e, a in report["eps_sweep"] if abs(e - eps) < 1e-12)


def large_eps(report):
    s = report["settings"]
    acc = _at(report, s["large_eps"])
    return _check("large_eps", acc <= slack(report),
                  f"PGD-{s['steps'][0]} at eps {s['large_eps']:.4g}: {acc:.1%} (should be ~0%)")


def square_against(square, white_box, noise):
    """`black_box_weaker` on numbers: Square's accuracy `square` against the best (lowest)
    of `white_box` ({attack: accuracy} on the same images), allowing `noise`."""
    best = min(white_box, key=white_box.get)
    return _check("black_box_weaker", square >= white_box[best] - noise,
                  f"Square {square:.1%} vs the best white-box, {best}, {white_box[best]:.1%}")


def black_box_weaker(report):
    acc = report["accuracy"]
    return square_against(acc["square"], {k: v for k, v in acc.items() if k.startswith("pgd")},
                          slack(report))


def white_box(square_check):
    """The white-box accuracies of a grid cell's `square_check` ({"examples", "square",
    "pgd" and, where the cell kept it, "autoattack"}: accuracies on Square's images)."""
    return {k: v for k, v in square_check.items() if k in ("pgd", "autoattack")}


def black_box_weaker_on_subset(square_check, tolerance=TOLERANCE):
    """`black_box_weaker` of a grid cell, on the class-balanced subset that Square ran on
    (`experiments.cells.evaluate`): Square against the better of PGD and AutoAttack's
    white-box chain there."""
    return square_against(square_check["square"], white_box(square_check),
                          allowed_noise(tolerance, square_check["examples"]))


def restarts(report):
    s = report["settings"]
    first = f"pgd{s['steps'][0]}_{s['losses'][0]}"
    many, one = report["accuracy"][first], _at(report, report["eps"])
    return _check("restarts", many <= one + slack(report),
                  f"PGD-{s['steps'][0]} {s['losses'][0].upper()}: {s['restarts']} restarts "
                  f"{many:.1%}, 1 restart {one:.1%}")


def checks(report):
    """Every check, in order, on `report`."""
    return [eps_monotone(report),
            *[steps_monotone(report, loss) for loss in report["settings"]["losses"]],
            large_eps(report), black_box_weaker(report), restarts(report)]
