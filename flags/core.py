"""Every absl flag of the trainers, defined once, and the --config presets.

A trainer calls the `define_*` functions it needs before `app.run`, then turns
the parsed flags into a library object (`train_config()`). Defaults come from
`sparta_tf.config.TrainConfig`, which is the `quick` preset; `--config=paper`
changes the flags that were not given on the command line.

Every number a flag takes is checked at the flag, with its name in the error: a float must
be finite (absl's parser takes `nan` and `inf`) and each number lies in a sane range, so
that a typo is refused before anything loads or trains.
"""

import math
import os
import sys

from absl import app, flags

from sparta_tf import activations, config, data, models

FLAGS = flags.FLAGS
_D = config.TrainConfig  # the defaults

PRESETS = config.PRESETS

# The sane ranges of the flags' numbers (beyond them, a typo or a run that cannot end).
MAX_SEED = 2**31 - 1  # NumPy's seeds stop at 2**32 - 1, and int32 seed tensors at this
MAX_EXAMPLES = 10**9
MAX_EPOCHS = 100_000
MAX_STEPS = 10_000  # PGD steps, and the steps of an evaluation's attacks
MAX_BATCH = 65_536
MAX_KERNEL_SIZE = 15
MAX_WIDTH_MULTIPLIER = 8.0


class PixelParser(flags.FloatParser):
    """A pixel budget in [0, 1]: a float, or a fraction such as `8/255`."""

    def __init__(self):
        super().__init__(lower_bound=0.0, upper_bound=1.0)

    def convert(self, argument):
        if isinstance(argument, str) and "/" in argument:
            num, den = argument.split("/", 1)
            try:
                value = float(num) / float(den)
            except (ValueError, ZeroDivisionError):
                raise ValueError(f"expected a float or a fraction like 8/255, got {argument!r}")
        else:
            value = super().convert(argument)
        if not math.isfinite(value):
            raise ValueError(f"expected a finite number, got {argument!r}")
        return value


def _pixels(name, default, help):
    flags.DEFINE(PixelParser(), name, default, help + " (a float or a fraction like 8/255)")


def _float(name, default, help, lower_bound=None, upper_bound=None, positive=False):
    """`flags.DEFINE_float` that also refuses NaN and infinity (absl's parser takes them:
    they pass its bounds), and with `positive`, 0."""
    flags.DEFINE_float(name, default, help, lower_bound=lower_bound, upper_bound=upper_bound)
    flags.register_validator(name, lambda v: v is None or math.isfinite(v),
                             message="must be a finite number")
    if positive:
        flags.register_validator(name, lambda v: v is None or v > 0, message="must be > 0")


def _valid_dataset(value):
    return value == "bundled" or value in data.TFDS_NAMES or os.path.exists(value)


def define_data(training_split=True):
    """The data flags; `training_split=False` leaves out --max_train (evaluation)."""
    flags.DEFINE_string(
        "dataset", _D.dataset,
        f"'bundled' (the CIFAR-10 sample in the package), a tfds name {data.TFDS_NAMES}, "
        "or the path of an image folder (split/class/image) or of a .tar.gz of one.")
    flags.register_validator(
        "dataset", _valid_dataset,
        message=f"must be 'bundled', one of {data.TFDS_NAMES}, or an existing path")
    flags.DEFINE_string("data_dir", _D.data_dir, "tfds data_dir, or cache for a .tar.gz.")
    _float("max_extract_gb", _D.max_extract_gb,
           "The most that a .tar.gz dataset may expand to, in GB; raise it for a larger "
           "one.", positive=True)
    _float("max_extract_ratio", _D.max_extract_ratio,
           "The most that a .tar.gz dataset may expand to, as a multiple of its own size; "
           "raise it for one that compresses better.", positive=True)
    if training_split:
        flags.DEFINE_integer("max_train", _D.max_train, "Class-balanced training subset size.",
                             lower_bound=1, upper_bound=MAX_EXAMPLES)
    flags.DEFINE_integer("max_test", _D.max_test, "Class-balanced test subset size.",
                         lower_bound=1, upper_bound=MAX_EXAMPLES)
    flags.DEFINE_integer("seed", _D.seed, "Seed of data order, augmentation and attacks.",
                         lower_bound=0, upper_bound=MAX_SEED)


def define_model():
    flags.DEFINE_enum("model", _D.model, models.NAMES, "Network.")
    flags.DEFINE_enum("activation", _D.activation, activations.NAMES + ("swish",),
                      "Activation of every layer.")
    _float("width_multiplier", _D.width_multiplier, "Scales every width.",
           lower_bound=1e-3, upper_bound=MAX_WIDTH_MULTIPLIER)
    flags.DEFINE_enum("sparta_sharing", _D.sparta_sharing, models.SHARING,
                      "One Sparta per activation ('layer') or per stage ('stage').")
    flags.DEFINE_integer("sparta_kernel_size", _D.sparta_kernel_size,
                         "k of Sparta's k x k gate (odd).", lower_bound=1,
                         upper_bound=MAX_KERNEL_SIZE)
    flags.register_validator("sparta_kernel_size", lambda k: k % 2 == 1,
                             message="must be odd (the gate is centred on its position)")
    _float("sparta_beta0", _D.sparta_beta0, "Sparta's initial centre weight.",
           lower_bound=-100.0, upper_bound=100.0)
    flags.DEFINE_bool("sparta_custom_gradient", _D.sparta_custom_gradient,
                      "Use Sparta's hand-written exact gradient (else autodiff).")
    flags.DEFINE_bool("sparta_normalize_gate_input", _D.sparta_normalize_gate_input,
                      "Sparta's gate sees each feature map divided by its RMS.")
    flags.DEFINE_string("sparta_from", _D.sparta_from,
                        "Reuse a trained Sparta: a model_dir of sparta-train or a .keras file "
                        "whose Sparta parameters are copied in and frozen "
                        "(sparta_tf.transfer); the rest of the network trains from scratch.")
    flags.register_validator("sparta_from", lambda path: path is None or os.path.exists(path),
                             message="must be an existing model_dir or .keras file")
    flags.DEFINE_string("gates_from", _D.gates_from,
                        "Train only the gates: a model_dir of sparta-train or a .keras file "
                        "of the same network with another activation (SiLU, say), whose "
                        "weights but its activations' are copied in and frozen "
                        "(sparta_tf.transfer); only Sparta trains. '{seed}' in the path is "
                        "replaced by the run's seed (one source per seed in a grid).")
    flags.register_validator(
        "gates_from", lambda path: path is None or "{seed}" in path or os.path.exists(path),
        message="must be an existing model_dir or .keras file ('{seed}' may stand for the seed)")
    flags.DEFINE_enum("denoise", _D.denoise, models.DENOISE,
                      "A feature-denoising block after every stage (Xie et al. 2019): "
                      "non-local means, a 3x3 mean filter, or none.")


def define_attack():
    _pixels("eps", _D.eps, "L-inf budget in pixels")
    flags.DEFINE_integer("pgd_steps", _D.pgd_steps, "PGD steps in training.", lower_bound=1,
                         upper_bound=MAX_STEPS)
    _pixels("pgd_step_size", _D.pgd_step_size, "PGD step size; default 2.5 * eps / steps")
    flags.register_validator("pgd_step_size", lambda v: v is None or v > 0,
                             message="must be > 0 (a step of 0 leaves the images as they are)")


def define_training():
    define_data()
    define_model()
    define_attack()
    flags.DEFINE_enum("config", "quick", list(PRESETS),
                      "Preset; flags given on the command line override it.")
    flags.DEFINE_string("model_dir", _D.model_dir, "Checkpoints, logs, metrics, model.")
    flags.DEFINE_bool("overwrite", False, "Delete model_dir first instead of resuming (only a "
                      "model_dir that sparta-train wrote; anything else is refused).")
    flags.DEFINE_integer("epochs", _D.epochs, "Epochs.", lower_bound=1, upper_bound=MAX_EPOCHS)
    flags.DEFINE_integer("batch_size", _D.batch_size, "Global batch size.", lower_bound=1,
                         upper_bound=MAX_BATCH)
    _float("lr", _D.lr, "Initial learning rate (SGD).", lower_bound=0.0, upper_bound=10.0)
    flags.DEFINE_enum("lr_schedule", _D.lr_schedule, config.LR_SCHEDULES, "LR schedule.")
    flags.DEFINE_list("lr_decay_epochs", list(map(str, _D.lr_decay_epochs)),
                      "Piecewise schedule: divide the lr by 10 at these epochs.")
    _float("momentum", _D.momentum, "SGD momentum, in [0, 1).", lower_bound=0.0,
           upper_bound=1.0)
    flags.register_validator("momentum", lambda m: m < 1,
                             message="must be < 1 (a momentum of 1 or more diverges)")
    _float("weight_decay", _D.weight_decay, "L2 weight decay.", lower_bound=0.0,
           upper_bound=1.0)
    flags.DEFINE_bool("sparta_weight_decay", _D.sparta_weight_decay,
                      "Apply weight decay to the Sparta parameters too.")
    _float("sparta_lr_multiplier", _D.sparta_lr_multiplier,
           "Multiplies the learning rate of the Sparta parameters (their gradients are "
           "scaled).", lower_bound=0.0, upper_bound=1000.0)
    flags.DEFINE_enum("objective", _D.objective, config.OBJECTIVES, "Training objective.")
    _float("trades_beta", _D.trades_beta, "TRADES' KL weight.", lower_bound=0.0,
           upper_bound=1000.0)
    flags.DEFINE_enum("mixed_precision", _D.mixed_precision,
                      ["float32", "mixed_float16", "mixed_bfloat16"], "Keras dtype policy.")
    flags.DEFINE_enum("strategy", _D.strategy, config.STRATEGIES,
                      "mirrored: every device of this machine (TensorFlow's MirroredStrategy, "
                      "JAX's DataParallel); multi_worker (TensorFlow only): the machines of "
                      "the TF_CONFIG cluster (run the same command on each; BUILD.md).")
    flags.DEFINE_bool("jit_compile", _D.jit_compile,
                      "TensorFlow: compile the train step with XLA (Sparta's gate then runs in "
                      "its shifted form; on a CPU, XLA made Sparta's step 3.9x slower than "
                      "none). On JAX the step is always compiled.")
    flags.DEFINE_integer("checkpoint_every", _D.checkpoint_every,
                         "Also checkpoint every N steps (0: only at epoch ends).",
                         lower_bound=0, upper_bound=MAX_EXAMPLES)
    flags.DEFINE_integer("eval_pgd_steps", _D.eval_pgd_steps,
                         "PGD steps of the evaluation after training (0: none).",
                         lower_bound=0, upper_bound=MAX_STEPS)
    flags.register_validator(
        "lr_decay_epochs", _decay_epochs,
        message=f"must be a comma-separated list of increasing epochs, each > 0 and at most "
                f"{MAX_EPOCHS}")
    flags.register_multi_flags_validator(
        ["sparta_sharing", "activation"],
        lambda v: v["sparta_sharing"] == "layer" or v["activation"] == "sparta",
        message="--sparta_sharing=stage is for --activation=sparta only")
    flags.register_multi_flags_validator(
        ["batch_size", "max_train"],
        lambda v: v["max_train"] is None or v["max_train"] >= v["batch_size"],
        message="--batch_size is larger than --max_train: no full batch to train on")
    flags.register_multi_flags_validator(
        ["sparta_from", "activation"],
        lambda v: v["sparta_from"] is None or v["activation"] == "sparta",
        message="--sparta_from copies Sparta parameters: it needs --activation=sparta")
    flags.register_multi_flags_validator(
        ["gates_from", "activation"],
        lambda v: v["gates_from"] is None or v["activation"] in config.SPARTA_FAMILY,
        message="--gates_from trains only the gates: it needs --activation=sparta (or a "
                "Sparta variant)")
    flags.register_multi_flags_validator(
        ["gates_from", "sparta_from"],
        lambda v: v["gates_from"] is None or v["sparta_from"] is None,
        message="--gates_from and --sparta_from freeze opposite halves: give one of them")


def _decay_epochs(values):
    try:
        epochs = [float(v) for v in values]
    except ValueError:
        return False
    return (all(0 < e <= MAX_EPOCHS for e in epochs)  # False for NaN
            and all(a < b for a, b in zip(epochs, epochs[1:])))


def for_help(app_module):
    """Makes `--help` of the app show its usage and the flags of this package.

    absl's `--help` lists the flags of the main module (named by sys.argv[0]) and takes
    the usage from its docstring; the flags here live in `flags/`, and a console script's
    main module is a generated wrapper. Call it in the app's `run()`, before `app.run`.
    """
    sys.modules["__main__"].__doc__ = app_module.__doc__
    ours = {name for module, defined in FLAGS.flags_by_module_dict().items()
            if module.startswith("flags.") for name in (f.name for f in defined)}
    for name in sorted(ours):
        FLAGS.register_key_flag_for_module(sys.argv[0], FLAGS[name])


_HELP_FLAGS = ("-?", "-h", "--help", "--helpshort", "--helpfull", "--helpxml")


def run_app(main, app_module):
    """`app.run(main)` with `for_help(app_module)`, and `--help` exiting with status 0.

    absl's help flags exit with status 1, which tells a script or CI that the command
    failed; asking for help is not a failure.
    """
    for_help(app_module)
    try:
        app.run(main)
    except SystemExit as e:
        args = sys.argv[1:sys.argv.index("--")] if "--" in sys.argv else sys.argv[1:]
        if e.code == 1 and any(a.split("=")[0] in _HELP_FLAGS for a in args):
            raise SystemExit(0) from None
        raise


def given_or(name, fallback):
    """The value of flag `name` if given on the command line, else `fallback`."""
    return FLAGS[name].value if FLAGS[name].present else fallback


def train_config():
    """The `config.TrainConfig` that the parsed flags describe: the defaults, then the
    --config preset, then the flags given on the command line. No flag is changed."""
    preset = PRESETS[FLAGS.config]
    values = {name: given_or(name, preset.get(name, FLAGS[name].value))
              for name in config.TrainConfig.__dataclass_fields__
              if name in FLAGS}  # the *_sha256 are computed, not given
    values["lr_decay_epochs"] = tuple(float(e) for e in values["lr_decay_epochs"])
    values["activation"] = activations.canonical_name(values["activation"])
    return config.TrainConfig(**values)


AUTOATTACK_HELP = {
    "keras": "keras: standard AutoAttack in keras.ops (APGD-CE, APGD-T, FAB-T, Square; "
             "sparta_tf.autoattack_keras), on TensorFlow and JAX",
    "art": "art: ART's APGD-CE, APGD-T and Square (sparta_tf.autoattack; no FAB), on "
           "TensorFlow only: the cross-check",
    "none": "none: no AutoAttack"}


def define_autoattack(default="keras", engines=("keras", "art", "none")):
    """--autoattack (which AutoAttack, out of `engines`) and its sizes, for sparta-evaluate
    and sparta-compare."""
    flags.DEFINE_enum("autoattack", default, list(engines),
                      "Which AutoAttack runs: " + "; ".join(AUTOATTACK_HELP[e] for e in engines)
                      + ".")
    flags.DEFINE_integer("autoattack_iterations", 100, "APGD iterations (100 is standard).",
                         lower_bound=1, upper_bound=MAX_STEPS)
    flags.DEFINE_integer("square_queries", 5000, "Square queries (5000 is standard).",
                         lower_bound=1, upper_bound=100 * MAX_STEPS)


def define_evaluation():
    """The flags of trainers/evaluate.py: data, --eps, the model and the attack sizes.

    --eps, --dataset, --data_dir, --max_test (alias --num_examples: the examples, a
    class-balanced sample) and --seed default to the model_dir's config.json where the model has one.
    """
    define_data(training_split=False)
    _pixels("eps", _D.eps, "L-inf budget in pixels")
    flags.register_validator("eps", lambda eps: eps > 0, message="must be > 0 to evaluate")
    flags.DEFINE_string("model_path", None,
                        "The model: a model_dir (with model.keras), a .keras file, or an "
                        "exported SavedModel (its folder or the numbered version in it). A "
                        ".keras file loads under Keras's safe_mode (no arbitrary code: "
                        "Lambda layers are refused); a SavedModel runs its own graph "
                        "(TensorFlow ops chosen by whoever wrote it): only evaluate "
                        "SavedModels you trust.")
    flags.DEFINE_string("output_dir", None, "Where to write eval.json and eval.md "
                        "(default: the model_dir, else the folder that holds the model).")
    flags.DEFINE_alias("num_examples", "max_test")
    flags.DEFINE_integer("batch_size", 256, "Examples per batch of the attacks.", lower_bound=1,
                         upper_bound=MAX_BATCH)
    flags.DEFINE_list("eval_steps", ["20", "100"], "PGD step counts, each with the CE and the "
                      "CW loss; the first is also used for the eps sweep.")
    flags.register_validator("eval_steps", lambda v: bool(v) and all(
        s.isdigit() and 1 <= int(s) <= MAX_STEPS for s in v),
        message=f"must be a list of ints from 1 to {MAX_STEPS}")
    flags.DEFINE_integer("pgd_restarts", 3, "Random restarts of each PGD.", lower_bound=1,
                         upper_bound=1000)
    define_autoattack()


def define_export():
    """The flags of trainers/export.py."""
    flags.DEFINE_string("model_path", None,
                        "The model: a model_dir of sparta-train (its model.keras and class "
                        "names) or a .keras file.", required=True)
    flags.DEFINE_string("export_dir", None, "The base path that TF Serving watches; the "
                        "model is written to EXPORT_DIR/VERSION.", required=True)
    flags.DEFINE_integer("version", None, "The version to write (default: one more than "
                         "the highest in --export_dir). An existing one is never "
                         "overwritten.", lower_bound=1, upper_bound=2**63 - 1)
    flags.DEFINE_list("class_names", None, "The class names, in label order (default: "
                      "those that sparta-train wrote beside model.keras).")
