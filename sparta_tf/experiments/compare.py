"""The comparison of activations: one training run per objective, arm and seed.

An arm is a network variant (`arm_overrides`): an activation name (`relu`,
`sparta`, ...), `{activation}_{denoise}` for a network with feature-denoising
blocks (`relu_nonlocal`, `relu_mean`), or `sparta_transfer`, Sparta copied
from `base.sparta_from` and frozen (`sparta_tf.transfer`).

`run_grid(base, activations, seeds)` trains every cell of the grid (the
`activations` are arms) with `training.run` into
`root/{objective}/{arm}/seed{seed}` (a `TrainConfig` that differs from `base`
only there), evaluates it on the same test images
(clean, PGD and optionally AutoAttack accuracy, and a robust accuracy against
eps curve), and writes `comparison.json`, `comparison.md` (`table`) and, with
`make_plots=True`, the pictures of `sparta_tf.plots` into `root`.
`report_only=True` trains nothing and reports the finished cells.
`ablation_table` puts several comparisons of Sparta variants side by side.

Every cell resumes: `training.run` continues a killed run from its checkpoints,
and a cell's evaluation is kept in its model_dir (`compare_eval.json`), so a
rerun of the same grid skips finished cells without loading their models. The
grid runs seed by seed, so the first seed's table of every activation is done
first.

This module imports no absl.
"""

import dataclasses
import json
import logging
import os

import numpy as np
import tensorflow as tf

from sparta_tf import activations as activations_lib
from sparta_tf import attacks, autoattack, data, evaluation, model_dir, models, plots, training

EVAL_FILE = "compare_eval.json"
REPORT = "comparison"  # the reports' default name: comparison.json, comparison.md
METRICS = ("clean", "pgd", "autoattack")
PLOT_EXAMPLES = 256  # test images for the activation-change plot


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """How every cell is evaluated.

    Args:
        eps: the L-inf budget of PGD and AutoAttack, in pixels.
        pgd_steps: the steps of the PGD (step size 2.5 * eps / steps, one
            random start).
        autoattack: also run `autoattack.robust_accuracy`: `autoattack_attacks`,
            then Square.
        autoattack_iterations, square_queries: its sizes (100 and 5000 are
            standard AutoAttack's).
        square_examples: None: Square is the last attack of AutoAttack's chain,
            on every test image. A number N: AutoAttack is `autoattack_attacks`
            (the worst case per image) on every test image, and Square (black
            box, the costly one on a CPU) runs alone on a class-balanced N of
            them, for the masking check: it must not beat the white-box attacks
            (PGD, AutoAttack's chain) there.
        autoattack_attacks: the white-box attacks of AutoAttack, in order, out
            of `autoattack.KNOWN` but Square: APGD-CE and APGD-T as standard
            AutoAttack (APGD-T runs once per target class, 9 of them), or
            APGD-DLR (`apgd-dlr`, one untargeted run) in APGD-T's place.
        eps_curve: the budgets of the robust accuracy against eps curve (PGD
            with `pgd_steps` steps at each); empty for none.
        batch_size: examples per batch.
        seed: the seed of the class-balanced test sample and of PGD's noise.
    """

    eps: float = 8 / 255
    pgd_steps: int = 20
    autoattack: bool = True
    autoattack_iterations: int = 100
    square_queries: int = 5000
    eps_curve: tuple = ()
    batch_size: int = 256
    seed: int = 0
    square_examples: int | None = None
    autoattack_attacks: tuple = ("apgd-ce", "apgd-t")


def _pgd(eps, settings):
    """PGD at `eps` seeded by `settings.seed`: a callable `attack(model, x, y) -> x_adv`."""
    return evaluation.seeded(attacks.PGD(eps, settings.pgd_steps), settings.seed)


def evaluate(model, x, y, settings, verbose=False):
    """Accuracies of `model` on (x, y): clean, PGD, AutoAttack (or None), eps curve, and
    `per_image`: which test images each of clean, PGD and AutoAttack got right (`pack`), for
    the paired comparisons."""
    def correct(attack=None, label=None):
        return evaluation.correct(model, x, y, attack, settings.batch_size,
                                  label if verbose else None)

    hits = {"clean": correct(label="clean"),
            "pgd": correct(_pgd(settings.eps, settings), f"PGD-{settings.pgd_steps}"),
            "autoattack": None}
    def robust(x, y, chain):
        return autoattack.robust_accuracy(
            model, x, y, settings.eps, settings.batch_size, chain,
            iterations=settings.autoattack_iterations, queries=settings.square_queries,
            verbose=verbose, seed=settings.seed)

    square = after = None
    if settings.autoattack:
        chain = tuple(settings.autoattack_attacks)
        if settings.square_examples is None:
            chain += ("square",)
        aa = robust(x, y, chain)
        hits["autoattack"], after = aa["robust"], aa["after"]
        if settings.square_examples is not None:
            subset = data.balanced_subset(y, settings.square_examples, settings.seed)
            square = {"examples": len(subset),
                      "square": float(robust(x[subset], y[subset], ("square",))["accuracy"]),
                      "pgd": float(hits["pgd"][subset].mean()),
                      "autoattack": float(hits["autoattack"][subset].mean())}
    results = {m: None if h is None else float(h.mean()) for m, h in hits.items()}
    if after is not None:  # the accuracy after each attack of the chain and those before it
        results["autoattack_after"] = after
    if square is not None:
        results["square_check"] = square
    results["eps_curve"] = [[eps, float(correct(_pgd(eps, settings),
                                                f"PGD at eps {eps:.4g}").mean())]
                            for eps in settings.eps_curve]
    results["per_image"] = {m: None if h is None else pack(h) for m, h in hits.items()}
    return results


def pack(hits):
    """A bool array as a short string: its length and its bits in hex (`unpack` reverses)."""
    return f"{len(hits)}:{np.packbits(np.asarray(hits, bool)).tobytes().hex()}"


def unpack(text):
    """The bool array of `pack`."""
    length, bits = text.split(":")
    return np.unpackbits(np.frombuffer(bytes.fromhex(bits), np.uint8))[:int(length)].astype(bool)


TRANSFER_ARM = "sparta_transfer"
EXTRA_ARMS = (TRANSFER_ARM,) + tuple(
    f"{a}_{d}" for a in activations_lib.NAMES for d in models.DENOISE if d != "none")


def arm_overrides(arm, base):
    """The `TrainConfig` fields that arm `arm` sets (see the module docstring).

    Raises:
        ValueError: an unknown arm, or `sparta_transfer` without `base.sparta_from`.
    """
    fields = {"activation": arm, "denoise": "none", "sparta_from": None,
              "sparta_from_sha256": None}
    if arm == TRANSFER_ARM:
        if not base.sparta_from:
            raise ValueError(f"Arm {arm!r} needs a trained Sparta to copy: set sparta_from.")
        return {**fields, "activation": "sparta", "sparta_from": base.sparta_from,
                "sparta_from_sha256": base.sparta_from_sha256}
    activation, _, denoise = arm.rpartition("_")
    if denoise in models.DENOISE and denoise != "none" and activation in activations_lib.NAMES:
        return {**fields, "activation": activation, "denoise": denoise}
    if arm not in activations_lib.NAMES:
        raise ValueError(f"Unknown arm {arm!r}: an activation out of "
                         f"{', '.join(activations_lib.NAMES)}, or one of {', '.join(EXTRA_ARMS)}.")
    return fields


def cell_config(base, root, objective, arm, seed):
    """The `TrainConfig` of one cell: `base` with its model_dir, arm, seed, objective.

    Activations other than sparta get `sparta_sharing="layer"` (the only kind
    `models.build` allows them).
    """
    fields = arm_overrides(arm, base)
    sharing = base.sparta_sharing if fields["activation"] == "sparta" else "layer"
    # eval_pgd_steps=0: training.run evaluates clean accuracy only; `evaluate` does the rest.
    return dataclasses.replace(
        base, model_dir=os.path.join(root, objective, arm, f"seed{seed}"), seed=seed,
        objective=objective, sparta_sharing=sharing, eval_pgd_steps=0, **fields)


def _key(config, settings):
    """What a cell's stored evaluation must match to be reused (JSON-normalised): the
    training run's identity (`TrainConfig.identity`, as for resuming), how long it trained,
    and the test images and settings of the evaluation."""
    train = {**config.identity(), "epochs": config.epochs, "max_test": config.max_test}
    return json.loads(json.dumps({"config": train, "settings": dataclasses.asdict(settings)}))


# The settings that only AutoAttack uses: an evaluation with AutoAttack also serves one
# without it (its other numbers are the same), so the grid's cells can gain AutoAttack
# one by one while the tables without it still read them.
AUTOATTACK_SETTINGS = ("autoattack", "autoattack_iterations", "square_queries",
                       "square_examples", "autoattack_attacks")


def _without_autoattack(results):
    """`results` of `evaluate` as an evaluation without AutoAttack would have them."""
    results = {k: v for k, v in results.items() if k not in ("square_check", "autoattack_after")}
    per_image = results.get("per_image")
    return {**results, "autoattack": None,
            **({"per_image": {**per_image, "autoattack": None}} if per_image else {})}


def stored_results(config, settings):
    """The cell's evaluation kept in model_dir/compare_eval.json, or None.

    None also where the stored one belongs to another config or settings, except
    that one with AutoAttack serves `settings` without it (its AutoAttack left out).
    """
    for stored in _evaluations(config.model_dir):
        results = _match(stored, config, settings)
        if results is not None:
            return results
    return None


def _evaluations(folder):
    """The evaluations kept in folder/compare_eval.json, latest first: the file's own and
    its `earlier` ones (of the same model, with other settings)."""
    path = os.path.join(folder, EVAL_FILE)
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        latest = json.load(f)
    return [latest] + latest.pop("earlier", [])


def _match(stored, config, settings):
    """`stored["results"]` if that evaluation serves (config, settings), else None."""
    key = _key(config, settings)
    # Read as a config: a field added since the cell was stored takes its default.
    stored["config"] = _key(training.TrainConfig.from_stored(stored.get("config", {})),
                            settings)["config"]
    # Settings added since the cell was stored had their defaults then.
    stored["settings"] = json.loads(json.dumps(
        {**dataclasses.asdict(EvalSettings()), **stored.get("settings", {})}))
    if {k: stored.get(k) for k in key} == key:
        return stored["results"]
    if settings.autoattack or not stored["settings"]["autoattack"]:
        return None
    stored["settings"].update({k: key["settings"][k] for k in AUTOATTACK_SETTINGS})
    return _without_autoattack(stored["results"]) if {k: stored.get(k) for k in key} == key \
        else None


def run_cell(config, x, y, settings, overwrite=False, verbose="auto"):
    """Trains (or resumes) one cell and evaluates it, unless its evaluation is stored.

    A cell trained to the end (its model.keras there, `training.finished`) whose evaluation
    is missing or of other settings (AutoAttack added, say) is evaluated, not retrained.

    Returns the evaluation (see `evaluate`), also kept in model_dir/compare_eval.json
    with the config and settings it belongs to. The model's earlier evaluations (other
    settings) stay there, under `earlier`, and still serve; a retrained cell drops them.
    """
    stored = None if overwrite else stored_results(config, settings)
    if stored is not None:
        return stored
    earlier = []  # the evaluations of this model with other settings, kept beside the new one
    if overwrite or not training.finished(config):
        training.run(config, overwrite=overwrite, verbose=verbose)  # a new model: none
    else:
        earlier = _evaluations(config.model_dir)
    model = evaluation.load_model(config.model_dir)
    results = evaluate(model, x, y, settings, verbose=verbose != 0)
    model_dir.write_json(os.path.join(config.model_dir, EVAL_FILE),
                         {**_key(config, settings), "results": results,
                          **({"earlier": earlier} if earlier else {})})
    return results


def stalled(config, num_classes):
    """Whether the cell's training loss was still at chance at its last epoch
    (`training.stalled`, read from its metrics.jsonl): a network that did not learn."""
    path = os.path.join(config.model_dir, model_dir.METRICS_FILE)
    if not os.path.isfile(path):
        return False
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return bool(rows) and training.stalled(rows[-1]["loss"], num_classes, rows[-1]["epoch"],
                                           config.objective)


def _stats(values):
    """Mean, sample std (None for one value) and n; all None for no values."""
    if not values:
        return {"mean": None, "std": None, "n": 0}
    std = float(np.std(values, ddof=1)) if len(values) > 1 else None
    return {"mean": float(np.mean(values)), "std": std, "n": len(values)}


def summarize(cells):
    """Per objective and activation (in grid order): the stats of each metric over seeds.

    The eps curve is averaged over seeds, eps by eps.
    """
    groups = {}
    for cell in cells:
        groups.setdefault((cell["objective"], cell["activation"]), []).append(cell)
    rows = []
    for (objective, activation), group in groups.items():
        row = {"objective": objective, "activation": activation,
               "seeds": [c["seed"] for c in group]}
        for metric in METRICS:
            row[metric] = _stats([c[metric] for c in group if c[metric] is not None])
        curves = np.array([c["eps_curve"] for c in group], np.float64)  # [seed, eps, 2]
        row["eps_curve"] = curves.mean(axis=0).tolist() if curves.size else []
        rows.append(row)
    return rows


def paired(cells, objective, arm, other, metric, reps=2000, seed=0):
    """`arm` minus `other` in accuracy under `metric`, paired by test image and seed.

    Both arms saw the same test images at the same seeds, so the difference is
    taken image by image. The 95% interval is a two-level bootstrap: each of
    `reps` draws resamples the seeds, then the test images, with replacement,
    and averages the differences; the interval is its 2.5 and 97.5 percentiles.
    It covers the spread of test images and of seeds; with few seeds the
    seed level is coarse.

    Returns: `{"by_seed": {seed: difference}, "mean", "low", "high", "seeds",
        "images"}` (fractions), or None where no seed has both arms' per-image
        results for `metric`.
    """
    at = {(c["activation"], c["seed"]): c for c in cells if c["objective"] == objective}

    def hits(a, s):
        per_image = at.get((a, s), {}).get("per_image") or {}
        return None if per_image.get(metric) is None else unpack(per_image[metric])

    seeds = sorted(s for a, s in at if a == arm and hits(arm, s) is not None
                   and hits(other, s) is not None)
    if not seeds:
        return None
    diffs = np.stack([hits(arm, s).astype(np.int8) - hits(other, s) for s in seeds])
    rng = np.random.default_rng(seed)
    boot = [diffs[rng.integers(0, len(seeds), len(seeds))][:, rng.integers(
        0, diffs.shape[1], diffs.shape[1])].mean() for _ in range(reps)]
    low, high = np.percentile(boot, [2.5, 97.5])
    return {"by_seed": {s: float(d.mean()) for s, d in zip(seeds, diffs)},
            "mean": float(diffs.mean()), "low": float(low), "high": float(high),
            "seeds": len(seeds), "images": int(diffs.shape[1])}


def _paired_table(cells, objective, arms, pgd_name):
    """Rows `| arm - other | metric | seed by seed | mean [95% interval] |` (points), for
    sparta and sparta_transfer (those of `arms`) against each other arm."""
    rows, done, half_widths = [], set(), {}
    for arm in [a for a in ("sparta", TRANSFER_ARM) if a in arms]:
        for other in arms:
            if other == arm or frozenset((arm, other)) in done:
                continue
            done.add(frozenset((arm, other)))
            for metric, name in (("clean", "clean"), ("pgd", pgd_name),
                                 ("autoattack", "AutoAttack")):
                p = paired(cells, objective, arm, other, metric)
                if p is not None:
                    half_widths.setdefault(name, []).append(50 * (p["high"] - p["low"]))
                    by_seed = ", ".join(f"{s}: {100 * d:+.2f}" for s, d in p["by_seed"].items())
                    rows.append(f"| {arm} - {other} | {name} | {by_seed} | "
                                f"{100 * p['mean']:+.2f} [{100 * p['low']:+.2f}, "
                                f"{100 * p['high']:+.2f}] |")
    if not rows:
        return []
    return ["Paired differences in points (the same test images and seeds; 95% interval of a "
            "two-level bootstrap over seeds and test images, `paired`), over the seeds whose "
            "cells keep which images they got right: a difference whose interval holds 0 is "
            "not one this grid can tell from noise.", "",
            "| pair | accuracy | seed: difference | mean [95% interval] |",
            "| --- | --- | --- | --- |", *rows, "",
            "At this size an interval reaches this far either side of its mean (points, "
            "smallest to largest over the pairs): "
            + "; ".join(f"{name} {_span(w)}" for name, w in half_widths.items())
            + ". A difference must be about that large to stand out."]


def _span(values):
    """`1.2 to 3.4`, or `1.2` where the two are the same at that precision."""
    low, high = f"{min(values):.1f}", f"{max(values):.1f}"
    return low if low == high else f"{low} to {high}"


def _square_check(cells, objective, pgd_name, queries):
    """A line on the masking check of the cells that ran Square on a subset, or none.

    As `masking.black_box_weaker`: Square (black box) must not beat the best white-box
    attack on the same images, PGD or AutoAttack's white-box chain (cells evaluated before
    the subset's AutoAttack accuracy was kept compare with PGD alone).
    """
    checked = [c for c in cells if c["objective"] == objective and c.get("square_check")]
    if not checked:
        return []
    n = checked[0]["square_check"]["examples"]
    slack = max(0.01, 1 / n)  # as `masking.slack`: 1% or one example

    def white_box(check):
        return min(v for k, v in check.items() if k in ("pgd", "autoattack"))

    failed = [f"{c['activation']} seed {c['seed']} (Square {100 * c['square_check']['square']:.1f}"
              f" against {100 * white_box(c['square_check']):.1f})" for c in checked
              if c["square_check"]["square"] < white_box(c["square_check"]) - slack]
    both = all("autoattack" in c["square_check"] for c in checked)
    best = f"the better of {pgd_name} and AutoAttack's white-box attacks" if both else pgd_name
    head = (f"Masking check (`black_box_weaker`): Square ({queries} queries, black box) on a "
            f"class-balanced {n} of the test images, against {best} on the same images, "
            f"in {len(checked)} cell{'s' * (len(checked) != 1)}: ")
    return [head + ("**WARNING**, Square beats the white-box attacks in "
                    + "; ".join(failed) if failed else "it never beats the white-box attacks")
            + "."]


def _percent(stats):
    if stats["mean"] is None:
        return "-"
    if stats["std"] is None:
        return f"{100 * stats['mean']:.1f}"
    return f"{100 * stats['mean']:.1f} ± {100 * stats['std']:.1f}"


def _seed_by_seed(cells, objective, arms, seeds):
    """Rows `| arm | clean / PGD (/ AutoAttack, where a cell ran it) at seed s | ... |`,
    "-" where a cell or its AutoAttack is missing, and "(stalled)" after a cell that did
    not learn (`stalled`), with a line that names them."""
    at = {(c["activation"], c["seed"]): c for c in cells if c["objective"] == objective}
    metrics = ["clean", "pgd"] + (["autoattack"] if any(
        c.get("autoattack") is not None for c in at.values()) else [])
    head = " / ".join({"clean": "clean", "pgd": "PGD", "autoattack": "AutoAttack"}[m]
                      for m in metrics)
    lines = [f"| seed by seed: {head} | " + " | ".join(f"seed {s}" for s in seeds) + " |",
             "| --- |" + " ---: |" * len(seeds)]

    def value(cell):
        return " / ".join("-" if cell.get(m) is None else f"{100 * cell[m]:.1f}"
                          for m in metrics) + (" (stalled)" if cell.get("stalled") else "")

    for arm in arms:
        values = [value(at[arm, s]) if (arm, s) in at else "-" for s in seeds]
        lines.append(f"| {arm} | " + " | ".join(values) + " |")
    stuck = [f"{a} seed {s}" for a in arms for s in seeds if at.get((a, s), {}).get("stalled")]
    if stuck:
        lines += ["", "Stalled (the training loss still at chance at the last epoch, "
                  "`training.stalled`: the network did not learn under this recipe): "
                  f"{', '.join(stuck)}. They count in the means above."]
    return lines


def _after_table(cells, objective, arms):
    """Rows `| arm | accuracy after each attack of AutoAttack's chain, mean |`, to show what
    each attack adds; none where no cell kept them."""
    kept = [c for c in cells if c["objective"] == objective and c.get("autoattack_after")]
    if not kept:
        return []
    names = list(kept[0]["autoattack_after"])
    lines = ["| AutoAttack, accuracy after each attack (and those before it) | "
             + " | ".join(f"+ {n.upper()}" if i else n.upper() for i, n in enumerate(names))
             + " | n |", "| --- |" + " ---: |" * (len(names) + 1)]
    for arm in arms:
        mine = [c["autoattack_after"] for c in kept if c["activation"] == arm]
        if mine:
            means = [100 * np.mean([m[n] for m in mine]) for n in names]
            lines.append(f"| {arm} | " + " | ".join(f"{v:.1f}" for v in means)
                         + f" | {len(mine)} |")
    return lines


def _eps_table(cells, objective, arms):
    """Rows `| arm | PGD accuracy at each eps of the curve, mean ± std |`; none without a curve."""
    curves = {}
    for c in cells:
        if c["objective"] == objective and c["eps_curve"]:
            curves.setdefault(c["activation"], []).append([acc for _, acc in c["eps_curve"]])
    if not curves:
        return []
    eps = [e for e, _ in next(c for c in cells if c["objective"] == objective)["eps_curve"]]
    lines = ["| PGD accuracy at eps | " + " | ".join(evaluation.eps_text(e) for e in eps)
             + " |", "| --- |" + " ---: |" * len(eps)]
    for arm in arms:
        if arm in curves:
            stats = [_stats(list(v)) for v in zip(*curves[arm])]
            lines.append(f"| {arm} | " + " | ".join(_percent(s) for s in stats) + " |")
    return lines


def _chain_text(settings):
    """E.g. `APGD-CE, APGD-T (100 iterations), worst case per image; Square alone on 500`."""
    names = [a.upper() for a in settings.get("autoattack_attacks", EvalSettings.autoattack_attacks)]
    text = f"{', '.join(names)} ({settings['autoattack_iterations']} iterations)"
    if settings.get("square_examples") is None:
        return f"{text}, then Square ({settings['square_queries']} queries), worst case per image"
    return (f"{text}, worst case per image; Square ({settings['square_queries']} queries) "
            f"alone on {settings['square_examples']} of the images, for the masking check")


def table(results):
    """The comparison as Markdown: per objective, a table with a row per arm, then seed by seed.

    Columns: clean, PGD and AutoAttack test accuracy in %, as mean ± sample std
    over the seeds (just the mean for one seed; "-" where not run), and n, the
    number of seeds; ranked by AutoAttack where it ran. Below it, clean / PGD
    accuracy seed by seed (and AutoAttack where it ran), PGD accuracy along the
    eps curve (mean ± std), and where the cells kept their per-image results, the
    paired differences of sparta against each other arm (`paired`), with how
    far their intervals reach at this size.
    """
    s = results["settings"]
    train = results["train"]
    dataset = os.path.basename(os.path.normpath(train["dataset"]))  # as the cells' identity
    lines = [f"# Activations compared: {train['model']} x{train['width_multiplier']} on "
             f"{dataset}, {train['epochs']} epoch{'s' * (train['epochs'] != 1)}", "",
             f"Test accuracy (%) on {results['test_examples']} test images at L-inf eps "
             f"{evaluation.eps_text(s['eps'])}: PGD-{s['pgd_steps']} "
             f"(step 2.5 eps / {s['pgd_steps']}, 1 random start)"
             + (f" and AutoAttack ({_chain_text(s)}; `sparta_tf.autoattack`)."
                if s["autoattack"] else "; AutoAttack not run.")
             + " Mean ± sample std over n seeds.", ""]
    if any(c["activation"] == TRANSFER_ARM for c in results["cells"]):
        lines += [f"`{TRANSFER_ARM}`: Sparta ({train['sparta_sharing']} sharing) copied from "
                  f"`{train['sparta_from']}` (sha256 {train['sparta_from_sha256'][:16]}...) "
                  "and frozen; the rest of the network trained from scratch.", ""]
    seeds = sorted({c["seed"] for c in results["cells"]})
    for objective in dict.fromkeys(r["objective"] for r in results["summary"]):
        title = {"standard": "Standard training",
                 "pgd": f"PGD-{train['pgd_steps']} adversarial training",
                 "trades": f"TRADES (beta {train['trades_beta']}, PGD-{train['pgd_steps']})",
                 }[objective]
        rows = [r for r in results["summary"] if r["objective"] == objective]
        if any(r["autoattack"]["mean"] is not None for r in rows):  # ranked by the strongest
            rows.sort(key=lambda r: -(r["autoattack"]["mean"] or -1.0))
        lines += [f"## {title}", "",
                  f"| activation | clean | PGD-{s['pgd_steps']} | AutoAttack | n |",
                  "| --- | ---: | ---: | ---: | ---: |"]
        lines += [f"| {r['activation']} | {_percent(r['clean'])} | {_percent(r['pgd'])} | "
                  f"{_percent(r['autoattack'])} | {len(r['seeds'])} |" for r in rows]
        arms = [r["activation"] for r in rows]
        lines += ["", *_seed_by_seed(results["cells"], objective, arms, seeds), ""]
        for more in (_eps_table, _after_table):
            more_lines = more(results["cells"], objective, arms)
            lines += [*more_lines, ""] if more_lines else []
        paired_lines = _paired_table(results["cells"], objective, arms, f"PGD-{s['pgd_steps']}")
        lines += [*paired_lines, ""] if paired_lines else []
        square_lines = _square_check(results["cells"], objective, f"PGD-{s['pgd_steps']}",
                                     s["square_queries"])
        lines += [*square_lines, ""] if square_lines else []
    if results.get("missing"):
        n = len(results["missing"])
        lines += [f"Not finished, so not in the table: {n} cell{'s' * (n != 1)} "
                  f"({', '.join(results['missing'])}).", ""]
    return "\n".join(lines)


def _pictures(results, x, y, root, settings, prefix=""):
    """The plots of `sparta_tf.plots`, `prefix` before their file names.

    The eps curves are per objective (mean over seeds). The attention maps and
    gate weights (sparta) and the activation change (relu against sparta) use
    the models of the first seed, adversarially trained where the grid has
    `pgd`, each attacked by its own PGD at eps; they are left out, with a
    warning, where that model's model.keras is missing.

    Returns: the paths written, and the plotted values: `gate_weights` (of the
        sparta model) and `activation_change` (`{activation: {place: relative
        change}}`, or None without relu).
    """
    paths = []
    for objective in dict.fromkeys(r["objective"] for r in results["summary"]):
        curves = {r["activation"]: r["eps_curve"] for r in results["summary"]
                  if r["objective"] == objective and r["eps_curve"]}
        if curves:
            paths.append(plots.robust_accuracy_vs_eps(
                curves, os.path.join(root, f"{prefix}eps_curve_{objective}.png"),
                title=f"{objective} training: PGD-{settings.pgd_steps} accuracy"))
    objectives = [c["objective"] for c in results["cells"]]
    objective = "pgd" if "pgd" in objectives else objectives[0]
    first = {c["activation"]: c for c in results["cells"]
             if c["objective"] == objective and c["seed"] == results["cells"][0]["seed"]}
    missing = [c["model_dir"] for c in first.values()
               if not os.path.isfile(os.path.join(c["model_dir"], model_dir.MODEL))]
    if missing:  # e.g. a clone where only the cells' JSON files were committed
        logging.getLogger(__name__).warning(
            "No model.keras in %s: no attention, gate or activation-change plot.",
            ", ".join(missing))
    first = {a: c for a, c in first.items() if c["model_dir"] not in missing}
    if "sparta" not in first:
        return paths, {}
    x = x[:PLOT_EXAMPLES] / np.float32(255)
    pgd = _pgd(settings.eps, settings)
    wanted = [a for a in ("relu", "sparta") if a in first]
    loaded = {a: evaluation.load_model(first[a]["model_dir"]) for a in wanted}
    x_adv = {a: pgd(m, tf.constant(x), tf.constant(y[:PLOT_EXAMPLES])).numpy()
             for a, m in loaded.items()}
    paths.append(plots.attention_maps(loaded["sparta"], x[:1], x_adv["sparta"][:1],
                                      os.path.join(root, f"{prefix}attention_maps.png")))
    paths.append(os.path.join(root, f"{prefix}gate_weights.png"))
    values = {"gate_weights": plots.gate_weights(loaded["sparta"], paths[-1]),
              "activation_change": None}
    if "relu" in loaded:
        paths.append(os.path.join(root, f"{prefix}activation_change.png"))
        values["activation_change"] = plots.activation_change(loaded, x, x_adv, paths[-1])
    return paths, values


def run_grid(base, activations, seeds, objectives=("pgd", "standard"), root="runs/compare",
             settings=EvalSettings(), make_plots=True, overwrite=False, verbose="auto",
             report_only=False, report_name=REPORT):
    """Trains and evaluates every cell; writes comparison.json, comparison.md and plots.

    Args:
        base: the `training.TrainConfig` that every cell starts from (its data,
            model, recipe; its model_dir, activation, seed and objective are
            replaced, see `cell_config`; its `sparta_from` is the source of
            the `sparta_transfer` arm).
        activations: arms: canonical activation names (`activations.NAMES`)
            or `EXTRA_ARMS`.
        seeds: training seeds.
        objectives: names out of `training.OBJECTIVES`.
        root: the folder of the cells and of the reports.
        settings: an `EvalSettings`; the test images are a class-balanced
            sample of `base.max_test` drawn with `settings.seed`, the same for
            every cell.
        make_plots: also write the PNGs of `_pictures`.
        overwrite: retrain every cell from scratch (its model_dir is deleted).
        verbose: Keras' verbosity for training; 0 also hides the evaluation's
            progress bars.
        report_only: train and evaluate nothing: the reports cover the cells
            whose evaluation is stored, and list the others as `missing`.
        report_name: the reports are `{report_name}.json` and `.md`, and
            another name than `REPORT` goes before the PNGs' names too, so
            that several reports (a subset of arms, AutoAttack added) can
            read the same cells without overwriting each other.

    Returns: a JSON-able dict: `train` (the base config), `settings`,
        `test_examples`, `cells` (one per run: objective, activation, seed,
        model_dir, the results of `evaluate` and `stalled`), `missing` (the model_dirs of
        the cells left out by `report_only`), `summary` (see `summarize`),
        `plots` (the PNG paths), `activation_change` and `gate_weights` (see
        `_pictures`).

    Raises:
        what `training.run` and `data.load` raise, e.g.
        `training.ConfigMismatchError` for a root of another configuration.
    """
    for arm in activations:  # every arm's config is valid before anything trains
        arm_overrides(arm, base)
    if TRANSFER_ARM in activations:
        base, _ = training.with_sparta_source(base)  # its sha256 is part of the cells' key
    ds = data.load(base.dataset, base.data_dir, max_train=1, max_test=base.max_test,
                   seed=settings.seed)  # only the test split is used
    cells, missing = [], []
    for seed in seeds:
        for objective in objectives:
            for activation in activations:
                config = cell_config(base, root, objective, activation, seed)
                if report_only:
                    results = stored_results(config, settings)
                    if results is None:
                        missing.append(config.model_dir)
                        continue
                else:
                    results = run_cell(config, ds.x_test, ds.y_test, settings, overwrite,
                                       verbose)
                cells.append({"objective": objective, "activation": activation, "seed": seed,
                              "model_dir": config.model_dir, **results,
                              "stalled": stalled(config, ds.num_classes)})
    if report_only and not cells:
        raise FileNotFoundError(f"no finished cell of this grid in {root}")
    results = {"train": base.to_json(), "settings": dataclasses.asdict(settings),
               "test_examples": len(ds.y_test), "cells": cells, "missing": missing,
               "summary": summarize(cells), "plots": [], "activation_change": None,
               "gate_weights": None}
    if make_plots:
        prefix = "" if report_name == REPORT else f"{report_name}_"
        results["plots"], values = _pictures(results, ds.x_test, ds.y_test, root, settings,
                                             prefix)
        results.update(values)
    model_dir.write_json(os.path.join(root, f"{report_name}.json"), results)
    model_dir.write_text(os.path.join(root, f"{report_name}.md"), table(results))
    return results


# The settings an ablation varies, as `ablation_table` names them.
ABLATED = {"sparta_kernel_size": "k", "sparta_beta0": "beta0", "sparta_sharing": "sharing",
           "sparta_weight_decay": "Sparta weight decay", "sparta_lr_multiplier": "Sparta lr",
           "sparta_custom_gradient": "custom gradient",
           "sparta_normalize_gate_input": "gate input normalised"}


def _setting(key, value):
    """E.g. `k 3`, `Sparta weight decay off`, `Sparta lr x10`."""
    if isinstance(value, bool):
        value = "on" if value else "off"
    elif isinstance(value, float):
        value = ("x" if key == "sparta_lr_multiplier" else "") + f"{value:g}"
    return f"{ABLATED[key]} {value}"


def ablation_table(reports, objective="pgd", activation="sparta"):
    """The ablation as Markdown: one row per comparison, named by the settings it changes.

    Args:
        reports: `run_grid` results (comparison.json), the first one the
            baseline. They must share everything but the settings of `ABLATED`
            and the eps curve: the same recipe, test images and attack.
        objective, activation: the cells of each report that the table shows.

    Returns: a table of clean and PGD accuracy (%) per report: at the first
        seed of the baseline (the one seed every variant is run with) and as
        mean ± sample std over all its seeds, with n.

    Raises:
        ValueError: a report differs from the baseline in anything else, or
            has no cell of `objective` and `activation`.
    """
    reports = json.loads(json.dumps(reports))  # as comparison.json holds them: lists, not tuples
    for report in reports:  # written before a setting existed: its default
        report["train"] = training.TrainConfig.complete(report["train"])
    base = reports[0]
    seed = base["cells"][0]["seed"]
    pgd = f"PGD-{base['settings']['pgd_steps']}"
    lines = [f"| variant | clean, seed {seed} | {pgd}, seed {seed} | clean | {pgd} | n |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for report in reports:
        differ = [k for k in base["train"] if k not in (*ABLATED, "model_dir")
                  and report["train"].get(k) != base["train"][k]]
        differ += [k for k in base["settings"] if k != "eps_curve"
                   and report["settings"].get(k) != base["settings"][k]]
        differ += ["test_examples"] * (report["test_examples"] != base["test_examples"])
        if differ:
            raise ValueError(f"Not an ablation of the first report: it differs in {differ}.")
        changed = [_setting(k, report["train"][k]) for k in ABLATED
                   if report["train"][k] != base["train"][k]]
        label = ", ".join(changed) or "the baseline's settings"
        if report is base:
            label = f"baseline ({', '.join(_setting(k, base['train'][k]) for k in ABLATED)})"
        rows = [r for r in report["summary"]
                if r["objective"] == objective and r["activation"] == activation]
        if not rows:
            raise ValueError(f"A report has no {objective} {activation} cell.")
        at_seed = [c for c in report["cells"] if c["seed"] == seed
                   and c["objective"] == objective and c["activation"] == activation]
        first = [f"{100 * at_seed[0][m]:.1f}" if at_seed else "-" for m in ("clean", "pgd")]
        lines.append(f"| {label} | {first[0]} | {first[1]} | {_percent(rows[0]['clean'])} | "
                     f"{_percent(rows[0]['pgd'])} | {len(rows[0]['seeds'])} |")
    return "\n".join(lines) + "\n"
