"""The benchmarks run and write their reports (tiny sizes: this checks the instruments, not
the speed; the figures are in docs/BENCHMARKS.md)."""

import json
import os
import subprocess
import sys

from conftest import ROOT, needs_jax


def _run(script, *args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", script), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_at_step_writes_every_figure(tmp_path):
    out = _run("at_step.py", "--activations=relu,sparta", "--widths=0.0625", "--batch_size=8",
               "--rounds=2", "--steps=1", f"--output_dir={tmp_path}")
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((tmp_path / "benchmark.json").read_text())
    assert set(report["seconds_per_step"]) == {
        "at/relu/w0.0625", "at/sparta/w0.0625", "at/sparta_autodiff/w0.0625",
        "standard/relu/w0.0625", "standard/sparta/w0.0625", "jit/relu/w0.0625",
        "jit/sparta/w0.0625", "eager_cleverhans/relu/w0.0625", "eager_cleverhans/sparta/w0.0625"}
    assert all(s["min"] <= s["median"] <= s["max"] for s in report["seconds_per_step"].values())
    assert "sparta / relu, AT, w0.0625" in report["ratios"]
    assert set(report["memory"]) == {"at/sparta/w0.0625", "at/sparta_autodiff/w0.0625"}
    assert report["end_to_end"]["train_img_s"] > 0 and report["end_to_end"]["step_img_s"] > 0
    assert "# The adversarial-training step" in (tmp_path / "BENCHMARKS.md").read_text()


def test_profile_step_sums_op_time_by_type(tmp_path):
    out = _run("profile_step.py", "--activations=relu,sparta", "--width_multiplier=0.0625",
               "--batch_size=8", "--steps=1", f"--output_dir={tmp_path}")
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((tmp_path / "profile.json").read_text())
    relu, sparta = report["ms_per_step"]["relu"], report["ms_per_step"]["sparta"]
    assert relu.get("ReluGrad", 0) > 0 and "Sigmoid" in sparta and "Sigmoid" not in relu
    assert "Process" not in sparta  # the enclosing events are not ops
    assert "| op type | relu | sparta |" in (tmp_path / "PROFILE.md").read_text()


def test_arm_overhead_times_every_arm_against_the_first(tmp_path):
    output = tmp_path / "overhead.json"
    out = _run("arm_overhead.py", "--arms=relu,relu_mean", "--width_multiplier=0.0625",
               "--batch_size=4", "--rounds=2", "--steps=1", f"--output={output}")
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(output.read_text())
    relu, mean = report["arms"]["relu"], report["arms"]["relu_mean"]
    assert relu["time_vs_ref_median"] == relu["params_vs_ref"] == 1.0
    assert mean["params"] > relu["params"] and mean["s_per_step_median"] > 0
    assert "cores" in report["device"] or "GPU" in report["device"]


@needs_jax
def test_backends_times_tensorflow_against_jax(tmp_path):
    out = _run("backends.py", "--width=0.0625", "--batch_size=8", "--rounds=2", "--steps=1",
               f"--output_dir={tmp_path}")
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((tmp_path / "backends.json").read_text())
    assert set(report["seconds_per_step"]) == {
        "tensorflow/relu", "jax/relu", "tensorflow/sparta", "jax/sparta"}
    assert all(0 < s["min"] <= s["median"] <= s["max"] for s in report["seconds_per_step"].values())
    assert set(report["ratios"]) == {"jax / tensorflow, relu", "jax / tensorflow, sparta",
                                     "sparta / relu, tensorflow", "sparta / relu, jax"}
    assert "TensorFlow against JAX" in (tmp_path / "BACKENDS.md").read_text()
