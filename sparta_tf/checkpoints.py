"""A run's checkpoints, the same on every backend: `Checkpoints(folder).save(model, epoch,
step)` and `.restore(model)`.

Each checkpoint is a folder `checkpoints/ckpt-N/` holding

    state.npz       every variable of the training state (`variables`: the weights, the
                    optimizer's variables, the metrics' partial sums), in that order, with
                    their paths (for a reader; they are restored by order and shape)
    position.json   {"epoch", "step"}: where the run stands (the data position: the batches
                    of an epoch depend only on (seed, epoch), `sparta_tf.data`)

written to a temporary folder `ckpt-N_temp*` and renamed into place, so that a kill or a
full disk leaves the old checkpoints and no half one; the newest `KEEP` are kept. NumPy's
format, not Keras's HDF5: HDF5 cannot fail a write cleanly (on a full disk h5py crashed the
process closing the file). A checkpoint written by the JAX trainer of sparta-tf 0.1 before
state.npz (Keras's `state.weights.h5`, without the metrics' sums) is still read. The
TensorFlow trainer of 0.1 wrote `tf.train` checkpoints; those are refused in one line.
"""

import json
import os
import shutil
import tempfile

import keras
import numpy as np

from sparta_tf import model_dir
from sparta_tf.config import SetupError, writing

STATE = "state.npz"
POSITION = "position.json"
KERAS_STATE = "state.weights.h5"  # in JAX checkpoints written before STATE
KEEP = 2


def variables(model):
    """The variables of `model`'s training state, in a fixed order: trainable,
    non-trainable, the optimizer's, then the metrics' (`model.metrics_variables`)."""
    return [*model.trainable_variables, *model.non_trainable_variables,
            *model.optimizer.variables, *model.metrics_variables]


class Checkpoints:
    """The checkpoints in `folder` (see the module docstring); `write=False` (a worker of a
    multi-worker job other than the chief) reads them but saves none."""

    def __init__(self, folder, write=True):
        self.folder, self.write = folder, write

    def _numbers(self):
        if not os.path.isdir(self.folder):
            return []
        return sorted(int(name[5:]) for name in os.listdir(self.folder)
                      if name.startswith("ckpt-") and name[5:].isdigit())

    def latest(self):
        """The newest checkpoint's folder, or None."""
        numbers = self._numbers()
        return os.path.join(self.folder, f"ckpt-{numbers[-1]}") if numbers else None

    def save(self, model, epoch, step):
        """Writes ckpt-N (N one more than the last) whole, then drops all but the last KEEP.

        Raises:
            WriteError: it could not be written (nothing of it is left).
        """
        state = variables(model)
        # Read on every worker: under a multi-worker strategy a read may be collective.
        values = {f"v{i}": keras.ops.convert_to_numpy(v) for i, v in enumerate(state)}
        if not self.write:
            return
        numbers = self._numbers()
        number = (numbers[-1] if numbers else 0) + 1
        with writing(os.path.join(self.folder, f"ckpt-{number}"), Exception):
            os.makedirs(self.folder, exist_ok=True)
            partial = tempfile.mkdtemp(prefix=f"ckpt-{number}_temp-", dir=self.folder)
            try:
                np.savez(os.path.join(partial, STATE),
                         paths=np.array([v.path for v in state]), **values)
                with open(os.path.join(partial, POSITION), "w") as f:
                    json.dump({"epoch": epoch, "step": step}, f)
                os.rename(partial, os.path.join(self.folder, f"ckpt-{number}"))
            finally:
                shutil.rmtree(partial, ignore_errors=True)
        for old in (numbers + [number])[:-KEEP]:
            shutil.rmtree(os.path.join(self.folder, f"ckpt-{old}"), ignore_errors=True)

    def restore(self, model):
        """Restores the newest readable checkpoint into `model`. Returns its (epoch, step,
        the metrics' sums or None where it has none); (0, 0, None) where there is none. A
        checkpoint that cannot be read is reported, and the one before it tried.

        Raises:
            SetupError: the folder holds tf.train checkpoints, or checkpoints of which none
                can be read.
        """
        if os.path.isfile(os.path.join(self.folder, "checkpoint")):
            raise SetupError(
                f"{self.folder} holds tf.train checkpoints, written by the TensorFlow trainer "
                "of sparta-tf 0.1, which this version does not read: finish that run with "
                "sparta-tf 0.1, or start it again with --overwrite.")
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
    """Restores checkpoint folder `path` into `model`; returns the metrics' sums that it
    holds, or None (one written before STATE).

    Raises:
        ValueError: it holds the variables of another model.
    """
    if not os.path.exists(os.path.join(path, STATE)):
        model.load_weights(os.path.join(path, KERAS_STATE))
        return None
    state = variables(model)
    with np.load(os.path.join(path, STATE), allow_pickle=False) as saved:
        values = [saved[f"v{i}"] for i in range(len(saved.files) - 1)]
    # By order and shape: a path holds Keras's names, which count the models built before.
    if [v.shape for v in values] != [tuple(v.shape) for v in state]:
        raise ValueError(f"{STATE} holds the variables of another model.")
    for variable, value in zip(state, values):
        variable.assign(value)
    return values[len(values) - len(model.metrics_variables):]
