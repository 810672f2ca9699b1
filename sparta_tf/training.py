"""Adversarial training: the AT train step, the strategy, checkpoints and resume.

`AdversarialModel` wraps a classifier (pixels in [0, 1] -> logits) and trains it
with one of three objectives:

- `standard`: cross-entropy on clean images;
- `pgd`: cross-entropy on PGD examples (Madry et al., 2018);
- `trades`: CE(clean) + beta * KL(p(clean) || p(adv)), with the adversarial
  example maximising that KL (Zhang et al., 2019).

`run(config)` is the whole experiment behind `trainers/train.py`: it builds the
data, the model and the optimizer under `tf.distribute.MirroredStrategy` (one
machine) or `MultiWorkerMirroredStrategy` (the cluster of `TF_CONFIG`), resumes
from `config.model_dir` when it can, and checkpoints every epoch and every
`checkpoint_every` steps. In a multi-worker job each worker reads its shard of
every global batch; the chief writes what a user sees (config, checkpoints,
logs, model, results), and the other workers keep their share of the collective
saves in a hidden folder of model_dir that they delete when done. All randomness (data order, augmentation, PGD's random
start) is stateless and keyed on (seed, epoch, step), so the checkpointed
counters are the whole RNG state: a killed run resumes with the same batches and
the same noise it would have seen.
"""

import dataclasses
import json
import contextlib
import math
import os
import shutil
import time
import zipfile

import keras
import numpy as np
import tensorflow as tf

from sparta_tf import attacks, data, evaluation, layers, model_dir, models, transfer

OBJECTIVES = ("standard", "pgd", "trades")
STRATEGIES = ("mirrored", "multi_worker")
LR_SCHEDULES = ("piecewise", "cosine")


class ConfigMismatchError(ValueError):
    """model_dir holds a run of another configuration."""


class SetupError(ValueError):
    """The run cannot start as asked (a strategy without its cluster, an option it lacks)."""


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or Inf."""


def _soft_ce(logits, target):
    """Cross-entropy to soft targets: KL(target || softmax(logits)) up to a constant."""
    return tf.nn.softmax_cross_entropy_with_logits(labels=target, logits=logits)


def _kl(p_logits, q_logits):
    """Per-example KL(softmax(p) || softmax(q))."""
    p_log = tf.nn.log_softmax(p_logits)
    return tf.reduce_sum(tf.exp(p_log) * (p_log - tf.nn.log_softmax(q_logits)), axis=-1)


class AdversarialModel(keras.Model):
    """A classifier whose `train_step` runs adversarial training.

    Args:
        model: a Keras model from pixels in [0, 1] to logits.
        objective: one of `OBJECTIVES`.
        attack: an `attacks.PGD`, used by `pgd` and `trades` (for `trades` its
            loss is replaced by the KL to the clean prediction).
        trades_beta: the weight of the KL term of `trades`.
        weight_decay: L2 coefficient, added to the loss as
            `weight_decay / 2 * sum(w ** 2)` (PyTorch's coupled SGD weight decay).
        decay_sparta: whether the Sparta parameters get weight decay too.
        sparta_lr_multiplier: scales the gradients of the Sparta parameters,
            which for SGD (with momentum) multiplies their learning rate.
        seed: the seed of PGD's random start, folded with the step and replica.
    """

    def __init__(self, model, objective="pgd", attack=None, trades_beta=6.0,
                 weight_decay=0.0, decay_sparta=True, sparta_lr_multiplier=1.0, seed=0,
                 **kwargs):
        super().__init__(**kwargs)
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}; got {objective!r}.")
        if objective != "standard" and attack is None:
            raise ValueError(f"objective {objective!r} needs an attack.")
        self.model = model
        self.objective = objective
        self.attack = attack
        if objective == "trades":  # the same PGD, maximising the KL to the clean prediction
            self.attack = attacks.PGD(attack.eps, attack.steps, attack.step_size,
                                      attack.random_start, attack.restarts, loss=_soft_ce,
                                      training=attack.training)  # its checks run again
        self.trades_beta = trades_beta
        self.weight_decay = weight_decay
        sparta_ids = {id(v) for l in model._flatten_layers() if isinstance(l, layers.Sparta)
                      for v in l.trainable_variables}
        self.decayed = [v for v in model.trainable_variables
                        if decay_sparta or id(v) not in sparta_ids]
        self.gradient_scale = [sparta_lr_multiplier if id(v) in sparta_ids else 1.0
                               for v in model.trainable_variables]
        self.seed = seed
        self.logs_as_vectors = False
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.clean_acc = keras.metrics.SparseCategoricalAccuracy(name="clean_acc")
        self.adv_acc = keras.metrics.SparseCategoricalAccuracy(name="adv_acc")

    @property
    def metrics(self):
        """What the progress bar and metrics.jsonl show: the loss, and the accuracy on the
        batch of each kind of image that the loss sees (clean for `standard`, adversarial for
        `pgd`, both for `trades`), from the logits of the loss itself: training mode (batch
        statistics), before the step's update. No forward pass runs for a metric alone."""
        shown = {"standard": [self.clean_acc], "pgd": [self.adv_acc],
                 "trades": [self.clean_acc, self.adv_acc]}[self.objective]
        return [self.loss_tracker, *shown]

    def call(self, x, training=False):
        return self.model(x, training=training)

    def train_step(self, batch):
        x, y = batch
        replica = tf.distribute.get_replica_context().replica_id_in_sync_group
        seed = tf.random.experimental.stateless_fold_in(
            tf.stack([tf.cast(self.seed, tf.int64),
                      tf.cast(self.optimizer.iterations, tf.int64)]), replica)
        if self.objective == "pgd":
            x_adv = self.attack(self.model, x, y, seed=seed)
        elif self.objective == "trades":
            target = tf.nn.softmax(tf.cast(self.model(x, training=False), tf.float32))
            x_adv = self.attack(self.model, x, target, seed=seed)
        with tf.GradientTape() as tape:
            if self.objective == "standard":
                logits = tf.cast(self.model(x, training=True), tf.float32)
                loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits))
            else:
                adv_logits = tf.cast(self.model(x_adv, training=True), tf.float32)
                loss = tf.reduce_mean(
                    tf.nn.sparse_softmax_cross_entropy_with_logits(y, adv_logits))
                if self.objective == "trades":
                    logits = tf.cast(self.model(x, training=True), tf.float32)
                    loss = tf.reduce_mean(
                        tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits)
                        + self.trades_beta * _kl(logits, adv_logits))
            total = loss
            if self.weight_decay:
                total += self.weight_decay / 2 * tf.add_n(
                    [tf.reduce_sum(tf.square(v)) for v in self.decayed])
            replicas = tf.distribute.get_strategy().num_replicas_in_sync
            scaled = self.optimizer.scale_loss(total / replicas)
        variables = self.model.trainable_variables
        grads = [g if s == 1.0 else g * s
                 for g, s in zip(tape.gradient(scaled, variables), self.gradient_scale)]
        self.optimizer.apply(grads, variables)
        self.loss_tracker.update_state(loss)
        if self.objective != "pgd":
            self.clean_acc.update_state(y, logits)
        if self.objective != "standard":
            self.adv_acc.update_state(y, adv_logits)
        logs = {m.name: m.result() for m in self.metrics}
        if self.logs_as_vectors:  # see `run`: for Keras' multi-worker reduce over axis 0
            logs = {name: tf.reshape(value, [1]) for name, value in logs.items()}
        return logs


@dataclasses.dataclass
class TrainConfig:
    """Everything one training run depends on; saved to model_dir/config.json."""

    model_dir: str = "runs/default"
    dataset: str = "bundled"
    data_dir: str | None = None
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

    # The fields that may change when a run resumes: where things are, how long it trains,
    # how often it saves, how it is evaluated at the end, how the step is compiled and
    # distributed. Every other field is the experiment's identity (`identity`): a model_dir
    # whose config differs in one of them holds another experiment.
    RESUMABLE = ("model_dir", "data_dir", "max_test", "epochs", "checkpoint_every",
                 "eval_pgd_steps", "jit_compile", "strategy", "sparta_from")

    def identity(self):
        """The experiment this config describes: every field but `RESUMABLE`, as in JSON.

        A dataset given as a path counts by its name (`cifar10-jpeg.tar.gz`), not by where
        it lies: the same archive moved to another folder or machine is the same data.
        """
        values = {k: v for k, v in json.loads(json.dumps(self.to_json())).items()
                  if k not in self.RESUMABLE}
        values["dataset"] = os.path.basename(os.path.normpath(values["dataset"]))
        return values

    def activation_kwargs(self):
        if self.activation != "sparta":
            return {}
        return {"kernel_size": self.sparta_kernel_size, "beta0": self.sparta_beta0,
                "use_custom_gradient": self.sparta_custom_gradient,
                "normalize_gate_input": self.sparta_normalize_gate_input}

    def to_json(self):
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def complete(cls, stored):
        """A stored config.json with the defaults of the fields added after it was written."""
        return {**json.loads(json.dumps(cls().to_json())), **stored}

    @classmethod
    def from_stored(cls, stored):
        """The config of a stored config.json (or part of one; defaults for the rest)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in cls.complete(stored).items() if k in fields})


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


def _stored_config(path):
    """The TrainConfig in config.json `path`.

    Raises:
        ConfigMismatchError: the file is not a config.json of sparta-train.
    """
    try:
        stored = model_dir.read_json(path)
        if not isinstance(stored, dict):
            raise ValueError(f"{path} holds a JSON {type(stored).__name__}, not an object.")
        return TrainConfig.from_stored(stored)
    except (ValueError, TypeError) as e:
        raise ConfigMismatchError(
            f"{e} It is not a config.json of sparta-train: use --overwrite to delete "
            f"{os.path.dirname(path)} and start again, or another --model_dir.") from None


def _prepare_model_dir(config, overwrite, chief=True):
    """Refuse a model_dir of another configuration; returns True if it can resume.

    Only the chief deletes (`overwrite`: a model_dir of sparta-train only, see
    `model_dir.clear`), removes what a killed run left half-written, and writes config.json.
    """
    path = os.path.join(config.model_dir, model_dir.CONFIG)
    if overwrite and chief:
        model_dir.clear(config.model_dir)
    os.makedirs(config.model_dir, exist_ok=True)
    if chief:
        _remove_leftovers(config.model_dir)
    resume = os.path.exists(path)
    if resume:
        old = _stored_config(path).identity()
        new = config.identity()
        diff = {k: (old.get(k), v) for k, v in new.items() if old.get(k) != v}
        if diff:
            lines = "\n".join(f"  {k}: {a!r} in model_dir, {b!r} now" for k, (a, b) in diff.items())
            raise ConfigMismatchError(
                f"{config.model_dir} holds a run of another configuration:\n{lines}\n"
                "Use another --model_dir, or --overwrite to delete it and start again.")
    if chief:  # another worker may be reading it
        model_dir.write_json(path, config.to_json())
    return resume


def _remove_leftovers(folder):
    """Removes what a run killed while writing left behind: the temporary files of
    `model_dir.atomic_path` and the `ckpt-N_temp*` of an unfinished checkpoint save."""
    checkpoints = os.path.join(folder, model_dir.CHECKPOINTS)
    for parent in (folder, checkpoints):
        if not os.path.isdir(parent):
            continue
        for name in os.listdir(parent):
            full = os.path.join(parent, name)
            if model_dir.is_temporary(name) or (parent == checkpoints and "_temp" in name):
                if os.path.isdir(full):
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


def learning_rate(config, steps_per_epoch):
    """Per-step schedule: piecewise (/10 at each of lr_decay_epochs) or cosine."""
    total = config.epochs * steps_per_epoch
    if config.lr_schedule == "cosine":
        return keras.optimizers.schedules.CosineDecay(config.lr, max(total, 1))
    if config.lr_schedule != "piecewise":
        raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}; got {config.lr_schedule!r}.")
    if not config.lr_decay_epochs:
        return config.lr
    boundaries = [int(e * steps_per_epoch) for e in config.lr_decay_epochs]
    values = [config.lr * 0.1 ** i for i in range(len(boundaries) + 1)]
    return keras.optimizers.schedules.PiecewiseConstantDecay(boundaries, values)


def with_sparta_source(config):
    """`config` with `sparta_from_sha256` filled in, and the source model (or None).

    Raises:
        FileNotFoundError: `config.sparta_from` holds no model.
        transfer.TransferError: it is not the source that the config names.
    """
    if not config.sparta_from:
        return config, None
    source = transfer.load(config.sparta_from)
    sha = transfer.fingerprint(source)
    if config.sparta_from_sha256 not in (None, sha):
        raise transfer.TransferError(
            f"The Sparta of {config.sparta_from} has sha256 {sha}, not "
            f"{config.sparta_from_sha256} as the configuration says: it changed.")
    return dataclasses.replace(config, sparta_from_sha256=sha), source


def build(config, num_classes, input_shape, steps_per_epoch, sparta_source=None):
    """The wrapped model, compiled with SGD; call under the strategy's scope.

    With `sparta_source` (a Keras model), its Sparta parameters are copied
    into the network and frozen (`transfer.copy_and_freeze`) before the
    optimizer and the weight decay see the trainable variables.
    """
    net = models.build(config.model, num_classes, activation=config.activation,
                       width_multiplier=config.width_multiplier,
                       sparta_sharing=config.sparta_sharing, input_shape=input_shape,
                       activation_kwargs=config.activation_kwargs(), denoise=config.denoise)
    if sparta_source is not None:
        transfer.copy_and_freeze(sparta_source, net)
    attack = None
    if config.objective != "standard":
        attack = attacks.PGD(config.eps, config.pgd_steps, config.pgd_step_size)
    model = AdversarialModel(net, config.objective, attack, config.trades_beta,
                             config.weight_decay, config.sparta_weight_decay,
                             config.sparta_lr_multiplier, config.seed)
    optimizer = keras.optimizers.SGD(learning_rate(config, steps_per_epoch),
                                     momentum=config.momentum)
    model.compile(optimizer=optimizer, jit_compile=config.jit_compile)
    model.optimizer.build(net.trainable_variables)  # so that a checkpoint can restore into it
    return model


class _Checkpointer(keras.callbacks.Callback):
    """Saves every `every` steps, stops on a non-finite loss or weight, adds img/s to logs.

    The epoch's last step is left to the end-of-epoch save, (epoch + 1, 0): a checkpoint
    at (epoch, steps) would resume into an empty epoch.
    """

    def __init__(self, manager, position, epoch, skipped, every, batch_size, steps):
        super().__init__()
        self.manager, self.position, self.epoch = manager, position, epoch
        self.skipped, self.every, self.batch_size = skipped, every, batch_size
        self.steps = steps
        self.bad_step = None

    def on_train_begin(self, logs=None):
        self.start, self.seen = time.perf_counter(), 0

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
        """Saves the training state as at (epoch, step)."""
        self.position.assign([epoch, step])
        self.manager.save()


def stalled(loss, num_classes, epoch, objective="pgd"):
    """Whether the training loss is still at chance, ln(num_classes) within 2%, after
    `epoch` >= 3 epochs: the network is not learning. SiLU and Sparta can do that in a
    ResNet-34 (docs/TRANSFER.md). Never under TRADES, whose loss adds a KL term."""
    return objective != "trades" and epoch >= 3 and loss >= 0.98 * math.log(num_classes)


def _log_epoch(folder, writer, row):
    """Writes `row` to folder/metrics.jsonl and to TensorBoard (the chief).

    Rows of this epoch and later ones already there are dropped first: they belong to
    an earlier run of the model_dir (retrained from scratch, its checkpoints gone, or
    killed after the row was written and before its checkpoint), not to this one.
    """
    if writer is None:  # another worker than the chief
        return
    path = os.path.join(folder, model_dir.METRICS_FILE)
    rows = []
    if os.path.isfile(path):
        with open(path) as f:
            rows = [line for line in f
                    if line.strip() and json.loads(line)["epoch"] < row["epoch"]]
    model_dir.write_text(path, "".join(rows + [json.dumps(row) + "\n"]))
    with writer.as_default(step=row["epoch"]):
        for name, value in row.items():
            if name != "epoch":
                tf.summary.scalar(name, value)
    writer.flush()


def _restore(ckpt, folder):
    """Restores `ckpt` from the newest readable checkpoint in `folder`, if there is one.

    A checkpoint that cannot be read (truncated by a full disk, say) is reported and the
    older one that the manager keeps is tried.

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
            ckpt.restore(path).assert_existing_objects_matched()
            return path
        except Exception as e:  # a damaged file fails in many ways (IndexError, DataLoss...)
            print(f"Warning: checkpoint {path} cannot be read ({type(e).__name__}: "
                  f"{str(e).splitlines()[0][:200]}); trying an older one.")
    if candidates:
        raise SetupError(f"No checkpoint in {folder} can be read. Use --overwrite to start "
                         "again, or restore the folder from a backup.")
    return None


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


def run(config, overwrite=False, verbose="auto"):
    """Trains (or resumes) `config`, then evaluates and saves the model.

    Returns a dict of results, also written to model_dir/results.json; in a
    multi-worker job, None on the workers other than the chief. The global
    Keras dtype policy is as it was before, whatever happens.
    """
    policy = keras.config.dtype_policy()
    try:
        return _run(config, overwrite, verbose)
    finally:
        keras.config.set_dtype_policy(policy)


def _run(config, overwrite, verbose):
    strategy = make_strategy(config.strategy)  # first: before any other TensorFlow op
    chief, worker, workers = worker_of(strategy)
    if workers > 1 and overwrite:
        raise SetupError("--overwrite is not supported with several workers: delete the "
                         "model_dir before starting them.")
    config, source = with_sparta_source(config)
    ds = data.load(config.dataset, config.data_dir, config.max_train, config.max_test,
                   seed=config.seed)
    keras.utils.set_random_seed(config.seed)
    keras.config.set_dtype_policy(config.mixed_precision)
    steps = data.steps_per_epoch(len(ds.x_train), config.batch_size)
    if steps == 0:
        raise SetupError(f"--batch_size={config.batch_size} is larger than the "
                         f"{len(ds.x_train)} training images: no full batch to train on.")
    with strategy.scope():  # built first: a transfer that does not fit writes nothing
        model = build(config, ds.num_classes, ds.x_train.shape[1:], steps, source)
    if workers > 1:
        # Keras 3.15's fit() reduces the first batch to build the model symbolically, a
        # reduce that MultiWorkerMirroredStrategy cannot do on a (images, labels) tuple of
        # PerReplica values. The model is built already: skip that step, and let fit() find
        # the strategy from the scope it runs in (below).
        model._distribute_strategy = None
        # It then averages the step's logs over the replicas along axis 0, which fails on
        # scalars under this strategy: the step returns them as vectors of one.
        model.logs_as_vectors = True
    if overwrite and chief:  # before the lock writes into it: refuse a folder of the user's
        model_dir.check_deletable(config.model_dir)
    # The chief holds the model_dir while it trains; the other workers write only their own
    # folder in it.
    with model_dir.lock(config.model_dir) if chief else contextlib.nullcontext():
        return _train(config, strategy, model, ds, steps, overwrite, verbose)


def _train(config, strategy, model, ds, steps, overwrite, verbose):
    """The part of `_run` that writes into model_dir: prepare it, train, finish."""
    chief, worker, _ = worker_of(strategy)
    _prepare_model_dir(config, overwrite, chief)
    # Every worker takes part in each save; the others' copies go to a private folder.
    private = None if chief else os.path.join(config.model_dir, f".worker{worker}")
    with strategy.scope():
        position = tf.Variable([0, 0], dtype=tf.int64, trainable=False)  # (epoch, step)
        ckpt = tf.train.Checkpoint(model=model.model, optimizer=model.optimizer,
                                   position=position)
    checkpoints = os.path.join(config.model_dir, model_dir.CHECKPOINTS)
    manager = tf.train.CheckpointManager(
        ckpt, checkpoints if chief else os.path.join(private, model_dir.CHECKPOINTS),
        max_to_keep=2)
    _restore(ckpt, checkpoints)  # the chief's, for every worker
    epoch, skip = (int(v) for v in position.numpy())
    if skip >= steps:  # a checkpoint at an epoch's last step (written before 0.1.1)
        epoch, skip = epoch + 1, 0
    if epoch >= config.epochs:
        print(f"{config.model_dir} is trained for {epoch} epochs; evaluating it again.")
    elif epoch or skip:
        print(f"Resuming {config.model_dir} at epoch {epoch + 1}, step {skip} of {steps}.")
    writer = tf.summary.create_file_writer(os.path.join(config.model_dir, model_dir.LOGS)) \
        if chief else None
    for epoch in range(epoch, config.epochs):
        print(f"Epoch {epoch + 1}/{config.epochs}")
        checkpointer = _Checkpointer(manager, position, epoch, skip, config.checkpoint_every,
                                     config.batch_size, steps)
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
        skip = 0
        lr = float(keras.ops.convert_to_numpy(model.optimizer.learning_rate))
        row = {"epoch": epoch + 1, "lr": lr, "img/s": checkpointer.throughput(),
               **{k: float(v[-1]) for k, v in history.history.items()}}
        _log_epoch(config.model_dir, writer, row)  # first: a kill before the save reruns
        checkpointer.save(epoch + 1, 0)               # the epoch's end, and rewrites its row
        if chief and stalled(row["loss"], ds.num_classes, epoch + 1, config.objective):
            print(f"Warning: after {epoch + 1} epochs the training loss ({row['loss']:.3f}) is "
                  f"still at chance (ln {ds.num_classes} = {math.log(ds.num_classes):.3f}): "
                  "the network is not learning. Try a lower --lr.")
    if not chief:
        model.model.save(os.path.join(private, model_dir.MODEL))  # its share of the save
        shutil.rmtree(private, ignore_errors=True)
        return None
    return finish(config, model.model, ds)


def finish(config, net, ds):
    """Saves `net` as model_dir/model.keras (and the class names beside it), then evaluates
    clean and PGD accuracy."""
    with model_dir.atomic_path(os.path.join(config.model_dir, model_dir.MODEL)) as tmp:
        net.save(tmp)
    model_dir.write_json(os.path.join(config.model_dir, model_dir.CLASS_NAMES), ds.class_names)
    x, y = ds.x_test, ds.y_test
    results = {"clean_acc": evaluation.accuracy(net, x, y)}
    if config.eval_pgd_steps:  # at --eps whatever the objective, with a seeded random start
        pgd = evaluation.seeded(attacks.PGD(config.eps, config.eval_pgd_steps), config.seed)
        results[f"pgd{config.eval_pgd_steps}_acc"] = evaluation.accuracy(net, x, y, attack=pgd)
    results.update(eval_examples=int(len(y)), train_examples=int(len(ds.x_train)),
                   eps=config.eps)
    model_dir.write_json(os.path.join(config.model_dir, model_dir.RESULTS), results)
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
