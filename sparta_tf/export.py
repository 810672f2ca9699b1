"""Export a trained classifier as a SavedModel for TF Serving."""

import os

import keras

from sparta_tf import layers  # noqa: F401  (registers Sparta and FReLU for loading)


def export(model, export_dir, version=1):
    """Writes `export_dir/<version>`, a SavedModel with a `serve` signature.

    Args:
        model: a Keras model from pixels in [0, 1] to logits, or the path of a
            `.keras` file holding one.
        export_dir: the model's base directory, as TF Serving expects it.
        version: the numbered version subdirectory.

    Returns: the path written.
    """
    if isinstance(model, str):
        model = keras.models.load_model(model)
    path = os.path.join(export_dir, str(version))
    model.export(path, format="tf_saved_model", verbose=False)
    return path
