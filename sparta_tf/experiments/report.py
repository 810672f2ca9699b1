"""A grid's results as Markdown: `table(results)`, the comparison.md of sparta-compare.

Per objective: a table with a row per arm (clean, PGD and AutoAttack accuracy, mean ±
sample std over seeds, ranked by AutoAttack where it ran), then seed by seed, the eps
curve, the accuracy after each attack of AutoAttack's chain, the paired differences of
Sparta and its variants against every other arm (`stats.paired`) and the masking check of
Square. It reads only the JSON-able results of `grid.run_grid` (as comparison.json holds
them), and names the PGD protocol of the cells (`sparta_tf.protocol`) where the results
hold it.
"""

import os

import numpy as np

from sparta_tf import activations, masking, protocol
from sparta_tf.experiments import stats
from sparta_tf.experiments.arms import GATE_ARMS, TRANSFER_ARM


def percent(summary):
    """`mean ± std` in %, the mean alone for one value, `-` for none (of `stats.mean_std`)."""
    if summary["mean"] is None:
        return "-"
    if summary["std"] is None:
        return f"{100 * summary['mean']:.1f}"
    return f"{100 * summary['mean']:.1f} ± {100 * summary['std']:.1f}"


def table(results):
    """The comparison as Markdown: per objective, a table with a row per arm, then seed by seed.

    Columns: clean, PGD and AutoAttack test accuracy in %, as mean ± sample std
    over the seeds (just the mean for one seed; "-" where not run), and n, the
    number of seeds; ranked by AutoAttack where it ran. Below it, clean / PGD
    accuracy seed by seed (and AutoAttack where it ran), PGD accuracy along the
    eps curve (mean ± std), and where the cells kept their per-image results, the
    paired differences of sparta against each other arm (`stats.paired`), with how
    far their intervals reach at this size.
    """
    s = results["settings"]
    train = results["train"]
    dataset = os.path.basename(os.path.normpath(train["dataset"]))  # as the cells' identity
    lines = [f"# Activations compared: {train['model']} x{train['width_multiplier']} on "
             f"{dataset}, {train['epochs']} epoch{'s' * (train['epochs'] != 1)}", "",
             f"Test accuracy (%) on {results['test_examples']} test images at L-inf eps "
             f"{protocol.eps_text(s['eps'])}: PGD-{s['pgd_steps']} "
             f"(step 2.5 eps / {s['pgd_steps']}, 1 random start)"
             + (f" and AutoAttack ({_chain_text(s)}; "
                f"`sparta_tf.{ENGINES[s.get('autoattack_engine', 'art')]}`)."
                if s["autoattack"] else "; AutoAttack not run.")
             + " Mean ± sample std over n seeds.",
             *([f"PGD protocol (`sparta_tf.protocol`): {_protocol_text(results['protocol'])}."]
               if results.get("protocol") else []), ""]
    if any(c["activation"] == TRANSFER_ARM for c in results["cells"]):
        lines += [f"`{TRANSFER_ARM}`: Sparta ({train['sparta_sharing']} sharing) copied from "
                  f"`{train['sparta_from']}` (sha256 {train['sparta_from_sha256'][:16]}...) "
                  "and frozen; the rest of the network trained from scratch.", ""]
    if any(c["activation"] in GATE_ARMS for c in results["cells"]):
        lines += [f"Gates only: {', '.join(f'`{a}`' for a in GATE_ARMS)} keep the network of "
                  f"`{train['gates_from']}` frozen and train only a Sparta in place of its "
                  "activations, with a k x k gate (k = "
                  + ", ".join(str(k) for k in GATE_ARMS.values())
                  + "; k = 1 has no spatial part).", ""]
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
        lines += [f"| {r['activation']} | {percent(r['clean'])} | {percent(r['pgd'])} | "
                  f"{percent(r['autoattack'])} | {len(r['seeds'])} |" for r in rows]
        arms = [r["activation"] for r in rows]
        lines += ["", *seed_by_seed(results["cells"], objective, arms, seeds), ""]
        for more in (eps_table, after_table):
            more_lines = more(results["cells"], objective, arms)
            lines += [*more_lines, ""] if more_lines else []
        paired_lines = paired_table(results["cells"], objective, arms, f"PGD-{s['pgd_steps']}")
        lines += [*paired_lines, ""] if paired_lines else []
        square_lines = square_check(results["cells"], objective, f"PGD-{s['pgd_steps']}",
                                    s["square_queries"])
        lines += [*square_lines, ""] if square_lines else []
    if results.get("missing"):
        n = len(results["missing"])
        lines += [f"Not finished, so not in the table: {n} cell{'s' * (n != 1)} "
                  f"({', '.join(results['missing'])}).", ""]
    return "\n".join(lines)


def paired_table(cells, objective, arms, pgd_name):
    """Rows `| arm - other | metric | seed by seed | mean [95% interval] |` (points), for
    Sparta's variants, sparta, sparta_transfer and sparta_gates (those of `arms`, in that
    order) against each other arm, each pair once."""
    rows, done, half_widths = [], set(), {}
    focus = (*activations.VARIANTS, "sparta", TRANSFER_ARM, "sparta_gates")
    for arm in [a for a in focus if a in arms]:
        for other in arms:
            if other == arm or frozenset((arm, other)) in done:
                continue
            done.add(frozenset((arm, other)))
            for metric, name in (("clean", "clean"), ("pgd", pgd_name),
                                 ("autoattack", "AutoAttack")):
                p = stats.paired(cells, objective, arm, other, metric)
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


def square_check(cells, objective, pgd_name, queries):
    """A line on the masking check of the cells that ran Square on a subset, or none.

    The check is `masking.black_box_weaker_on_subset`: Square (black box) must not beat the
    best white-box attack on the same images, PGD or AutoAttack's white-box chain (cells
    evaluated before the subset's AutoAttack accuracy was kept compare with PGD alone).
    """
    checked = [c for c in cells if c["objective"] == objective and c.get("square_check")]
    if not checked:
        return []
    n = checked[0]["square_check"]["examples"]
    failed = [f"{c['activation']} seed {c['seed']} (Square {100 * c['square_check']['square']:.1f}"
              f" against {100 * min(masking.white_box(c['square_check']).values()):.1f})"
              for c in checked
              if not masking.black_box_weaker_on_subset(c["square_check"])["passed"]]
    both = all("autoattack" in c["square_check"] for c in checked)
    best = f"the better of {pgd_name} and AutoAttack's white-box attacks" if both else pgd_name
    head = (f"Masking check (`black_box_weaker`): Square ({queries} queries, black box) on a "
            f"class-balanced {n} of the test images, against {best} on the same images, "
            f"in {len(checked)} cell{'s' * (len(checked) != 1)}: ")
    return [head + ("**WARNING**, Square beats the white-box attacks in "
                    + "; ".join(failed) if failed else "it never beats the white-box attacks")
            + "."]


def seed_by_seed(cells, objective, arms, seeds):
    """Rows `| arm | clean / PGD (/ AutoAttack, where a cell ran it) at seed s | ... |`,
    "-" where a cell or its AutoAttack is missing, and "(stalled)" after a cell that did
    not learn (`cells.stalled`), with a line that names them."""
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


def after_table(cells, objective, arms):
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


def eps_table(cells, objective, arms):
    """Rows `| arm | PGD accuracy at each eps of the curve, mean ± std |`; none without a curve."""
    curves = {}
    for c in cells:
        if c["objective"] == objective and c["eps_curve"]:
            curves.setdefault(c["activation"], []).append([acc for _, acc in c["eps_curve"]])
    if not curves:
        return []
    eps = [e for e, _ in next(c for c in cells if c["objective"] == objective)["eps_curve"]]
    lines = ["| PGD accuracy at eps | " + " | ".join(protocol.eps_text(e) for e in eps)
             + " |", "| --- |" + " ---: |" * len(eps)]
    for arm in arms:
        if arm in curves:
            values = [stats.mean_std(list(v)) for v in zip(*curves[arm])]
            lines.append(f"| {arm} | " + " | ".join(percent(v) for v in values) + " |")
    return lines


def _protocol_text(stored):
    """`Protocol.describe` of a protocol as a report keeps it (`Protocol.to_json`)."""
    return protocol.Protocol.from_json(stored).describe()


ENGINES = {"keras": "autoattack_keras", "art": "autoattack"}  # whose AutoAttack: its module


def _chain_text(settings):
    """E.g. `APGD-CE, APGD-T (100 iterations), worst case per image; Square alone on 500`."""
    # Before the setting existed the chain was APGD-CE, APGD-T (`cache.BEFORE`).
    names = [a.upper() for a in settings.get("autoattack_attacks", ("apgd-ce", "apgd-t"))]
    text = f"{', '.join(names)} ({settings['autoattack_iterations']} iterations)"
    if settings.get("square_examples") is None:
        return f"{text}, then Square ({settings['square_queries']} queries), worst case per image"
    return (f"{text}, worst case per image; Square ({settings['square_queries']} queries) "
            f"alone on {settings['square_examples']} of the images, for the masking check")
