"""Helpers the tests share."""

import importlib.util
import os

import pytest

# TensorFlow's CPU allocator keeps statistics (tf.config.experimental.get_memory_info, read
# by the memory tests) only as the BFC allocator; ask for it before TensorFlow is imported.
os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

needs_jax = pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="needs jax")


def without_tensorflow(folder, backend="jax"):
    """The environment of a subprocess on Keras's `backend` (on the CPU) in which
    `import tensorflow` and `import tensorflow_datasets` raise ImportError, as on a machine
    without them: `folder` gets stand-ins for both and goes first on PYTHONPATH."""
    for name in ("tensorflow", "tensorflow_datasets"):
        os.makedirs(os.path.join(folder, name), exist_ok=True)
        with open(os.path.join(folder, name, "__init__.py"), "w") as f:
            f.write('raise ImportError("blocked for the test")\n')
    path = [str(folder), ROOT, os.environ.get("PYTHONPATH", "")]
    return dict(os.environ, KERAS_BACKEND=backend, JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="",
                PYTHONPATH=os.pathsep.join(p for p in path if p))


def jax_without_tensorflow(folder):
    """`without_tensorflow` on JAX."""
    return without_tensorflow(folder, "jax")


def spy_on_sparta_paths(monkeypatch):
    """A list that records, call by call, which path the Sparta layers take: "sparta_exact"
    (the exact custom gradient) or "sparta_forward" (autodiff of the plain forward).

    Both give the same numbers by design, so only a spy tells which one ran."""
    from sparta_tf import layers  # pylint: disable=import-outside-toplevel
    calls = []
    for name in ("sparta_exact", "sparta_forward"):
        def spy(*args, _name=name, _real=getattr(layers, name), **kwargs):
            calls.append(_name)
            return _real(*args, **kwargs)
        monkeypatch.setattr(layers, name, spy)
    return calls
