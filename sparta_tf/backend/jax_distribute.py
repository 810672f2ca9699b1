"""The devices of a run on JAX: `Devices(strategy)`, every local device.

`mirrored` is every device JAX sees on this machine: with more than one, Keras's
`keras.distribution.DataParallel`, which places a copy of every variable on each device and
splits each global batch across them; the compiled step is one program over all of them, so
batch statistics and gradients are those of the global batch. With one device, no
distribution. `multi_worker` (a cluster of machines) is TensorFlow's, and refused here.
"""

import contextlib

import jax
import keras
import numpy as np

from sparta_tf import data
from sparta_tf.config import STRATEGIES, SetupError


class Devices:
    """Every local JAX device (see the module docstring).

    Attributes:
        count: the devices that train.
        chief, worker, workers: this process writes the run's files: True, 0, 1.
    """

    chief, worker, workers = True, 0, 1
    synchronized = False  # one program over all devices: batch statistics of the global batch

    def __init__(self, name, batch_size):
        if name == "multi_worker":
            raise SetupError("--strategy=multi_worker needs TensorFlow "
                             "(MultiWorkerMirroredStrategy); on JAX, --strategy=mirrored "
                             "trains on every device of this machine.")
        if name not in STRATEGIES:
            raise SetupError(f"strategy must be one of {STRATEGIES}; got {name!r}.")
        devices = jax.devices()
        self.count = len(devices)
        self.distribution = keras.distribution.DataParallel(devices=devices) \
            if self.count > 1 else None
        if batch_size % self.count:
            raise SetupError(f"--batch_size={batch_size} does not split evenly over the "
                             f"{self.count} devices that train.")

    @contextlib.contextmanager
    def scope(self):
        """Where the model is built and `fit` runs: under the distribution, if any."""
        if self.distribution is None:
            yield
            return
        with self.distribution.scope():
            yield

    def prepare(self, model):
        """Builds `model`'s variables (fit's stateless step needs them)."""
        with self.scope():
            model(np.zeros((1, *model.model.input_shape[1:]), "float32"))

    def batches(self, ds, config, epoch, skip):
        """The batches of epoch `epoch` from step `skip` (`data.numpy_batches`)."""
        return data.numpy_batches(ds.x_train, ds.y_train, config.batch_size, config.seed,
                                  epoch, skip_batches=skip)
