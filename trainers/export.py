"""Export a trained classifier as a new version of a SavedModel for TF Serving.

    sparta-export --model_path=runs/quick --export_dir=/models/sparta   # the next version
    sparta-export --model_path=model.keras --export_dir=/models/sparta --version=3
        --class_names=airplane,automobile,...   # (one command)

Writes EXPORT_DIR/VERSION with the signatures `serving_default` (float32 pixels in [0, 1])
and `serve_image_bytes` (JPEG or PNG bytes), both returning logits, probabilities, classes
and class_names (see sparta_tf/export.py). An existing version is never overwritten. Two
exports to one EXPORT_DIR at once give two versions (the second waits for the first), and
each removes the `.partial-*` folders that a killed export left there.
"""

import trainers

trainers.require_tensorflow("sparta-export", "a SavedModel is TensorFlow's")

import sys  # noqa: E402  (after the check: the imports below load TensorFlow)

from absl import app, logging

from flags import core
from sparta_tf import export, model_dir, transfer


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    flags = core.FLAGS
    try:
        model_path = model_dir.keras_file(flags.model_path)
        class_names = flags.class_names or model_dir.class_names_beside(model_path)
    except (FileNotFoundError, ValueError) as e:  # ValueError: a corrupt class_names.json
        sys.exit(f"error: {e}")
    if not class_names:
        sys.exit(f"error: no class names beside {model_path} (sparta-train writes "
                 f"{model_dir.CLASS_NAMES} there); give them with --class_names=a,b,...")
    try:
        path = export.export(model_path, flags.export_dir, class_names, flags.version)
    except (export.ExportError, transfer.ModelFileError) as e:
        sys.exit(f"error: {e}")
    print(f"exported {path}")


def run():
    core.define_export()
    core.run_app(main, sys.modules[__name__])


if __name__ == "__main__":
    run()
