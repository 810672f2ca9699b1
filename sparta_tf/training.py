"""Training runs: `run(config)` on the Keras backend in use, and the model_dir's lifecycle.

`run(config)` is the whole experiment behind `sparta-train`, the same on every backend: read
the data, build the model (`adversarial.build`) on the devices of `--strategy`
(`sparta_tf/backend/<name>_distribute.py`), hold and prepare `config.model_dir`, resume from
its checkpoints (`sparta_tf.checkpoints`), train with Keras's `fit` one epoch at a time (each
epoch's batches depend only on (seed, epoch), so a resumed epoch starts at its step), with
`callbacks.Progress` doing the rest (checkpoints, metrics rows, TensorBoard, the NaN stop),
then save model.keras and evaluate it (`finish`, under the project's one PGD protocol,
`sparta_tf.protocol`). Only the train step is the backend's
(`sparta_tf/backend/<name>_trainer.py`). A file of the run that cannot be written (a full
disk) stops it in one `WriteError` that names the file (`config.writing`).
This module imports no TensorFlow; `TrainConfig` and its errors come from
`sparta_tf.config` and are named here too.
"""

import contextlib
import dataclasses
import os
import shutil
import zipfile

import keras

from sparta_tf import (adversarial, callbacks, checkpoints, data, model_dir, models, protocol,
                       transfer)
from sparta_tf.config import (  # noqa: F401  (the names users know from here)
    LR_SCHEDULES, OBJECTIVES, STRATEGIES, ConfigMismatchError, NonFiniteLossError, SetupError,
    WRITTEN_BY, TrainConfig, WriteError, learning_rate, stalled, writing)

if keras.backend.backend() == "jax":
    from sparta_tf.backend import jax_distribute as distribute
elif keras.backend.backend() == "tensorflow":
    from sparta_tf.backend import tensorflow_distribute as distribute

BACKENDS = ("tensorflow", "jax")


def run(config, overwrite=False, verbose="auto"):
    """Trains (or resumes) `config`, then evaluates and saves the model.

    Returns a dict of results, also written to model_dir/results.json; in a
    multi-worker job, None on the workers other than the chief. The global
    Keras dtype policy is as it was before, whatever happens.

    Raises:
        SetupError: the run cannot start as asked, for example on a backend other than
            the config's, or with a strategy that the backend lacks.
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
        devices = distribute.Devices(config.strategy, config.batch_size)  # TF: first
        if devices.workers > 1 and overwrite:
            raise SetupError("--overwrite is not supported with several workers: delete the "
                             "model_dir before starting them.")
        config, sources, ds, steps = prepare(config)
        with devices.scope():  # built first: a transfer that does not fit writes nothing
            model = adversarial.build(config, ds.num_classes, ds.x_train.shape[1:], steps,
                                      sources, synchronized=devices.synchronized)
        devices.prepare(model)
        with holding(config, overwrite, devices.chief):
            prepare_model_dir(config, overwrite, devices.chief)
            return _train(config, devices, model, ds, steps, verbose)
    finally:
        keras.config.set_dtype_policy(policy)


def _train(config, devices, model, ds, steps, verbose):
    """Resumes, trains the epochs left with `fit`, finishes."""
    saved = checkpoints.Checkpoints(os.path.join(config.model_dir, model_dir.CHECKPOINTS),
                                    write=devices.chief)
    epoch, skip, sums = saved.restore(model)  # the chief's, on every worker
    if skip >= steps:  # at an epoch's last step (the TF trainer of 0.1.0 wrote those)
        epoch, skip, sums = epoch + 1, 0, None
    report_position(config, epoch, skip, steps)
    progress = callbacks.Progress(config, saved, steps, ds.num_classes, devices.chief)
    for epoch in range(epoch, config.epochs):
        print(f"Epoch {epoch + 1}/{config.epochs}")
        progress.start(epoch, skip, sums)
        with devices.scope():
            history = model.fit(devices.batches(ds, config, epoch, skip), epochs=1,
                                steps_per_epoch=steps - skip, callbacks=[progress],
                                verbose=verbose if devices.chief else 0, shuffle=False)
        if progress.bad is not None:
            raise NonFiniteLossError(
                f"The loss or the weights became NaN or Inf in epoch {epoch + 1} (found at "
                f"{progress.bad}; loss {history.history['loss'][-1]}). Training stopped; the "
                f"last good checkpoint ({saved.latest()}) is kept. Try a lower --lr.")
        skip, sums = 0, None
    if not devices.chief:  # (never on JAX)
        devices.save_share(model.model, config.model_dir)
        return None
    return finish(config, model.model, ds, devices.count)


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


def report_position(config, epoch, skip, steps):
    """Prints where a run starts: resumed, or trained already."""
    if epoch >= config.epochs:
        print(f"{config.model_dir} is trained for {epoch} epochs; evaluating it again.")
    elif epoch or skip:
        print(f"Resuming {config.model_dir} at epoch {epoch + 1}, step {skip} of {steps}.")


def save_model(config, net, ds):
    """Writes `net` as model_dir/model.keras, and the class names beside it (atomically).

    Raises:
        WriteError: either file could not be written; the old one is left as it was.
    """
    path = os.path.join(config.model_dir, model_dir.MODEL)
    models.unsynchronize(net)  # so that the file loads on every backend
    with writing(path, Exception), model_dir.atomic_path(path) as tmp:  # Keras wraps errors
        net.save(tmp)
    path = os.path.join(config.model_dir, model_dir.CLASS_NAMES)
    with writing(path):
        model_dir.write_json(path, ds.class_names)


def eval_protocol(config):
    """The PGD protocol of a run's final evaluation (`sparta_tf.protocol`): PGD with
    `eval_pgd_steps` steps at `eps` (whatever the objective), seeded with the run's seed."""
    return protocol.Protocol(eps=config.eps, steps=config.eval_pgd_steps, seed=config.seed)


def finish(config, net, ds, devices=1):
    """The end of a run on either backend: saves `net` as model_dir/model.keras (and the
    class names beside it), evaluates its clean and PGD accuracy under `eval_protocol`
    (`protocol.correct`; PGD only if `eval_pgd_steps`) and writes results.json, which names
    the protocol and how many `devices` trained.

    Raises:
        WriteError: model.keras, class_names.json or results.json could not be written.
    """
    save_model(config, net, ds)
    pgd = eval_protocol(config)
    x, y = ds.x_test, ds.y_test
    results = {"clean_acc": float(protocol.correct(net, x, y, pgd, clean=True).mean()),
               "devices": devices}
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


def _count(n, word):
    return f"{n} {word}" + ("" if n == 1 else "s")


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
        f"training   {config.objective}, {_count(config.epochs, 'epoch')}, eps "
        f"{config.eps * 255:.3g}/255, PGD-{config.pgd_steps}" if config.objective != "standard"
        else f"training   standard, {_count(config.epochs, 'epoch')}",
        *([f"devices    {_count(results['devices'], 'device')} ({keras.backend.backend()})"]
          if "devices" in results else []),
        f"test       {accs}  (PGD at eps {results['eps'] * 255:.3g}/255)",
        f"time       {minutes:.1f} min",
        f"model_dir  {config.model_dir}",
        f"exported   {export_dir}",
        "=" * 64,
    ])
