"""The pictures of a grid (`sparta_tf.plots`): eps curves, and what the first seed's
Sparta and ReLU models do under attack."""

import logging
import os

import keras
import numpy as np

from sparta_tf import evaluation, model_dir, plots

PLOT_EXAMPLES = 256  # test images for the activation-change plot


def pictures(results, x, y, root, settings, prefix=""):
    """The plots of `sparta_tf.plots`, `prefix` before their file names.

    The eps curves are per objective (mean over seeds). The attention maps and
    gate weights (sparta) and the activation change (relu against sparta) use
    the models of the first seed, adversarially trained where the grid has
    `pgd`, each attacked by its own PGD (the cells' protocol, `settings.protocol()`) at
    eps, on the first `PLOT_EXAMPLES` test images at once; they are left out, with a
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
    pgd = settings.protocol().attack()
    wanted = [a for a in ("relu", "sparta") if a in first]
    loaded = {a: evaluation.load_model(first[a]["model_dir"]) for a in wanted}
    x_adv = {a: keras.ops.convert_to_numpy(pgd(m, x, y[:PLOT_EXAMPLES]))
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
