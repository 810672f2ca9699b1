"""Sparta on every Keras 3 backend: the checks of `backend_checks.py` under JAX and PyTorch,
and models saved on one backend loaded on another.

This process runs TensorFlow (Keras picks its backend once, at import), so each other backend
runs `backend_checks.py` in one subprocess per test run (the import paid once; the xdist
workers share its output, `conftest.shared_once`), with TensorFlow made
unimportable there, as on a machine without it. PyTorch's is skipped where torch does not
import; JAX's where jax does not.
"""

import importlib.util
import json
import os
import re
import subprocess
import sys
import types

import keras
import numpy as np
import pytest

from conftest import ROOT, shared_once, without_tensorflow
from sparta_tf import layers, models

_CHECKS_PATH = os.path.join(ROOT, "tests", "backend_checks.py")
_spec = importlib.util.spec_from_file_location("backend_checks", _CHECKS_PATH)
checks = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(checks)

BACKENDS = [pytest.param(name, marks=pytest.mark.skipif(
    importlib.util.find_spec(module) is None, reason=f"needs {module}"))
    for name, module in (("jax", "jax"), ("torch", "torch"))]
CHECK_NAMES = [name[len("check_"):] for name in checks.CHECKS] + ["save_for_tensorflow"]


@pytest.fixture(scope="module")
def tf_dir(tmp_path_factory):
    """The tiny model (.keras and .weights.h5) and the ResNet (both too), saved here on
    TensorFlow, with their logits (once per run, shared by the xdist workers)."""
    with shared_once(tmp_path_factory, "saved_on_tensorflow") as (folder, filled):
        if not filled:
            tiny = checks.set_weights(checks.tiny_model(), seed=0)
            tiny.save(folder / checks.TINY_KERAS)
            tiny.save_weights(folder / checks.TINY_WEIGHTS)
            net = checks.set_weights(checks.resnet(), seed=1)
            net.save_weights(folder / checks.RESNET_WEIGHTS)
            net.save(folder / checks.RESNET_KERAS)
            synchronized = models.build("resnet10", 10, "sparta", width_multiplier=0.0625,
                                        synchronized=True)
            synchronized.set_weights(net.get_weights())
            synchronized.save(folder / checks.RESNET_SYNCHRONIZED)
            tiny_x = checks.pixels((2,) + checks.TINY_SHAPE, 2)
            resnet_x = checks.pixels((2, 32, 32, 3), 3)
            np.savez(folder / checks.LOGITS, tiny=checks.logits(tiny, tiny_x), tiny_x=tiny_x,
                     resnet=checks.logits(net, resnet_x), resnet_x=resnet_x)
    return folder


@pytest.fixture
def run(tf_dir, tmp_path_factory):
    """`run(backend)`: the subprocess of `backend_checks.py` on that backend, run once per
    test run (its output shared by the xdist workers): `(output, results, saved folder)`."""
    def run_backend(backend):
        with shared_once(tmp_path_factory, f"saved_on_{backend}") as (out_dir, filled):
            if not filled:
                env = without_tensorflow(out_dir / "blocked", backend)
                out = subprocess.run(
                    [sys.executable, _CHECKS_PATH, f"--tf_dir={tf_dir}", f"--out_dir={out_dir}"],
                    capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
                (out_dir / "run.json").write_text(json.dumps(
                    {"returncode": out.returncode, "stdout": out.stdout, "stderr": out.stderr}))
        out = types.SimpleNamespace(**json.loads((out_dir / "run.json").read_text()))
        lines = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
        assert lines, f"no RESULT from {backend}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
        return out, json.loads(lines[-1][len("RESULT "):]), out_dir
    return run_backend


@pytest.mark.parametrize("name", CHECK_NAMES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_check_passes(run, backend, name):
    out, results, _ = run(backend)
    assert results["backend"] == backend
    assert not results["tensorflow_imported"]
    assert "error" not in results[name], (
        f"{name} on {backend}: {results[name]['error']}\n{out.stderr[-3000:]}")
    assert "skipped" not in results[name]


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_run_exits_0_and_every_check_ran(run, backend):
    out, results, _ = run(backend)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    ran = re.findall(r"^PASS (\w+)", out.stdout, re.M)
    assert sorted(ran) == sorted(CHECK_NAMES), ran


@pytest.mark.parametrize("backend", BACKENDS)
def test_parameter_count_is_tensorflows(run, backend):
    _, results, _ = run(backend)
    assert results["resnet_forward_and_backward"]["params"] == checks.resnet().count_params()


@pytest.mark.parametrize("backend", BACKENDS)
def test_tensorflow_loads_what_the_backend_saved(run, backend):
    _, _, folder = run(backend)
    saved = np.load(folder / checks.LOGITS)
    loaded = keras.models.load_model(folder / checks.TINY_KERAS)
    assert isinstance(loaded.get_layer("sparta"), layers.Sparta)
    np.testing.assert_allclose(checks.logits(loaded, saved["tiny_x"]), saved["tiny"],
                               rtol=1e-5, atol=1e-5)
    rebuilt = checks.tiny_model()
    rebuilt.load_weights(folder / checks.TINY_WEIGHTS)
    np.testing.assert_allclose(checks.logits(rebuilt, saved["tiny_x"]), saved["tiny"],
                               rtol=1e-5, atol=1e-5)
    net = checks.resnet()
    net.load_weights(folder / checks.RESNET_WEIGHTS)
    np.testing.assert_allclose(checks.logits(net, saved["resnet_x"]), saved["resnet"],
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("module", ["layers", "models", "activations"])
def test_the_model_half_uses_no_tensorflow(module):
    with open(os.path.join(ROOT, "sparta_tf", f"{module}.py")) as f:
        source = f.read()
    assert not re.search(r"^\s*(import|from)\s+tensorflow", source, re.M)
    assert not re.search(r"\btf\.", source)
