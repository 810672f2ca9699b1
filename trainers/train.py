"""Adversarially train a network, evaluate it and export it.

    sparta-train                                   # quick: bundled data, minutes on a CPU
    sparta-train --config=paper --model_dir=runs/paper   # the paper's recipe (GPU)
    sparta-train --model=resnet34 --sparta_from=runs/paper --model_dir=runs/r34   # reuse, frozen

Rerunning the same command resumes from --model_dir.
"""

import os
import sys
import time

import tensorflow as tf
from absl import app, logging

from flags import core
from sparta_tf import data, export, model_dir, training, transfer

core.define_training()


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # keep TF's INFO lines off the progress output
    config = core.train_config()
    start = time.perf_counter()
    try:
        results = training.run(config, overwrite=core.FLAGS.overwrite)
    except (training.ConfigMismatchError, training.NonFiniteLossError,
            data.DatasetUnavailableError, data.BadDataError, transfer.TransferError,
            FileNotFoundError, training.SetupError, model_dir.LockedError,
            model_dir.NotAModelDirError, transfer.ModelFileError) as e:
        sys.exit(f"error: {e}")
    except tf.errors.UnavailableError as e:  # a peer of a multi-worker job stopped
        sys.exit(f"error: another worker of the job stopped ({e.message.splitlines()[0]}). "
                 "Restart every worker with the same command: they resume from the last "
                 "checkpoint.")
    if results is None:  # a worker of a multi-worker job: the chief writes the model
        print("This worker is done; the chief saves, evaluates and exports the model.")
        return
    model_path = os.path.join(config.model_dir, model_dir.MODEL)
    try:
        export_dir = export.export_if_changed(model_path,
                                              os.path.join(config.model_dir, "export"),
                                              export.class_names_beside(model_path))
    except export.ExportError as e:
        sys.exit(f"error: {e}")
    minutes = (time.perf_counter() - start) / 60
    print(training.summary(config, results, minutes, export_dir))


def run():
    core.run_app(main, sys.modules[__name__])


if __name__ == "__main__":
    run()
