"""Adversarial training on JAX: the stateless train step, its loop, and its checkpoints.

`TrainStep.train_step(state, batch)` is `AdversarialModel`'s step on this backend, the
stateless twin of the TensorFlow one: the same seed, attack and loss, with the gradient
from `jax.value_and_grad` and the update from `optimizer.stateless_apply`. `run(config)` is
`training.run` on JAX: one device, no TensorFlow needed (the data comes from
`data.numpy_batches`). It checkpoints every epoch and every `checkpoint_every` steps as a
folder `checkpoints/ckpt-N/`: `state.npz` (every variable of the training state: the
weights, the optimizer's variables and the metrics' partial sums, with their paths) and
`position.json` (epoch and step), written to a temporary folder and renamed into place.
A resumed epoch's metrics go on from those sums, so its row of metrics.jsonl is an
unbroken run's. A checkpoint written before state.npz (Keras's `state.weights.h5`, without
the sums) resumes too, and the row then says from which step its metrics count
(`metrics_from_step`). A checkpoint, metrics row or model that cannot be written stops the
run in one `training.WriteError`. The data position is the (epoch, step) counter: the
batches of an epoch depend only on (seed, epoch), so a killed run resumes on the same
batches and the same PGD noise. A run ends in `training.finish`, as on TensorFlow:
model.keras, then clean and PGD accuracy under the one evaluation protocol
(`sparta_tf.protocol`, its batches compiled by `sparta_tf/backend/jax.py`), in results.json.
What stays TensorFlow's (MirroredStrategy and multi-worker jobs, the SavedModel export,
ART's AutoAttack) is refused here by name.
"""

import json
import math
import os
import shutil
import tempfile
import time

import jax
import jax.numpy as jnp
import keras
import numpy as np

from sparta_tf import data, model_dir, training
from sparta_tf.config import NonFiniteLossError, SetupError

POSITION = "position.json"
# NumPy's, not Keras's HDF5 (`Model.save_weights`): HDF5 cannot fail a write cleanly, and
# on a full disk it crashed the process (a segfault closing the file in h5py).
STATE = "state.npz"
KERAS_STATE = "state.weights.h5"  # in checkpoints written before STATE
KEEP = 2  # checkpoints kept


class TrainStep:
    """`AdversarialModel.train_step` on JAX: seed, attack, loss, update, all stateless."""

    def train_step(self, state, batch):
        trainable, non_trainable, optimizer_vars, metrics_vars = state
        x, y = batch
        iterations = optimizer_vars[_index_of(self.optimizer.variables,
                                              self.optimizer.iterations)]
        seed = jnp.stack([jnp.asarray(self.seed, "int32"), iterations.astype("int32")])

        def inference(images, training=False):
            return self.stateless_call(trainable, non_trainable, images, training=training)[0]

        x_adv = self.adversarial_examples(inference, x, y, seed)

        def loss_fn(values):
            updated = [non_trainable]  # batch statistics, threaded through each forward

            def forward(images):
                logits, updated[0] = self.stateless_call(values, updated[0], images,
                                                         training=True)
                return logits

            loss, total, logits, adv_logits = self.total_loss(forward, x, y, x_adv, values)
            return self.optimizer.scale_loss(total), (loss, logits, adv_logits, updated[0])

        (_, (loss, logits, adv_logits, non_trainable)), grads = jax.value_and_grad(
            loss_fn, has_aux=True)(trainable)
        trainable, optimizer_vars = self.optimizer.stateless_apply(
            optimizer_vars, self.scaled_gradients(grads), trainable)
        metrics_vars, logs = self._stateless_metrics(metrics_vars, loss, y, logits, adv_logits)
        return logs, (trainable, non_trainable, optimizer_vars, metrics_vars)

    def _stateless_metrics(self, values, loss, y, logits, adv_logits):
        """The metrics of `self.metrics` updated from `values`: (new values, logs)."""
        new, logs, start = [], {}, 0
        for metric in self.metrics:
            own = values[start:start + len(metric.variables)]
            start += len(own)
            if metric is self.loss_tracker:
                own = metric.stateless_update_state(own, loss)
            else:
                own = metric.stateless_update_state(
                    own, y, logits if metric is self.clean_acc else adv_logits)
            logs[metric.name] = metric.stateless_result(own)
            new += own
        return new, logs


def _index_of(variables, variable):
    return next(i for i, v in enumerate(variables) if v is variable)


def _metric_variables(model):
    """The variables of `model.metrics` (their running totals and counts), in order."""
    return [v for metric in model.metrics for v in metric.variables]


def _groups(model):
    """The (trainable, non-trainable, optimizer, metrics) variables of `model`."""
    return (model.trainable_variables, model.non_trainable_variables,
            model.optimizer.variables, _metric_variables(model))


def _state(model):
    """The (trainable, non-trainable, optimizer, metrics) values of `model`."""
    return tuple([v.value for v in group] for group in _groups(model))


def _assign(model, state):
    """Writes `state` back into `model`'s variables (to save, check or evaluate them)."""
    for group, values in zip(_groups(model), state):
        for variable, value in zip(group, values):
            variable.assign(value)


def run(config, overwrite, verbose):
    """`training.run` on JAX (see the module docstring)."""
    if config.strategy != "mirrored":
        raise SetupError(f"--strategy={config.strategy} needs TensorFlow; on the jax backend "
                         "sparta-train runs on one device.")
    from sparta_tf import adversarial  # here: adversarial imports this module's TrainStep
    config, sources, ds, steps = training.prepare(config)
    model = adversarial.build(config, ds.num_classes, ds.x_train.shape[1:], steps, sources)
    model(np.zeros((1, *ds.x_train.shape[1:]), "float32"))  # built: stateless_call needs it
    with training.holding(config, overwrite):
        training.prepare_model_dir(config, overwrite)
        return _train(config, model, ds, steps, verbose)


def _train(config, model, ds, steps, verbose):
    checkpoints = Checkpoints(os.path.join(config.model_dir, model_dir.CHECKPOINTS))
    epoch, skip, sums = checkpoints.restore(model)
    if skip >= steps:
        epoch, skip, sums = epoch + 1, 0, None
    training.report_position(config, epoch, skip, steps)
    step = jax.jit(model.train_step, donate_argnums=0)
    for epoch in range(epoch, config.epochs):
        print(f"Epoch {epoch + 1}/{config.epochs}")
        for metric in model.metrics:
            metric.reset_state()
        if skip and sums is not None:  # a resumed epoch's metrics go on from the checkpoint's
            for variable, value in zip(_metric_variables(model), sums):
                variable.assign(value)
        state, bad, start = _state(model), None, time.perf_counter()
        bar = keras.utils.Progbar(steps, verbose=1 if verbose == "auto" else verbose)
        bar.update(skip)
        batches = data.numpy_batches(ds.x_train, ds.y_train, config.batch_size, config.seed,
                                     epoch, skip_batches=skip)
        for i, batch in enumerate(batches, start=skip + 1):
            logs, state = step(state, batch)
            logs = {k: float(v) for k, v in logs.items()}
            if not math.isfinite(logs["loss"]):
                bad = f"step {i}"
                break
            if config.checkpoint_every and i % config.checkpoint_every == 0 and i < steps:
                _assign(model, state)
                if not _finite(model):
                    bad = f"step {i}"
                    break
                checkpoints.save(model, epoch, i)
            bar.update(i, list(logs.items()))
        _assign(model, state)
        if bad is None and not _finite(model):
            bad = "the end of the epoch"
        if bad is not None:
            raise NonFiniteLossError(
                f"The loss or the weights became NaN or Inf in epoch {epoch + 1} (found at "
                f"{bad}). Training stopped; the last good checkpoint ({checkpoints.latest()}) "
                "is kept. Try a lower --lr.")
        seconds = time.perf_counter() - start
        lr = float(keras.ops.convert_to_numpy(model.optimizer.learning_rate))
        row = {"epoch": epoch + 1, "lr": lr,
               "img/s": (steps - skip) * config.batch_size / max(seconds, 1e-9), **logs}
        if skip and sums is None:  # resumed from a checkpoint without the metrics' sums
            row["metrics_from_step"] = skip + 1
        with training.writing(os.path.join(config.model_dir, model_dir.METRICS_FILE)):
            training.log_epoch(config.model_dir, row)  # first: a kill before the save reruns
        checkpoints.save(model, epoch + 1, 0)          # the epoch's end, and rewrites its row
        training.warn_if_stalled(config, row, ds.num_classes)
        skip, sums = 0, None
    return training.finish(config, model.model, ds)


def _finite(model):
    return all(np.isfinite(keras.ops.convert_to_numpy(v)).all() for v in model.model.weights)


class Checkpoints:
    """Checkpoints in `folder`: `ckpt-N/` holding STATE (the values of `_state` and their
    variables' paths) and POSITION ((epoch, step)); or KERAS_STATE for STATE, in those
    written before it."""

    def __init__(self, folder):
        self.folder = folder

    def _numbers(self):
        if not os.path.isdir(self.folder):
            return []
        return sorted(int(name[5:]) for name in os.listdir(self.folder)
                      if name.startswith("ckpt-") and name[5:].isdigit())

    def latest(self):
        numbers = self._numbers()
        return os.path.join(self.folder, f"ckpt-{numbers[-1]}") if numbers else None

    def save(self, model, epoch, step):
        """Writes ckpt-N (N one more than the last) whole, then drops all but the last KEEP.

        Raises:
            training.WriteError: it could not be written (nothing of it is left).
        """
        numbers = self._numbers()
        number = (numbers[-1] if numbers else 0) + 1
        variables = [v for group in _groups(model) for v in group]
        with training.writing(os.path.join(self.folder, f"ckpt-{number}"), Exception):
            os.makedirs(self.folder, exist_ok=True)
            partial = tempfile.mkdtemp(prefix=f"ckpt-{number}_temp-", dir=self.folder)
            try:
                values = {f"v{i}": keras.ops.convert_to_numpy(v) for i, v in enumerate(variables)}
                np.savez(os.path.join(partial, STATE),
                         paths=np.array([v.path for v in variables]), **values)
                with open(os.path.join(partial, POSITION), "w") as f:
                    json.dump({"epoch": epoch, "step": step}, f)
                os.rename(partial, os.path.join(self.folder, f"ckpt-{number}"))
            finally:
                shutil.rmtree(partial, ignore_errors=True)
        for old in (numbers + [number])[:-KEEP]:
            shutil.rmtree(os.path.join(self.folder, f"ckpt-{old}"), ignore_errors=True)

    def restore(self, model):
        """Restores the newest readable checkpoint into `model`; returns its (epoch, step,
        the values of the metrics' variables or None if it has none), (0, 0, None) if there
        is no checkpoint.

        Raises:
            SetupError: the folder holds TensorFlow checkpoints, or checkpoints of which
                none can be read.
        """
        if os.path.isfile(os.path.join(self.folder, "checkpoint")):
            raise SetupError(f"{self.folder} holds TensorFlow checkpoints: resume this run on "
                             "the tensorflow backend.")
        numbers = self._numbers()
        for number in reversed(numbers):
            path = os.path.join(self.folder, f"ckpt-{number}")
            try:
                sums = _load(model, path)
                position = model_dir.read_json(os.path.join(path, POSITION))
                return int(position["epoch"]), int(position["step"]), sums
            except Exception as e:  # a damaged file fails in many ways
                print(f"Warning: checkpoint {path} cannot be read ({type(e).__name__}: "
                      f"{str(e).splitlines()[0][:200] if str(e) else ''}); trying an older one.")
        if numbers:
            raise SetupError(f"No checkpoint in {self.folder} can be read. Use --overwrite to "
                             "start again, or restore the folder from a backup.")
        return 0, 0, None


def _load(model, path):
    """Restores checkpoint folder `path` into `model`; returns the values of the metrics'
    variables that it holds, or None (one written before STATE).

    Raises:
        ValueError: it holds the variables of another model.
    """
    if not os.path.exists(os.path.join(path, STATE)):
        model.load_weights(os.path.join(path, KERAS_STATE))
        return None
    variables = [v for group in _groups(model) for v in group]
    with np.load(os.path.join(path, STATE), allow_pickle=False) as saved:
        if saved["paths"].tolist() != [v.path for v in variables]:
            raise ValueError(f"{STATE} holds the variables of another model.")
        values = [saved[f"v{i}"] for i in range(len(variables))]
    for variable, value in zip(variables, values):
        variable.assign(value)
    return values[len(values) - len(_metric_variables(model)):]
