"""The model_dir of `sparta-train`: one layout, written by training, read by the rest.

    model_dir/
        config.json         the TrainConfig of the run (training.TrainConfig)
        checkpoints/        tf.train checkpoints, resumed from
        metrics.jsonl       one row per epoch; logs/ holds the same for TensorBoard
        model.keras         the trained network (MODEL), written when training ends
        class_names.json    its class names in label order (CLASS_NAMES)
        results.json        clean and PGD accuracy on the test images
        export/VERSION/     the SavedModel for TF Serving (sparta_tf.export)

`keras_file(path)` finds the model of a model_dir or a `.keras` path, for every reader
(evaluation, transfer, export). This module imports nothing else of `sparta_tf`.
"""

import os

MODEL = "model.keras"
METRICS_FILE = "metrics.jsonl"
CLASS_NAMES = "class_names.json"


def keras_file(path):
    """The `.keras` file of `path`: a model_dir's model.keras, or `path` itself.

    Raises:
        FileNotFoundError: `path` is neither a `.keras` file nor a folder holding one.
    """
    path = os.fspath(path)
    file = os.path.join(path, MODEL) if os.path.isdir(path) else path
    if not (file.endswith(".keras") and os.path.isfile(file)):
        raise FileNotFoundError(
            f"No model at {path!r}: expected a .keras file or a model_dir of sparta-train "
            f"that holds {MODEL} (written when its training has finished).")
    return file
