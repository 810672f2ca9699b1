"""Training runs: `run(config)` on the Keras backend in use, and the model_dir's lifecycle.

`run(config)` is the whole experiment behind `sparta-train`: read the data, build the
model (`adversarial.build`), hold and prepare `config.model_dir`, train with resume from
its checkpoints, then save model.keras and evaluate it. The training loop is the
backend's: `sparta_tf/backend/tensorflow_trainer.py` (MirroredStrategy, multi-worker,
tf.train checkpoints) or `jax_trainer.py` (one device, NumPy checkpoints). What
both share lives here: the model_dir's preparation (the config check, `--overwrite`, the
lock, what a killed run left half-written), the metrics rows, `finished`, the final
evaluation (`finish`, under the project's one PGD protocol, `sparta_tf.protocol`) and the
summary. A file of the run that cannot be written (a full disk) stops it in one
`WriteError` that names the file (`writing`), on either backend.
This module imports no TensorFlow; `TrainConfig` and its errors come from
`sparta_tf.config` and are named here too.
"""

import contextlib
import dataclasses
import json
import math
import os
import shutil
import zipfile

import keras

from sparta_tf import data, model_dir, protocol, transfer
from sparta_tf.config import (  # noqa: F401  (the names users know from here)
    LR_SCHEDULES, OBJECTIVES, STRATEGIES, ConfigMismatchError, NonFiniteLossError, SetupError,
    WRITTEN_BY, TrainConfig, WriteError, learning_rate, stalled)

BACKENDS = ("tensorflow", "jax")


def run(config, overwrite=False, verbose="auto"):
    """Trains (or resumes) `config`, then evaluates and saves the model.

    Returns a dict of results, also written to model_dir/results.json; in a
    multi-worker job, None on the workers other than the chief. The global
    Keras dtype policy is as it was before, whatever happens.

    Raises:
        SetupError: the run cannot start as asked, for example on a backend other than
            the config's.
    """
    backend = keras.backend.backend()
    if backend not in BACKENDS:
        raise SetupError(f"sparta-train runs on the Keras backends {BACKENDS}, not on "
                         f"{backend!r}.")
    if config.backend not in (None, backend):
        raise SetupError(f"The config is for the {config.backend} backend, and Keras runs "
                         f"on {backend} (KERAS_BACKEND).")
    config = dataclasses.replace(config, backend=backend)
    policy = keras.config.dtype_policy()
    try:
        if backend == "jax":
            from sparta_tf.backend import jax_trainer as trainer
        else:
            from sparta_tf.backend import tensorflow_trainer as trainer
        return trainer.run(config, overwrite, verbose)
    finally:
        keras.config.set_dtype_policy(policy)


def prepare(config):
    """What a run needs before it writes anything: `(config, sources, data, steps)`.

    The config with its sources' fingerprints and the source models (`with_sources`), the
    dataset and the steps per epoch; the seeds and the dtype policy are set.

    Raises:
        SetupError: the batch is larger than the training set.
    """
    config, sources = with_sources(config)
    ds = data.load(config.dataset, config.data_dir, config.max_train, config.max_test,
                   seed=config.seed, max_extract_gb=config.max_extract_gb,
                   max_extract_ratio=config.max_extract_ratio)
    keras.utils.set_random_seed(config.seed)
    keras.config.set_dtype_policy(config.mixed_precision)
    steps = data.steps_per_epoch(len(ds.x_train), config.batch_size)
    if steps == 0:
        raise SetupError(f"--batch_size={config.batch_size} is larger than the "
                         f"{len(ds.x_train)} training images: no full batch to train on.")
    return config, sources, ds, steps


@contextlib.contextmanager
def holding(config, overwrite, chief=True):
    """Holds `config.model_dir` (`model_dir.lock`) while the block runs; on the chief only.

    With `overwrite`, a folder that is not a model_dir of sparta-train is refused before
    anything is written into it (`model_dir.check_deletable`).

    Raises:
        model_dir.NotAModelDirError: `overwrite`, and the folder is not a model_dir.
        model_dir.LockedError: another run holds it.
        WriteError: the folder or its lock cannot be created.
    """
    if not chief:  # the other workers of a job write only their own folder in it
        yield
        return
    if overwrite:
        model_dir.check_deletable(config.model_dir, _stored_config)
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(model_dir.lock(config.model_dir))
        except OSError as e:  # the lock's errors only, not the block's
            raise WriteError(f"--model_dir={config.model_dir} cannot be written ({e}). "
                             "Give a folder you can write to.") from None
        yield


def _stored_config(path):
    """The TrainConfig in config.json `path`, which sparta-train wrote
    (`TrainConfig.from_stored`).

    Raises:
        ConfigMismatchError: the file is not a config.json of sparta-train (or cannot be
            read); the message says why, and fills in nothing.
    """
    try:
        stored = model_dir.read_json(path)
    except OSError as e:
        raise ConfigMismatchError(f"{path} cannot be read ({e.strerror}).") from None
    except ValueError as e:
        raise ConfigMismatchError(f"{e} It is not a config.json of sparta-train.") from None
    try:
        if not isinstance(stored, dict):
            raise ValueError(f"it holds a JSON {type(stored).__name__}, not an object.")
        return TrainConfig.from_stored(stored, whole=True)
    except (ValueError, TypeError) as e:
        raise ConfigMismatchError(
            f"{path} is not a config.json of sparta-train: {e}") from None


def prepare_model_dir(config, overwrite, chief=True):
    """Refuse a model_dir of another configuration; returns True if it can resume.

    Only the chief deletes (`overwrite`: a model_dir of sparta-train only, see
    `model_dir.clear`), removes what a killed run left half-written, and writes config.json
    (with the mark of sparta-train, `config.WRITTEN_BY`).

    Raises:
        ConfigMismatchError: model_dir holds another configuration, or a config.json that
            is not sparta-train's.
        model_dir.NotAModelDirError: `overwrite`, and the folder is not a model_dir.
        WriteError: the folder cannot be written.
    """
    path = os.path.join(config.model_dir, model_dir.CONFIG)
    try:
        if overwrite and chief:
            model_dir.clear(config.model_dir, _stored_config)
        os.makedirs(config.model_dir, exist_ok=True)
        if chief:
            _remove_leftovers(config.model_dir)
    except OSError as e:
        raise WriteError(f"--model_dir={config.model_dir} cannot be written ({e}).") from None
    resume = os.path.exists(path)
    if resume:
        try:
            old = _stored_config(path).identity()
        except ConfigMismatchError as e:
            raise ConfigMismatchError(
                f"{e} Use another --model_dir, or move {config.model_dir} away.") from None
        new = config.identity()
        diff = {k: (old.get(k), v) for k, v in new.items() if old.get(k) != v}
        if diff:
            lines = "\n".join(f"  {k}: {a!r} in model_dir, {b!r} now" for k, (a, b) in diff.items())
            raise ConfigMismatchError(
                f"{config.model_dir} holds a run of another configuration:\n{lines}\n"
                "Use another --model_dir, or --overwrite to delete it and start again.")
    if chief:  # another worker may be reading it
        try:
            model_dir.write_json(path, {**WRITTEN_BY, **config.to_json()})
        except OSError as e:
            raise WriteError(f"{path} cannot be written ({e}).") from None
    return resume


def _remove_leftovers(folder):
    """Removes what a run killed while writing left behind: the temporary files of
    `model_dir.atomic_path` and the `ckpt-N_temp*` of an unfinished checkpoint save."""
    checkpoints = os.path.join(folder, model_dir.CHECKPOINTS)
    for parent in (folder, checkpoints):
        if not os.path.isdir(parent) or os.path.islink(parent):
            continue
        for name in os.listdir(parent):
            full = os.path.join(parent, name)
            if model_dir.is_temporary(name) or (parent == checkpoints and "_temp" in name):
                if os.path.isdir(full) and not os.path.islink(full):
                    shutil.rmtree(full)
                else:
                    os.remove(full)


def finished(config):
    """Whether `config.model_dir` holds this experiment trained to the end: a readable
    model.keras (a zip archive), and a config.json of the same identity and the same
    epochs (checkpoints or not)."""
    path = os.path.join(config.model_dir, model_dir.CONFIG)
    model = os.path.join(config.model_dir, model_dir.MODEL)
    if not (os.path.isfile(path) and zipfile.is_zipfile(model)):
        return False
    try:
        stored = _stored_config(path)
    except ConfigMismatchError:
        return False
    return stored.identity() == config.identity() and stored.epochs == config.epochs


def _with_source(config, field, fingerprint, what):
    """`config` with `{field}_sha256` filled in, and the model its `field` names (or None).
    A `{seed}` in the path stands for `config.seed`."""
    if not getattr(config, field):
        return config, None
    path = getattr(config, field).replace("{seed}", str(config.seed))
    source = transfer.load(path)
    sha, stored = fingerprint(source), getattr(config, f"{field}_sha256")
    if stored not in (None, sha):
        raise transfer.TransferError(f"The {what} of {path} has sha256 {sha}, not {stored} as "
                                     "the configuration says: it changed.")
    return dataclasses.replace(config, **{f"{field}_sha256": sha}), source


def with_sparta_source(config):
    """`config` with `sparta_from_sha256` filled in, and the source model (or None).

    Raises:
        FileNotFoundError: `config.sparta_from` holds no model.
        transfer.TransferError: it is not the source that the config names.
    """
    return _with_source(config, "sparta_from", transfer.fingerprint, "Sparta")


def with_gates_source(config):
    """`config` with `gates_from_sha256` filled in, and the source model (or None): the
    trained network whose weights the gates-only probe keeps (`--gates_from`). A
    `{seed}` in the path stands for `config.seed`.

    Raises:
        FileNotFoundError: `config.gates_from` holds no model.
        transfer.TransferError: it is not the network that the config names.
    """
    return _with_source(config, "gates_from", transfer.network_fingerprint, "network")


def with_sources(config):
    """`config` with both sources' fingerprints, and `{"sparta_from": model, "gates_from":
    model}` of the sources it names (`with_sparta_source`, `with_gates_source`)."""
    config, sparta = with_sparta_source(config)
    config, gates = with_gates_source(config)
    found = {"sparta_from": sparta, "gates_from": gates}
    return config, {k: v for k, v in found.items() if v is not None}


def log_epoch(folder, row, summaries=None):
    """Writes `row` to folder/metrics.jsonl, and passes it to `summaries` (TensorBoard).

    Rows of this epoch and later ones already there are dropped first: they belong to
    an earlier run of the model_dir (retrained from scratch, its checkpoints gone, or
    killed after the row was written and before its checkpoint), not to this one. So is
    a line that is not a row (damaged), with a warning that names it.
    """
    path = os.path.join(folder, model_dir.METRICS_FILE)
    rows = []
    if os.path.isfile(path):
        with open(path, encoding="utf-8", errors="replace") as f:
            for number, line in enumerate(f, 1):
                try:
                    if json.loads(line)["epoch"] < row["epoch"]:
                        rows.append(line.rstrip("\n") + "\n")
                except (ValueError, TypeError, KeyError, IndexError):
                    if line.strip():
                        print(f"Warning: line {number} of {path} is not a row of metrics "
                              f"({line.strip()[:60]!r}); it is dropped.")
    model_dir.write_text(path, "".join(rows + [json.dumps(row) + "\n"]))
    if summaries is not None:
        summaries(row)


def report_position(config, epoch, skip, steps):
    """Prints where a run starts: resumed, or trained already."""
    if epoch >= config.epochs:
        print(f"{config.model_dir} is trained for {epoch} epochs; evaluating it again.")
    elif epoch or skip:
        print(f"Resuming {config.model_dir} at epoch {epoch + 1}, step {skip} of {steps}.")


def warn_if_stalled(config, row, num_classes):
    """Prints a warning if the epoch's loss is still at chance (`stalled`)."""
    if stalled(row["loss"], num_classes, row["epoch"], config.objective):
        print(f"Warning: after {row['epoch']} epochs the training loss ({row['loss']:.3f}) is "
              f"still at chance (ln {num_classes} = {math.log(num_classes):.3f}): "
              "the network is not learning. Try a lower --lr.")


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


def save_model(config, net, ds):
    """Writes `net` as model_dir/model.keras, and the class names beside it (atomically).

    Raises:
        WriteError: either file could not be written; the old one is left as it was.
    """
    path = os.path.join(config.model_dir, model_dir.MODEL)
    with writing(path, Exception), model_dir.atomic_path(path) as tmp:  # Keras wraps errors
        net.save(tmp)
    path = os.path.join(config.model_dir, model_dir.CLASS_NAMES)
    with writing(path):
        model_dir.write_json(path, ds.class_names)


def eval_protocol(config):
    """The PGD protocol of a run's final evaluation (`sparta_tf.protocol`): PGD with
    `eval_pgd_steps` steps at `eps` (whatever the objective), seeded with the run's seed."""
    return protocol.Protocol(eps=config.eps, steps=config.eval_pgd_steps, seed=config.seed)


def finish(config, net, ds):
    """The end of a run on either backend: saves `net` as model_dir/model.keras (and the
    class names beside it), evaluates its clean and PGD accuracy under `eval_protocol`
    (`protocol.correct`; PGD only if `eval_pgd_steps`) and writes results.json, which names
    the protocol.

    Raises:
        WriteError: model.keras, class_names.json or results.json could not be written.
    """
    save_model(config, net, ds)
    pgd = eval_protocol(config)
    x, y = ds.x_test, ds.y_test
    results = {"clean_acc": float(protocol.correct(net, x, y, pgd, clean=True).mean())}
    if config.eval_pgd_steps:
        results[f"pgd{pgd.steps}_acc"] = float(protocol.correct(net, x, y, pgd).mean())
        results["protocol"] = pgd.to_json()
    return write_results(config, ds, results)


def write_results(config, ds, results):
    """Adds the sizes and eps to `results`, writes them to model_dir/results.json.

    Raises:
        WriteError: results.json could not be written.
    """
    results.update(eval_examples=int(len(ds.y_test)), train_examples=int(len(ds.x_train)),
                   eps=config.eps)
    path = os.path.join(config.model_dir, model_dir.RESULTS)
    with writing(path):
        model_dir.write_json(path, results)
    return results


def summary(config, results, minutes, export_dir):
    """A one-screen text summary of a finished run."""
    accs = "  ".join(f"{k.removesuffix('_acc')} {100 * v:.1f}%"
                     for k, v in results.items() if k.endswith("_acc"))
    return "\n".join([
        "=" * 64,
        f"model      {config.model} x{config.width_multiplier}, activation {config.activation}"
        + (f" (k={config.sparta_kernel_size}, beta0={config.sparta_beta0}, "
           f"sharing={config.sparta_sharing})" if config.activation == "sparta" else "")
        + (f", denoise {config.denoise}" if config.denoise != "none" else ""),
        *([f"Sparta     frozen, copied from {config.sparta_from} (its sha256 in "
           "config.json)"] if config.sparta_from else []),
        *([f"network    frozen, copied from {config.gates_from}: only the gates trained "
           "(its sha256 in config.json)"] if config.gates_from else []),
        f"data       {config.dataset}, {results['train_examples']} train / "
        f"{results['eval_examples']} test images",
        f"training   {config.objective}, {config.epochs} epochs, eps {config.eps * 255:.3g}/255, "
        f"PGD-{config.pgd_steps}" if config.objective != "standard" else
        f"training   standard, {config.epochs} epochs",
        f"test       {accs}  (PGD at eps {results['eps'] * 255:.3g}/255)",
        f"time       {minutes:.1f} min",
        f"model_dir  {config.model_dir}",
        f"exported   {export_dir}",
        "=" * 64,
    ])
