"""Helpers the tests share."""

import contextlib
import fcntl
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
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
                PYTHONPATH=os.pathsep.join(p for p in path if p),
                **fast_jax(os.path.dirname(str(folder))))


@contextlib.contextmanager
def shared_once(tmp_path_factory, name):
    """`(folder, filled)`: a folder that every pytest-xdist worker of this run shares, held
    under a file lock while the block runs. The first worker in finds `filled` False and
    fills it; a block that ends without an exception marks it filled, and the others then
    read it instead of doing the same costly work again (a module-scoped fixture is built
    once per worker). Only for results that no test changes afterwards."""
    run = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    base = tmp_path_factory.getbasetemp()
    root = base.parent / f"shared-{run}" if run else base / "shared"
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield folder, (folder / ".filled").exists()
        (folder / ".filled").touch()


def run_app_cases(app, cases, env=None):
    """The runs of trainer `app` (`trainers.<app>`) with each command line of `cases`, all in
    one process (`app_cases.py`), as `subprocess.CompletedProcess`es."""
    return run_apps([(app, argv) for argv in cases], env)


def run_apps(runs, env=None):
    """The runs of `(app, command line)` pairs, all in one process (`app_cases.py`), as
    `subprocess.CompletedProcess`es."""
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "app_cases.py"),
                          json.dumps(runs)], cwd=ROOT, capture_output=True, text=True,
                         timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    done = [json.loads(line) for line in out.stdout.splitlines() if line.startswith('{"code"')]
    assert len(done) == len(runs), out.stdout[-3000:] + out.stderr[-3000:]
    return [subprocess.CompletedProcess(["sparta-" + app, *argv], run["code"], run["stdout"],
                                        run["stderr"]) for (app, argv), run in zip(runs, done)]


def fast_jax(folder):
    """Environment variables for a JAX subprocess of a test whose temporary folder is
    `folder`. Compiling is most of a tiny JAX run's time on the CPU: the subprocesses of one
    test share JAX's persistent compilation cache (a killed run and its resume compile the
    same step), and XLA's costlier CPU passes are lowered (they change no result the tests
    check; the benchmarks' own figures are measured without this)."""
    return {"JAX_COMPILATION_CACHE_DIR": os.path.join(str(folder), "jax_cache"),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1",
            "XLA_FLAGS": "--xla_backend_optimization_level=1 "
                         "--xla_llvm_disable_expensive_passes=true"}


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


def conv_model(activation="relu", seed=0, classes=10, use_custom_gradient=True, dtype=None):
    """A tiny classifier of 8x8x3 pixels, its weights seeded: conv -> act -> strided conv ->
    act -> dense logits, act ReLU or (`activation="sparta"`) Sparta."""
    import keras  # pylint: disable=import-outside-toplevel
    from sparta_tf import layers  # pylint: disable=import-outside-toplevel
    keras.utils.set_random_seed(seed)

    def act():
        if activation == "sparta":
            return layers.Sparta(use_custom_gradient=use_custom_gradient, dtype=dtype)
        return keras.layers.Activation("relu", dtype=dtype)

    inputs = keras.Input((8, 8, 3))
    h = act()(keras.layers.Conv2D(8, 3, padding="same", dtype=dtype)(inputs))
    h = act()(keras.layers.Conv2D(8, 3, strides=2, padding="same", dtype=dtype)(h))
    logits = keras.layers.Dense(classes, dtype=dtype)(keras.layers.Flatten(dtype=dtype)(h))
    return keras.Model(inputs, logits)


def np_depthwise(x, kernel):
    """NumPy depthwise cross-correlation, stride 1, SAME zero padding: x [N,H,W,C], kernel
    [k,k,C,1]; out[n,i,j,c] = sum over (a,b) of x[n, i+a-k//2, j+b-k//2, c] * kernel[a,b,c,0]."""
    k = kernel.shape[0]
    padded = np.pad(x, [(0, 0), (k // 2, k // 2), (k // 2, k // 2), (0, 0)])
    out = np.zeros_like(x)
    for a in range(k):
        for b in range(k):
            out += padded[:, a:a + x.shape[1], b:b + x.shape[2], :] * kernel[a, b, :, 0]
    return out


def np_sigmoid(z):
    """The logistic function in NumPy."""
    return 1 / (1 + np.exp(-z))



def small_trained_net(shape=(4, 4, 3), seed=0):
    """`(model, x, y)`: a conv net of `shape` pixels trained for seconds on 512 random images
    whose 4 classes are set by their colour means, and 128 of those images with their labels:
    a network with something to attack, for the attacks' strength tests."""
    import keras  # pylint: disable=import-outside-toplevel

    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 1, (512, *shape)).astype(np.float32)
    y = (x[..., 0].mean((1, 2)) > x[..., 1].mean((1, 2))).astype(np.int32) \
        + 2 * (x[..., 2].mean((1, 2)) > 0.5).astype(np.int32)
    inputs = keras.Input(shape)
    h = keras.layers.Conv2D(16, 3, padding="same", activation="relu")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(4)(keras.layers.Flatten()(h)))
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, epochs=30, batch_size=64, verbose=0)
    return model, x[:128], y[:128]


def metrics_rows(folder):
    """The rows of `folder`/metrics.jsonl."""
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def assert_same_rows(rows, expected, note=""):
    """The metrics rows of two runs agree in every field but img/s, to float round-off."""
    assert [set(r) - {"img/s"} for r in rows] == [set(r) - {"img/s"} for r in expected], note
    for row, want in zip(rows, expected):
        for name in set(want) - {"img/s"}:
            assert row[name] == pytest.approx(want[name], rel=1e-5, abs=1e-6), \
                f"{note}: epoch {want['epoch']}, {name}"
