"""The apps. Importing this package quiets TensorFlow's start-up messages (on the
TensorFlow backend; on JAX, TensorFlow is not loaded).

TensorFlow's native code prints its start-up lines (oneDNN, CUDA probing on a machine
without a GPU, the XLA and absl banners) to stderr while it loads and finds its devices,
before its log level applies, and later warnings (for example of tf.data) at the C++
log level. A user of an app should see its progress and its summary: unless
TF_CPP_MIN_LOG_LEVEL is set, the apps set it to 2 (warnings and errors of Python code
still show) and silence stderr while TensorFlow loads. Set TF_CPP_MIN_LOG_LEVEL=0 to
see everything.

Where Keras cannot load its backend (TensorFlow, unless KERAS_BACKEND or keras.json names
another, is not installed), every app exits with one line that says so and what to set.
"""

import os
import sys


def _import_keras():
    """Imports Keras, which loads its backend; exits with one line where it cannot."""
    try:
        import keras  # noqa: F401  (loads TensorFlow on its backend)
    except (ImportError, ValueError) as e:  # ValueError: KERAS_BACKEND names no backend
        cause = (str(e).strip().splitlines() or [type(e).__name__])[0]
        backend = os.environ.get("KERAS_BACKEND")
        if backend:
            sys.exit(f"error: Keras cannot load its backend {backend!r} (KERAS_BACKEND): "
                     f"{cause}. Install it, or set KERAS_BACKEND to an installed backend "
                     "(tensorflow or jax).")
        sys.exit(f"error: Keras runs on TensorFlow here (KERAS_BACKEND is not set), and "
                 f"TensorFlow cannot be imported: {cause}. Install TensorFlow, or set "
                 "KERAS_BACKEND=jax (sparta-train trains and evaluates on JAX).")


def _quiet_tensorflow_start():
    if "TF_CPP_MIN_LOG_LEVEL" in os.environ:
        _import_keras()
        return
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    try:
        _import_keras()
        import keras
        if keras.backend.backend() == "tensorflow":
            import tensorflow as tf
            tf.config.list_physical_devices()  # probes the devices: the CUDA lines
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def require_tensorflow(app, needs):
    """Exits with one line unless Keras runs on TensorFlow: `app` needs it for `needs`.

    Call it at the top of a TensorFlow-only app, before its imports load TensorFlow (on a
    machine without it, an import would end in a traceback instead).
    """
    import keras
    if keras.backend.backend() != "tensorflow":
        try:  # an installation that cannot be imported is not one
            import tensorflow  # noqa: F401  pylint: disable=unused-import
            how = "run it with KERAS_BACKEND=tensorflow"
        except ImportError:
            how = ("TensorFlow is not installed here: install it and run with "
                   "KERAS_BACKEND=tensorflow")
        sys.exit(f"error: {app} needs TensorFlow ({needs}), and Keras runs on "
                 f"{keras.backend.backend()} here; {how}. On JAX, sparta-train, "
                 "sparta-evaluate, sparta-compare and sparta-transfer run.")


_quiet_tensorflow_start()
