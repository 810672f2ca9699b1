"""Adversarial training on TensorFlow: the train step, the strategy, checkpoints and resume.

`TrainStep.train_step` is `AdversarialModel`'s step on this backend: seed, attack, loss and
update under a `tf.GradientTape`, compiled by Keras with tf.function (XLA optional), and run
under `tf.distribute.MirroredStrategy` (one machine) or `MultiWorkerMirroredStrategy` (the
cluster of `TF_CONFIG`). `run(config)` is `training.run` on TensorFlow: it builds the data,
the model and the optimizer under the strategy, resumes from `config.model_dir` when it
can, and checkpoints (`tf.train.Checkpoint`: model, optimizer, the (epoch, step) position
and the metrics' partial sums) every epoch and every `checkpoint_every` steps. A resumed
epoch's metrics go on from those sums, so its row of metrics.jsonl is an unbroken run's; a
checkpoint written before they were saved resumes too, and the row then says from which
step its metrics count (`metrics_from_step`). A checkpoint, metrics row or model that cannot
be written stops the run in one `training.WriteError`: TensorFlow reports a full disk as
OutOfRangeError, which Keras's fit() would take for the end of the data, ending the epoch
early with its row written as complete. In a multi-worker job each worker reads its shard
of every global batch; the chief writes what a user sees (config, checkpoints, logs, model,
results), and the other workers keep their share of the collective saves in a hidden
folder of model_dir that they delete when done. All randomness (data order, augmentation,
PGD's random start) is stateless and keyed on (seed, epoch, step), so the checkpointed
counters are the whole RNG state: a killed run resumes with the same batches and the same
noise it would have seen. A run ends in `training.finish`, as on
JAX (model.keras, the evaluation under `sparta_tf.protocol`, results.json).
"""

import math
import os
import shutil
import time

import keras
import numpy as np
import tensorflow as tf

from sparta_tf import data, keras_private, model_dir, training
from sparta_tf.config import STRATEGIES, NonFiniteLossError, SetupError


class TrainStep:
    """`AdversarialModel.train_step` on TensorFlow: seed, attack, loss, update."""

    def train_step(self, batch):
        x, y = batch
        replica = tf.distribute.get_replica_context().replica_id_in_sync_group
        seed = tf.random.experimental.stateless_fold_in(
            tf.stack([tf.cast(self.seed, tf.int64),
                      tf.cast(self.optimizer.iterations, tf.int64)]), replica)
        x_adv = self.adversarial_examples(self.model, x, y, seed)
        variables = self.model.trainable_variables
        with tf.GradientTape() as tape:
            loss, total, logits, adv_logits = self.total_loss(
                lambda images: self.model(images, training=True), x, y, x_adv, variables)
            replicas = tf.distribute.get_strategy().num_replicas_in_sync
            scaled = self.optimizer.scale_loss(total / replicas)
        self.optimizer.apply(self.scaled_gradients(tape.gradient(scaled, variables)),
                             variables)
        self.loss_tracker.update_state(loss)
        if logits is not None:
            self.clean_acc.update_state(y, logits)
        if adv_logits is not None:
            self.adv_acc.update_state(y, adv_logits)
        logs = {m.name: m.result() for m in self.metrics}
        if self.logs_as_vectors:  # see `run`: for Keras' multi-worker reduce over axis 0
            logs = {name: tf.reshape(value, [1]) for name, value in logs.items()}
        return logs


def make_strategy(name):
    """The `tf.distribute` strategy `name` (one of `STRATEGIES`).

    Call it before any other TensorFlow op: a MultiWorkerMirroredStrategy must
    set up the runtime's collectives first. `multi_worker` reads the cluster
    and this process's task from the TF_CONFIG environment variable.
    """
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name != "multi_worker":
        raise ValueError(f"strategy must be one of {STRATEGIES}; got {name!r}.")
    if not os.environ.get("TF_CONFIG"):
        raise SetupError("strategy 'multi_worker' reads the cluster from the TF_CONFIG "
                         "environment variable, which is not set (see BUILD.md).")
    return tf.distribute.MultiWorkerMirroredStrategy()


def worker_of(strategy):
    """`(is_chief, index, count)` of this process among the workers of `strategy`."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True, 0, 1
    spec = resolver.cluster_spec().as_dict()
    has_chief = "chief" in spec
    count = len(spec.get("chief", [])) + len(spec.get("worker", []))
    index = resolver.task_id + (1 if has_chief and resolver.task_type == "worker" else 0)
    return index == 0, index, count


def _metric_variables(model):
    """The variables of `model.metrics` (their running totals and counts), in order."""
    return [v for metric in model.metrics for v in metric.variables]


class _Checkpointer(keras.callbacks.Callback):
    """Saves every `every` steps, stops on a non-finite loss or weight, adds img/s to logs.

    The epoch's last step is left to the end-of-epoch save, (epoch + 1, 0): a checkpoint
    at (epoch, steps) would resume into an empty epoch. `sums`: the values of the metrics'
    variables to start the epoch from (a resumed epoch's), or None (from 0).
    """

    def __init__(self, manager, position, epoch, skipped, every, batch_size, steps, sums=None):
        super().__init__()
        self.manager, self.position, self.epoch = manager, position, epoch
        self.skipped, self.every, self.batch_size = skipped, every, batch_size
        self.steps, self.sums = steps, sums
        self.bad_step = None

    def on_train_begin(self, logs=None):
        self.start, self.seen = time.perf_counter(), 0

    def on_epoch_begin(self, epoch, logs=None):
        if self.sums is not None:  # after fit() has reset the metrics
            for variable, value in zip(_metric_variables(self.model), self.sums):
                variable.assign(value)

    def throughput(self):
        return self.seen / max(time.perf_counter() - self.start, 1e-9)

    def on_train_batch_end(self, batch, logs=None):
        step = self.skipped + batch + 1
        self.seen += self.batch_size
        if logs is not None:
            logs["img/s"] = self.throughput()  # shown by the progress bar
        if logs and not math.isfinite(float(logs["loss"])):
            self.bad_step = f"step {step}"
            self.model.stop_training = True
        elif self.every and step % self.every == 0 and step < self.steps:
            if self.weights_finite(f"step {step}"):
                self.save(self.epoch, step)

    def weights_finite(self, where):
        """Whether every weight is finite; if not, stops training and notes `where`."""
        if all(np.isfinite(keras.ops.convert_to_numpy(v)).all()
               for v in self.model.model.weights):
            return True
        self.bad_step = where
        self.model.stop_training = True
        return False

    def save(self, epoch, step):
        """Saves the training state as at (epoch, step).

        Raises:
            training.WriteError: the checkpoint could not be written, whatever the error (a
                full disk is an OutOfRangeError, which fit() must not take for the end of
                the data).
        """
        self.position.assign([epoch, step])
        with training.writing(f"a checkpoint in {self.manager.directory}", Exception):
            self.manager.save()


def _restore(ckpt, folder, before_metrics):
    """Restores `ckpt` from the newest readable checkpoint in `folder`, if there is one.

    A checkpoint that cannot be read (truncated by a full disk, say) is reported and the
    older one that the manager keeps is tried. One written before the metrics' sums were
    saved is restored through `before_metrics`, the same checkpoint without them. Returns
    whether the checkpoint restored held the metrics' sums.

    Raises:
        SetupError: there are checkpoints, and none can be read.
    """
    try:
        state = tf.train.get_checkpoint_state(folder)
        candidates = list(state.all_model_checkpoint_paths) if state else []
    except tf.errors.OpError:  # the index file itself is damaged: take what is there
        candidates = sorted((p.removesuffix(".index") for p in
                             tf.io.gfile.glob(os.path.join(folder, "ckpt-*.index"))),
                            key=lambda p: int(p.rsplit("-", 1)[1]))
    for path in reversed(candidates):
        try:
            sums = any(name.startswith("metrics/") for name, _ in tf.train.list_variables(path))
            (ckpt if sums else before_metrics).restore(path).assert_existing_objects_matched()
            if not sums:  # the next save numbers on from it
                ckpt.save_counter.assign(before_metrics.save_counter)
            return sums
        except Exception as e:  # a damaged file fails in many ways (IndexError, DataLoss...)
            print(f"Warning: checkpoint {path} cannot be read ({type(e).__name__}: "
                  f"{str(e).splitlines()[0][:200]}); trying an older one.")
    if candidates:
        raise SetupError(f"No checkpoint in {folder} can be read. Use --overwrite to start "
                         "again, or restore the folder from a backup.")
    return False


def _epoch_data(strategy, ds, config, epoch, skip):
    """The epoch's batches from `skip` on: the global batches on one machine; with several
    workers, each worker's slices of them, as per-replica batches (`data.train_dataset`)."""
    def shard(context):
        batches = data.train_dataset(ds.x_train, ds.y_train, config.batch_size, config.seed,
                                     epoch, skip_batches=skip,
                                     num_shards=context.num_input_pipelines,
                                     shard=context.input_pipeline_id)
        per_replica = context.get_per_replica_batch_size(config.batch_size)
        if per_replica * context.num_input_pipelines != config.batch_size:  # several GPUs
            batches = batches.rebatch(per_replica, drop_remainder=True)
        return batches

    if worker_of(strategy)[2] == 1:  # tf.distribute splits each global batch over replicas
        return data.train_dataset(ds.x_train, ds.y_train, config.batch_size, config.seed,
                                  epoch, skip_batches=skip)
    return strategy.distribute_datasets_from_function(shard)


def run(config, overwrite, verbose):
    """`training.run` on TensorFlow (see the module docstring)."""
    strategy = make_strategy(config.strategy)  # first: before any other TensorFlow op
    chief, worker, workers = worker_of(strategy)
    if workers > 1 and overwrite:
        raise SetupError("--overwrite is not supported with several workers: delete the "
                         "model_dir before starting them.")
    from sparta_tf import adversarial  # here: adversarial imports this module's TrainStep
    config, sources, ds, steps = training.prepare(config)
    with strategy.scope():  # built first: a transfer that does not fit writes nothing
        model = adversarial.build(config, ds.num_classes, ds.x_train.shape[1:], steps, sources)
    if workers > 1:
        # The model is built already: fit() need not reduce a first batch to build it, which
        # this strategy cannot do; fit() finds the strategy from the scope it runs in (below).
        keras_private.skip_fit_strategy_build(model)
        # fit() then averages the step's logs over the replicas along axis 0, which fails on
        # scalars under this strategy: the step returns them as vectors of one.
        model.logs_as_vectors = True
    with training.holding(config, overwrite, chief):
        return _train(config, strategy, model, ds, steps, overwrite, verbose)


def _train(config, strategy, model, ds, steps, overwrite, verbose):
    """The part of `run` that writes into model_dir: prepare it, train, finish."""
    chief, worker, _ = worker_of(strategy)
    training.prepare_model_dir(config, overwrite, chief)
    # Every worker takes part in each save; the others' copies go to a private folder.
    private = None if chief else os.path.join(config.model_dir, f".worker{worker}")
    with strategy.scope():
        position = tf.Variable([0, 0], dtype=tf.int64, trainable=False)  # (epoch, step)
        parts = dict(model=model.model, optimizer=model.optimizer, position=position)
        ckpt = tf.train.Checkpoint(**parts, metrics=_metric_variables(model))
        before_metrics = tf.train.Checkpoint(**parts)
    checkpoints = os.path.join(config.model_dir, model_dir.CHECKPOINTS)
    manager = tf.train.CheckpointManager(
        ckpt, checkpoints if chief else os.path.join(private, model_dir.CHECKPOINTS),
        max_to_keep=2)
    with_sums = _restore(ckpt, checkpoints, before_metrics)  # the chief's, for every worker
    epoch, skip = (int(v) for v in position.numpy())
    if skip >= steps:  # a checkpoint at an epoch's last step (written before 0.1.1)
        epoch, skip = epoch + 1, 0
    # A resumed epoch's metrics go on from the checkpoint's sums (fit() resets them first).
    sums = [keras.ops.convert_to_numpy(v) for v in _metric_variables(model)] \
        if skip and with_sums else None
    training.report_position(config, epoch, skip, steps)
    logs = os.path.join(config.model_dir, model_dir.LOGS)
    writer = tf.summary.create_file_writer(logs) if chief else None
    for epoch in range(epoch, config.epochs):
        print(f"Epoch {epoch + 1}/{config.epochs}")
        checkpointer = _Checkpointer(manager, position, epoch, skip, config.checkpoint_every,
                                     config.batch_size, steps, sums)
        train = _epoch_data(strategy, ds, config, epoch, skip)
        with strategy.scope():
            history = model.fit(train, epochs=1, verbose=verbose if chief else 0,
                                callbacks=[checkpointer], shuffle=False)
        if checkpointer.bad_step is None:
            checkpointer.weights_finite("the end of the epoch")
        if checkpointer.bad_step is not None:
            raise NonFiniteLossError(
                f"The loss or the weights became NaN or Inf in epoch {epoch + 1} (found at "
                f"{checkpointer.bad_step}; loss {history.history['loss'][-1]}). Training "
                f"stopped; the last good checkpoint ({manager.latest_checkpoint}) is kept. "
                "Try a lower --lr.")
        lr = float(keras.ops.convert_to_numpy(model.optimizer.learning_rate))
        row = {"epoch": epoch + 1, "lr": lr, "img/s": checkpointer.throughput(),
               **{k: float(v[-1]) for k, v in history.history.items()}}
        if skip and sums is None:  # resumed from a checkpoint without the metrics' sums
            row["metrics_from_step"] = skip + 1
        skip, sums = 0, None
        if chief:  # first: a kill before the save reruns the epoch's end, rewriting the row
            with training.writing(os.path.join(config.model_dir, model_dir.METRICS_FILE)):
                training.log_epoch(config.model_dir, row,
                                   lambda row: _summaries(writer, logs, row))
        checkpointer.save(epoch + 1, 0)
        if chief:
            training.warn_if_stalled(config, row, ds.num_classes)
    if not chief:
        model.model.save(os.path.join(private, model_dir.MODEL))  # its share of the save
        shutil.rmtree(private, ignore_errors=True)
        return None
    return training.finish(config, model.model, ds)


def _summaries(writer, folder, row):
    """Writes the epoch's `row` to TensorBoard (`writer`, of `folder`).

    Raises:
        training.WriteError: the event file could not be written.
    """
    with training.writing(folder, (OSError, tf.errors.OpError)), \
            writer.as_default(step=row["epoch"]):
        for name, value in row.items():
            if name not in ("epoch", "metrics_from_step"):
                tf.summary.scalar(name, value)
        writer.flush()
