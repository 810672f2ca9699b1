"""The devices of a run on TensorFlow: `Devices(strategy)`, a `tf.distribute` strategy.

`mirrored` is every GPU of this machine (or its CPU), `MirroredStrategy`; `multi_worker` is
the cluster of `TF_CONFIG`, `MultiWorkerMirroredStrategy`, where each worker reads its shard
of every global batch and only the chief writes (the run's files, its checkpoints). All
randomness is keyed on (seed, epoch, step), so a worker restarted after a kill reads the
chief's checkpoint and goes on with the same batches and noise. Create it before any other
TensorFlow op: a MultiWorkerMirroredStrategy sets up the runtime's collectives first.
"""

import contextlib
import os
import shutil

import tensorflow as tf

from sparta_tf import data, keras_private
from sparta_tf.config import STRATEGIES, SetupError


class Devices:
    """The strategy `name` (one of `STRATEGIES`) and this process's place in it.

    Attributes:
        count: the replicas that train (devices, over every worker).
        synchronized: whether the network's batch norm must be synchronized over them.
        chief, worker, workers: whether this process writes the run's files, its index and
            the number of workers.
    """

    def __init__(self, name, batch_size):
        if name == "mirrored":
            self.strategy = tf.distribute.MirroredStrategy()
        elif name != "multi_worker":
            raise SetupError(f"strategy must be one of {STRATEGIES}; got {name!r}.")
        elif not os.environ.get("TF_CONFIG"):
            raise SetupError("strategy 'multi_worker' reads the cluster from the TF_CONFIG "
                             "environment variable, which is not set (see BUILD.md).")
        else:
            self.strategy = tf.distribute.MultiWorkerMirroredStrategy()
        self.count = self.strategy.num_replicas_in_sync
        # Batch norm over the global batch: synchronized over the replicas where there are
        # several (on JAX one program over all devices computes it so by itself).
        self.synchronized = self.count > 1
        self.chief, self.worker, self.workers = _worker_of(self.strategy)
        if batch_size % self.count:
            raise SetupError(f"--batch_size={batch_size} does not split evenly over the "
                             f"{self.count} devices that train.")

    @contextlib.contextmanager
    def scope(self):
        """Where the model is built and `fit` runs."""
        with self.strategy.scope():
            yield

    def prepare(self, model):
        """Readies a built `AdversarialModel` for `fit` under the strategy."""
        if self.workers > 1:
            # The model is built already: fit() need not reduce a first batch to build it,
            # which this strategy cannot do; it finds the strategy from the scope it runs in.
            keras_private.skip_fit_strategy_build(model)
            # fit() then averages the step's logs over the replicas along axis 0, which
            # fails on scalars under this strategy: the step returns vectors of one.
            model.logs_as_vectors = True

    def save_share(self, net, folder):
        """A worker other than the chief takes its part in the chief's save of `net` (a read
        of a variable may be collective), in a hidden folder of `folder` that it deletes."""
        private = os.path.join(folder, f".worker{self.worker}")
        os.makedirs(private, exist_ok=True)
        net.save(os.path.join(private, "model.keras"))
        shutil.rmtree(private, ignore_errors=True)

    def batches(self, ds, config, epoch, skip):
        """The batches of epoch `epoch` from step `skip` (`data.train_dataset`): the global
        batches on one machine; with several workers, each worker's slices of them."""
        if self.workers == 1:  # tf.distribute splits each global batch over the replicas
            return data.train_dataset(ds.x_train, ds.y_train, config.batch_size, config.seed,
                                      epoch, skip_batches=skip)

        def shard(context):
            batches = data.train_dataset(ds.x_train, ds.y_train, config.batch_size,
                                         config.seed, epoch, skip_batches=skip,
                                         num_shards=context.num_input_pipelines,
                                         shard=context.input_pipeline_id)
            per_replica = context.get_per_replica_batch_size(config.batch_size)
            if per_replica * context.num_input_pipelines != config.batch_size:  # GPUs
                batches = batches.rebatch(per_replica, drop_remainder=True)
            return batches

        return self.strategy.distribute_datasets_from_function(shard)


def _worker_of(strategy):
    """`(is_chief, index, count)` of this process among the workers of `strategy`."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True, 0, 1
    spec = resolver.cluster_spec().as_dict()
    has_chief = "chief" in spec
    count = len(spec.get("chief", [])) + len(spec.get("worker", []))
    index = resolver.task_id + (1 if has_chief and resolver.task_type == "worker" else 0)
    return index == 0, index, count
