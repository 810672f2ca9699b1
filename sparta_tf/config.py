"""The experiment's identity: `TrainConfig`, its presets, and what follows from it alone.

`TrainConfig` is everything one training run depends on, saved to model_dir/config.json;
`PRESETS` are the `--config` presets of the flags (`quick` is the defaults). The flags, the
trainers and the library read them here without importing the training loop. This module
imports nothing of `sparta_tf` and no TensorFlow.
"""

import contextlib
import dataclasses
import json
import math
import os

import keras

OBJECTIVES = ("standard", "pgd", "trades")
STRATEGIES = ("mirrored", "multi_worker")
LR_SCHEDULES = ("piecewise", "cosine", "onecycle")
ONECYCLE_WARMUP = 0.3  # the share of the steps that one-cycle spends rising
SPARTA_FAMILY = ("sparta", "sparta_shift", "sparta_bn")  # activations that take the sparta_* settings

PRESETS = {
    # The default: a small Sparta ResNet-18 on the bundled sample, minutes on 2 CPU cores.
    "quick": {},
    # The paper's recipe: ResNet-18 on CIFAR-10, PGD-10 AT for 110 epochs.
    "paper": dict(dataset="cifar10", width_multiplier=1.0, epochs=110, batch_size=128,
                  lr=0.1, lr_schedule="piecewise", lr_decay_epochs=["100", "105"],
                  momentum=0.9, weight_decay=5e-4, eps=8 / 255, pgd_steps=10,
                  pgd_step_size=2 / 255, checkpoint_every=500),
}


# What marks a config.json as written by sparta-train, beside the fields of `TrainConfig`
# (`from_stored`); not part of the experiment's identity.
WRITTEN_BY = {"written_by": "sparta-train", "config_format": 1}
# The fields of the first TrainConfig: a config.json written before `WRITTEN_BY` existed
# holds every one of them (later fields take their defaults, `TrainConfig.complete`).
FIRST_FIELDS = (
    "model_dir", "dataset", "data_dir", "max_train", "max_test", "model", "activation",
    "width_multiplier", "sparta_sharing", "sparta_kernel_size", "sparta_beta0",
    "sparta_custom_gradient", "epochs", "batch_size", "lr", "lr_schedule", "lr_decay_epochs",
    "momentum", "weight_decay", "sparta_weight_decay", "objective", "eps", "pgd_steps",
    "pgd_step_size", "trades_beta", "seed", "mixed_precision", "jit_compile",
    "checkpoint_every", "eval_pgd_steps")


class ConfigMismatchError(ValueError):
    """model_dir holds a run of another configuration."""


class SetupError(ValueError):
    """The run cannot start as asked (a strategy without its cluster, an option it lacks)."""


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or Inf."""


class WriteError(RuntimeError):
    """A file of the run could not be written (a full disk, a read-only folder)."""


@contextlib.contextmanager
def writing(path, errors=(OSError,)):
    """Runs a block that writes `path`: an error of `errors` in it stops the run.

    Raises:
        WriteError: the block raised one of `errors` (a full disk, a folder that is not
            writable); one line that names `path` and the cause.
    """
    try:
        yield
    except WriteError:
        raise
    except errors as e:
        cause = " ".join(str(e).split())  # one line
        if cause.startswith("{{"):  # TensorFlow's name of the op that failed
            cause = cause.split("}}", 1)[1].strip()
        if len(cause) > 300:  # the reason ("File too large") comes last
            cause = f"{cause[:140]} ... {cause[-140:]}"
        raise WriteError(
            f"Could not write {path} ({type(e).__name__}: {cause}). Training stopped; what "
            "was written before is kept. Free some space (or make the folder writable) and "
            "rerun the same command: it resumes from the last checkpoint.") from e


@dataclasses.dataclass
class TrainConfig:
    """Everything one training run depends on; saved to model_dir/config.json."""

    model_dir: str = "runs/default"
    dataset: str = "bundled"
    data_dir: str | None = None
    max_extract_gb: float = 16.0  # the most a .tar.gz dataset may expand to (archive.py)
    max_extract_ratio: float = 100.0  # ... and as a multiple of its own size
    max_train: int | None = None
    max_test: int | None = None
    model: str = "resnet18"
    activation: str = "sparta"
    width_multiplier: float = 0.25
    sparta_sharing: str = "layer"
    sparta_kernel_size: int = 3
    sparta_beta0: float = 1.0
    sparta_custom_gradient: bool = True
    sparta_normalize_gate_input: bool = False
    sparta_from: str | None = None  # a model_dir or .keras file: copy its Sparta, frozen
    sparta_from_sha256: str | None = None  # `transfer.fingerprint` of that source
    gates_from: str | None = None  # a model_dir or .keras file: copy all but its activations,
    gates_from_sha256: str | None = None  # frozen; `transfer.network_fingerprint` of it
    denoise: str = "none"
    epochs: int = 5
    batch_size: int = 128
    lr: float = 0.1
    lr_schedule: str = "piecewise"
    lr_decay_epochs: tuple = ()
    momentum: float = 0.9
    weight_decay: float = 5e-4
    sparta_weight_decay: bool = True
    sparta_lr_multiplier: float = 1.0
    objective: str = "pgd"
    eps: float = 8 / 255
    pgd_steps: int = 3
    pgd_step_size: float | None = None  # None: 2.5 * eps / pgd_steps
    trades_beta: float = 6.0
    seed: int = 0
    mixed_precision: str = "float32"
    jit_compile: bool = False
    strategy: str = "mirrored"
    checkpoint_every: int = 100
    eval_pgd_steps: int = 20  # 0: no PGD evaluation after training
    backend: str | None = None  # Keras's backend; None: the one running (`training.run`)

    # The fields that may change when a run resumes: where things are, how far an archive
    # may expand, how long it trains, how often it saves, how it is evaluated at the end,
    # how the step is compiled and distributed. Every other field is the experiment's
    # identity (`identity`): a model_dir whose config differs in one of them holds another
    # experiment.
    RESUMABLE = ("model_dir", "data_dir", "max_extract_gb", "max_extract_ratio", "max_test",
                 "epochs", "checkpoint_every", "eval_pgd_steps", "jit_compile", "strategy",
                 "sparta_from", "gates_from")

    def identity(self):
        """The experiment this config describes: every field but `RESUMABLE`, as in JSON.

        A dataset given as a path counts by its name (`cifar10-jpeg.tar.gz`), not by where
        it lies: the same archive moved to another folder or machine is the same data. The
        backend counts too (None: the one running): a run on JAX is not resumed on
        TensorFlow, nor taken for one.
        """
        values = {k: v for k, v in json.loads(json.dumps(self.to_json())).items()
                  if k not in self.RESUMABLE}
        values["dataset"] = os.path.basename(os.path.normpath(values["dataset"]))
        values["backend"] = values["backend"] or keras.backend.backend()
        return values

    def activation_kwargs(self):
        if self.activation not in SPARTA_FAMILY:
            return {}
        return {"kernel_size": self.sparta_kernel_size, "beta0": self.sparta_beta0,
                "use_custom_gradient": self.sparta_custom_gradient,
                "normalize_gate_input": self.sparta_normalize_gate_input}

    def to_json(self):
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def complete(cls, stored):
        """A stored config.json with the defaults of the fields added after it was written
        (without the marker `WRITTEN_BY`).

        A config.json without `backend` was written when sparta-tf ran on TensorFlow only.
        """
        stored = {k: v for k, v in stored.items() if k not in WRITTEN_BY}
        return {**json.loads(json.dumps(cls().to_json())), "backend": "tensorflow", **stored}

    @classmethod
    def from_stored(cls, stored, whole=False):
        """The config of a stored config.json (or part of one; defaults for the rest).

        Every key must be a field (or of the marker `WRITTEN_BY`), and every value of the
        field's type, as JSON holds it. With `whole`, `stored` must be a whole config.json
        of sparta-train: one with the marker, or one written before the marker existed,
        which holds every field of `FIRST_FIELDS`.

        Raises:
            ValueError: it is not; the message names the first key or value that is wrong,
                and fills in nothing.
        """
        kinds = {f.name: getattr(f.type, "__args__", None) or (f.type,)
                 for f in dataclasses.fields(cls)}

        def fits(value, kind):  # as JSON holds it: a float may be written as an int
            if isinstance(value, bool) or kind is bool:
                return isinstance(value, bool) and kind is bool
            if kind is tuple:
                return isinstance(value, (list, tuple)) and all(
                    isinstance(v, (int, float, str)) and not isinstance(v, bool) for v in value)
            return isinstance(value, (int, float) if kind is float else kind)

        marker = {k: stored[k] for k in WRITTEN_BY if k in stored}
        if marker.get("written_by", WRITTEN_BY["written_by"]) != WRITTEN_BY["written_by"]:
            raise ValueError(f"it says it was written by {marker['written_by']!r}.")
        version = marker.get("config_format", 1)
        if not (type(version) is int and 1 <= version <= WRITTEN_BY["config_format"]):
            raise ValueError(f"its config_format is {version!r}; this sparta-tf reads "
                             f"{WRITTEN_BY['config_format']} (a newer one wrote it?).")
        for key, value in stored.items():
            if key in WRITTEN_BY:
                continue
            if key not in kinds:
                raise ValueError(f"it holds {key!r}, which is no setting of sparta-train.")
            if not any(fits(value, kind) for kind in kinds[key]):
                names = {str: "a string", int: "an integer", float: "a number",
                         bool: "true or false", tuple: "a list", type(None): "null"}
                wanted = " or ".join(names[k] for k in kinds[key])
                raise ValueError(f"its {key!r} is {json.dumps(value)[:50]}, not {wanted}.")
        if whole and "written_by" not in marker:
            missing = [k for k in FIRST_FIELDS if k not in stored]
            if missing:
                raise ValueError(f"it has no \"written_by\": \"sparta-train\", and no "
                                 f"{', '.join(map(repr, missing[:3]))}"
                                 f"{' ...' if len(missing) > 3 else ''} either.")
        return cls(**cls.complete(stored))


def learning_rate(config, steps_per_epoch):
    """Per-step schedule: piecewise (/10 at each of lr_decay_epochs), cosine (from lr to 0),
    or onecycle: up from 0 to lr in a straight line over the first `ONECYCLE_WARMUP` of
    the steps, then down to 0 along a cosine (the shape of PyTorch's OneCycleLR). Such a
    cycle, linear on both sides, made 10 to 15 epochs of adversarial training enough in
    Wong et al. (2020), "Fast is better than free"."""
    total = config.epochs * steps_per_epoch
    if config.lr_schedule == "cosine":
        return keras.optimizers.schedules.CosineDecay(config.lr, max(total, 1))
    if config.lr_schedule == "onecycle":
        warmup = max(1, round(ONECYCLE_WARMUP * total))
        return keras.optimizers.schedules.CosineDecay(
            0.0, max(total - warmup, 1), warmup_target=config.lr, warmup_steps=warmup)
    if config.lr_schedule != "piecewise":
        raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}; got {config.lr_schedule!r}.")
    if not config.lr_decay_epochs:
        return config.lr
    boundaries = [int(e * steps_per_epoch) for e in config.lr_decay_epochs]
    values = [config.lr * 0.1 ** i for i in range(len(boundaries) + 1)]
    return keras.optimizers.schedules.PiecewiseConstantDecay(boundaries, values)


def stalled(loss, num_classes, epoch, objective="pgd"):
    """Whether the training loss is still at chance, ln(num_classes) within 2%, after
    `epoch` >= 3 epochs: the network is not learning. SiLU and Sparta can do that in a
    ResNet-34 (docs/TRANSFER.md). Never under TRADES, whose loss adds a KL term."""
    return objective != "trades" and epoch >= 3 and loss >= 0.98 * math.log(num_classes)
