"""The flags of trainers/compare.py: every training flag of `core`, and the grid.

The training flags (including `--config` presets) describe the recipe that every
cell of the comparison shares. `--model_dir` is the comparison's root (default
`runs/compare`): it holds one model_dir per cell, `{objective}/{activation}/seed{seed}`,
and the reports. `--activation`, `--seed` and `--objective` are set per cell, so
giving them is an error that points to `--activations`, `--seeds` and `--objectives`.
`--eval_pgd_steps` is the PGD of the table (PGD-20 by default).
"""

import re

from absl import flags

from flags import core
from sparta_tf import activations, autoattack_keras, config
from sparta_tf.experiments.arms import EXTRA_ARMS, GATE_ARMS, TRANSFER_ARM
from sparta_tf.experiments.cells import ART_ATTACKS, STANDARD, EvalSettings
from sparta_tf.experiments.grid import REPORT

FLAGS = flags.FLAGS
_ARMS = activations.NAMES + ("swish",) + EXTRA_ARMS
_PER_CELL = {"activation": "activations", "seed": "seeds", "objective": "objectives"}


def _distinct_in(valid):
    """A validator: a non-empty list of distinct values out of `valid`."""
    return lambda values: bool(values) and len(set(values)) == len(values) and all(
        v in valid for v in values)


def _seeds(values):
    return bool(values) and len(set(values)) == len(values) and all(
        v.isdigit() and int(v) <= core.MAX_SEED for v in values)


def _pixel_list(values):
    try:
        [core.PixelParser().parse(v) for v in values]
    except ValueError:
        return False
    return True


def define_compare(model_dir="runs/compare", arms=activations.COMPARED,
                   objectives=("pgd", "standard")):
    """Defines the training flags of `core` and the flags of the comparison, with these defaults."""
    core.define_training()
    FLAGS.set_default("model_dir", model_dir)
    for name, plural in _PER_CELL.items():
        flags.register_validator(
            name, lambda _, name=name: not FLAGS[name].present,
            message=f"is set per cell in a comparison; use --{plural}")
    flags.register_validator(
        "denoise", lambda _: not FLAGS["denoise"].present,
        message="is set per arm in a comparison; use --activations=relu_nonlocal (or _mean)")
    flags.register_validator("eps", lambda eps: eps > 0, message="must be > 0 to evaluate")
    flags.register_validator("eval_pgd_steps", lambda steps: steps >= 1,
                             message="must be >= 1: it is the PGD of the table")
    flags.DEFINE_list("activations", list(arms),
                      "Arms to compare: activations, or sparta_transfer (Sparta copied from "
                      "--sparta_from, frozen), sparta_gates / sparta_k1_gates (the network of "
                      "--gates_from frozen, only a k = 3 or k = 1 Sparta trained), or "
                      "{activation}_nonlocal / {activation}_mean (with feature-denoising "
                      "blocks).")
    flags.register_validator(
        "activations", _distinct_in(_ARMS),
        message=f"must be a comma-separated list of distinct arms out of: "
                f"{', '.join(activations.NAMES + ('swish',))}, {TRANSFER_ARM}, "
                f"{', '.join(GATE_ARMS)}, "
                "{activation}_nonlocal, {activation}_mean")
    flags.register_multi_flags_validator(
        ["activations", "sparta_from"],
        lambda v: TRANSFER_ARM not in v["activations"] or v["sparta_from"] is not None,
        message=f"the {TRANSFER_ARM} arm needs --sparta_from (the Sparta to copy)")
    flags.register_multi_flags_validator(
        ["activations", "gates_from"],
        lambda v: not set(GATE_ARMS) & set(v["activations"]) or v["gates_from"] is not None,
        message=f"the {' and '.join(GATE_ARMS)} arms need --gates_from (the network to keep)")
    flags.DEFINE_list("seeds", ["0", "1", "2"], "Training seeds of every activation.")
    flags.register_validator("seeds", _seeds,
                             message=f"must be a comma-separated list of distinct ints from 0 "
                                     f"to {core.MAX_SEED}")
    flags.DEFINE_list("objectives", list(objectives), "Training objectives to compare.")
    flags.register_validator(
        "objectives", _distinct_in(config.OBJECTIVES),
        message=f"must be a comma-separated list of distinct objectives out of: "
                f"{', '.join(config.OBJECTIVES)}")
    flags.DEFINE_bool("report_only", False,
                      "Train and evaluate nothing: write the reports of the finished cells "
                      "(their evaluation stored in compare_eval.json) and list the others.")
    core.define_autoattack()
    flags.DEFINE_integer("square_examples", None,
                         "Unset: AutoAttack's Square runs on every test image, last in the "
                         "chain. N: AutoAttack is --autoattack_attacks on every test image, and "
                         "Square runs alone on a class-balanced N of them, for the masking "
                         "check (Square is the costly attack on a CPU).", lower_bound=1,
                         upper_bound=core.MAX_EXAMPLES)
    flags.DEFINE_string("report_name", REPORT,
                        "The reports' name: NAME.md and NAME.json in --model_dir, and NAME_ "
                        "before the PNGs' names unless it is the default; a second report "
                        "of the same cells (fewer arms, AutoAttack added) gets its own name.")
    flags.register_validator(
        "report_name", lambda name: bool(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name)),
        message="must be a plain file name: letters, digits, '_', '.', '-'")
    flags.DEFINE_list("autoattack_attacks", None,
                      "AutoAttack's white-box attacks, run in this order before Square "
                      "(default: standard AutoAttack's, apgd-ce,apgd-t,fab-t with "
                      "--autoattack=keras and apgd-ce,apgd-t with art): apgd-ce, apgd-t and "
                      "fab-t (one run per target class, 9 of them), and with art apgd-dlr "
                      "(untargeted, one run; a cheaper stand-in for apgd-t).")
    white_box = {"keras": autoattack_keras.ATTACKS[:-1],
                 "art": tuple(a for a in ART_ATTACKS if a != "square")}
    flags.register_multi_flags_validator(
        ["autoattack_attacks", "autoattack"],
        lambda v: v["autoattack_attacks"] is None or v["autoattack"] == "none" or _distinct_in(
            white_box[v["autoattack"]])(v["autoattack_attacks"]),
        message="--autoattack_attacks must be a comma-separated list of distinct attacks "
                "out of: " + "; ".join(f"{', '.join(names)} (--autoattack={engine})"
                                       for engine, names in white_box.items()))
    flags.DEFINE_bool("plots", True,
                      "Write the PNGs: robust accuracy against eps, Sparta's attention "
                      "maps, the activation change of ReLU against Sparta.")
    flags.DEFINE_list("eps_curve", ["0", "2/255", "4/255", "8/255", "16/255"],
                      "Pixel budgets of the robust accuracy against eps curve (empty: none).")
    flags.register_validator(
        "eps_curve", _pixel_list,
        message="must be a comma-separated list of pixel budgets in [0, 1] "
                "(floats or fractions like 8/255)")


def define_transfer():
    """The flags of trainers/transfer.py: those of `define_compare`, other defaults."""
    define_compare("runs/transfer", ("relu", "sparta", TRANSFER_ARM), ("pgd",))
    flags.mark_flag_as_required("sparta_from")


def grid(base):
    """The keyword arguments of `sparta_tf.experiments.grid.run_grid` for the recipe `base`
    (`core.train_config`), but `base` itself."""
    return dict(
        activations=list(dict.fromkeys(
            a if a in EXTRA_ARMS else activations.canonical_name(a)
            for a in FLAGS.activations)),
        seeds=[int(s) for s in FLAGS.seeds], objectives=FLAGS.objectives,
        root=base.model_dir, make_plots=FLAGS.plots, overwrite=FLAGS.overwrite,
        report_only=FLAGS.report_only, report_name=FLAGS.report_name,
        settings=EvalSettings(
            eps=base.eps, pgd_steps=base.eval_pgd_steps, autoattack=FLAGS.autoattack != "none",
            autoattack_engine="art" if FLAGS.autoattack == "art" else "keras",
            autoattack_iterations=FLAGS.autoattack_iterations,
            square_queries=FLAGS.square_queries, square_examples=FLAGS.square_examples,
            autoattack_attacks=tuple(FLAGS.autoattack_attacks or STANDARD[
                "art" if FLAGS.autoattack == "art" else "keras"]),
            eps_curve=tuple(core.PixelParser().parse(e) for e in FLAGS.eps_curve)))
