"""The ablation of Sparta as one table: several grids of Sparta variants side by side.

`ablation_table(reports)` reads the comparison.json of each variant (one `--model_dir`
each, the first the baseline), checks that they differ only in Sparta's own settings
(`ABLATED`), and names each row by what it changes. tools/ablation_table.py prints it.
"""

import json

from sparta_tf import training
from sparta_tf.experiments.report import percent

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
        lines.append(f"| {label} | {first[0]} | {first[1]} | {percent(rows[0]['clean'])} | "
                     f"{percent(rows[0]['pgd'])} | {len(rows[0]['seeds'])} |")
    return "\n".join(lines) + "\n"
