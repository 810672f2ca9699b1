"""Adversarially train a network, evaluate it and export it.

    sparta-train                                   # quick: bundled data, minutes on a CPU
    sparta-train --config=paper --model_dir=runs/paper   # the paper's recipe (GPU)
    sparta-train --model=resnet34 --sparta_from=runs/paper --model_dir=runs/r34   # reuse, frozen

Rerunning the same command resumes from --model_dir. On Keras's JAX backend
(KERAS_BACKEND=jax, where TensorFlow need not be installed) it trains and evaluates the
same way, on every device of the machine; the SavedModel export, which needs TensorFlow, is
left to sparta-export.
"""

import os
import sys
import time

import keras
from absl import app, logging

from flags import core
from sparta_tf import data, model_dir, training, transfer

if keras.backend.backend() == "tensorflow":  # the SavedModel export and its errors
    import tensorflow as tf

    from sparta_tf import export

core.define_training()


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # keep TF's INFO lines off the progress output
    config = core.train_config()
    start = time.perf_counter()
    try:
        results = training.run(config, overwrite=core.FLAGS.overwrite)
    except (training.ConfigMismatchError, training.NonFiniteLossError, training.WriteError,
            data.DatasetUnavailableError, data.BadDataError, transfer.TransferError,
            FileNotFoundError, training.SetupError, model_dir.LockedError,
            model_dir.NotAModelDirError, transfer.ModelFileError) as e:
        sys.exit(f"error: {e}")
    except _peer_stopped() as e:  # a peer of a multi-worker job stopped
        sys.exit(f"error: another worker of the job stopped ({e.message.splitlines()[0]}). "
                 "Restart every worker with the same command: they resume from the last "
                 "checkpoint.")
    if results is None:  # a worker of a multi-worker job: the chief writes the model
        print("This worker is done; the chief saves, evaluates and exports the model.")
        return
    export_dir = _export(config)
    minutes = (time.perf_counter() - start) / 60
    print(training.summary(config, results, minutes, export_dir))


def _peer_stopped():
    """The error of a stopped peer of a multi-worker job: TensorFlow's (none on JAX)."""
    return tf.errors.UnavailableError if keras.backend.backend() == "tensorflow" else ()


def _export(config):
    """Exports model_dir/model.keras as model_dir/export/VERSION, if its weights changed;
    returns what the summary shows."""
    if keras.backend.backend() != "tensorflow":
        return (f"not exported: a SavedModel needs TensorFlow (on TensorFlow: sparta-export "
                f"--model_path={config.model_dir} --export_dir=...)")
    model_path = os.path.join(config.model_dir, model_dir.MODEL)
    try:
        return export.export_if_changed(model_path,
                                        os.path.join(config.model_dir, model_dir.EXPORT),
                                        model_dir.class_names_beside(model_path))
    except export.ExportError as e:
        sys.exit(f"error: {e}")


def run():
    core.run_app(main, sys.modules[__name__])


if __name__ == "__main__":
    run()
