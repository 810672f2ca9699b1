"""The apps. Importing this package quiets TensorFlow's start-up messages (on the
TensorFlow backend; on JAX, TensorFlow is not loaded).

TensorFlow's native code prints its start-up lines (oneDNN, CUDA probing on a machine
without a GPU, the XLA and absl banners) to stderr while it loads and finds its devices,
before its log level applies, and later warnings (for example of tf.data) at the C++
log level. A user of an app should see its progress and its summary: unless
TF_CPP_MIN_LOG_LEVEL is set, the apps set it to 2 (warnings and errors of Python code
still show) and silence stderr while TensorFlow loads. Set TF_CPP_MIN_LOG_LEVEL=0 to
see everything.
"""

import os


def _quiet_tensorflow_start():
    if "TF_CPP_MIN_LOG_LEVEL" in os.environ:
        return
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    try:
        import keras  # loads TensorFlow on its backend
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
    import sys

    import keras
    if keras.backend.backend() != "tensorflow":
        sys.exit(f"error: {app} needs TensorFlow ({needs}), and Keras runs on "
                 f"{keras.backend.backend()} here. Run it with KERAS_BACKEND=tensorflow; on "
                 "JAX, sparta-train trains and evaluates.")


_quiet_tensorflow_start()
