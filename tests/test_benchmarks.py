"""The benchmarks run and write their reports (tiny sizes: this checks the instruments, not
the speed; the figures are in docs/BENCHMARKS.md)."""

import hashlib
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
from PIL import Image

from conftest import ROOT, fast_jax, jax_without_tensorflow, needs_jax


def _run(script, *args, folder):
    return subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", script), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, **fast_jax(folder)))


def test_at_step_writes_every_figure(tmp_path):
    # --nojit: XLA's compilation of the two steps was a third of this test's time on 2
    # cores; the XLA timing is the same code path as the others, with `jit_compile=True`.
    out = _run("at_step.py", "--model=resnet10",
               "--activations=relu,sparta", "--widths=0.0625", "--batch_size=8",
               "--rounds=2", "--steps=1", "--nojit", f"--output_dir={tmp_path}",
               folder=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((tmp_path / "benchmark.json").read_text())
    assert set(report["seconds_per_step"]) == {
        "at/relu/w0.0625", "at/sparta/w0.0625", "at/sparta_autodiff/w0.0625",
        "standard/relu/w0.0625", "standard/sparta/w0.0625",
        "eager_cleverhans/relu/w0.0625", "eager_cleverhans/sparta/w0.0625"}
    assert all(s["min"] <= s["median"] <= s["max"] for s in report["seconds_per_step"].values())
    assert "sparta / relu, AT, w0.0625" in report["ratios"]
    assert set(report["memory"]) == {"at/sparta/w0.0625", "at/sparta_autodiff/w0.0625"}
    assert report["end_to_end"]["train_img_s"] > 0 and report["end_to_end"]["step_img_s"] > 0
    assert "# The adversarial-training step" in (tmp_path / "BENCHMARKS.md").read_text()


def test_autoattack_time_times_keras_against_art(tmp_path):
    import keras  # pylint: disable=import-outside-toplevel
    inputs = keras.Input((32, 32, 3))  # tiny: the instrument is checked, not the speed
    hidden = keras.layers.Conv2D(4, 3, strides=4, activation="relu")(inputs)
    keras.Model(inputs, keras.layers.Dense(10)(keras.layers.Flatten()(hidden))).save(
        tmp_path / "tiny.keras")
    out = _run("autoattack_time.py",
               f"--model_paths={tmp_path / 'tiny.keras'},{tmp_path / 'tiny.keras'}",
               "--num_examples=10", "--iterations=2", "--queries=3", "--rounds=1",
               f"--output_dir={tmp_path}", folder=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((tmp_path / "autoattack_time.json").read_text())
    assert set(report["seconds"]) == {"art", "keras_three", "keras_standard"}
    assert set(report["ratio_to_art"]) == {"keras_three", "keras_standard"}
    assert all(0 <= a <= 1 for a in report["pooled"]["robust_accuracy"].values())
    assert report["pooled"]["images"] == 20 and len(report["models"]) == 2
    assert list(report["models"][0]["after"]["keras_standard"]) == [
        "apgd-ce", "apgd-t", "fab-t", "square"]
    assert "keras.ops: standard (with FAB-T)" in (tmp_path / "AUTOATTACK_TIME.md").read_text()


def test_profile_step_sums_op_time_by_type(tmp_path):
    out = _run("profile_step.py", "--model=resnet10",
               "--activations=relu,sparta", "--width_multiplier=0.0625",
               "--batch_size=8", "--steps=1", f"--output_dir={tmp_path}", folder=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((tmp_path / "profile.json").read_text())
    relu, sparta = report["ms_per_step"]["relu"], report["ms_per_step"]["sparta"]
    assert relu.get("ReluGrad", 0) > 0 and "Sigmoid" in sparta and "Sigmoid" not in relu
    assert "Process" not in sparta  # the enclosing events are not ops
    assert "| op type | relu | sparta |" in (tmp_path / "PROFILE.md").read_text()


def test_arm_overhead_times_every_arm_against_the_first(tmp_path):
    output = tmp_path / "overhead.json"
    out = _run("arm_overhead.py", "--model=resnet10",
               "--arms=relu,relu_mean", "--width_multiplier=0.0625",
               "--batch_size=4", "--rounds=2", "--steps=1", f"--output={output}", folder=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(output.read_text())
    relu, mean = report["arms"]["relu"], report["arms"]["relu_mean"]
    assert relu["time_vs_ref_median"] == relu["params_vs_ref"] == 1.0
    assert mean["params"] > relu["params"] and mean["s_per_step_median"] > 0
    assert "cores" in report["device"] or "GPU" in report["device"]


def test_sparta_memory_measures_the_custom_gradient_against_autodiff(tmp_path):
    out = _run("sparta_memory.py", "--model=resnet10",
               "--width=0.0625", "--batch_size=8", "--rounds=2",
               "--steps=1", "--workloads=step", f"--output_dir={tmp_path}", folder=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((tmp_path / "tensorflow.json").read_text())
    step = report["workloads"]["step"]
    assert step["memory_measure"].startswith("tf.config.experimental.get_memory_info")
    for config in ("custom", "autodiff"):
        assert step[config]["memory_mib"]["median"] > 0
        assert 0 < step[config]["seconds"]["min"] <= step[config]["seconds"]["max"]
    assert 0 < step["memory_ratio"]["median"] < 1  # the custom gradient keeps less
    assert "| forward and backward |" in (tmp_path / "tensorflow.md").read_text()


@needs_jax
def test_backends_times_tensorflow_against_jax(tmp_path):
    out = _run("backends.py", "--model=resnet10",
               "--width=0.0625", "--batch_size=8", "--rounds=2", "--steps=1",
               f"--output_dir={tmp_path}", folder=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((tmp_path / "backends.json").read_text())
    assert set(report["seconds_per_step"]) == {
        "tensorflow/relu", "jax/relu", "tensorflow/sparta", "jax/sparta"}
    assert all(0 < s["min"] <= s["median"] <= s["max"] for s in report["seconds_per_step"].values())
    assert set(report["ratios"]) == {"jax / tensorflow, relu", "jax / tensorflow, sparta",
                                     "sparta / relu, tensorflow", "sparta / relu, jax"}
    assert "TensorFlow against JAX" in (tmp_path / "BACKENDS.md").read_text()


def _check_gate_report(gate, dtype, batch_size):
    """A report of benchmarks/gate_forms.py at width 0.0625: every form agrees with the
    others and with NumPy within issue 41's bounds, and every shape and ratio is timed."""
    assert len(gate["agreement"]) == 4 + 4  # shifted vs depthwise at 4 shapes; NumPy x 4
    for name, diff in gate["agreement"].items():
        assert diff <= (1e-12 if "float64" in name else 1e-5), (name, diff)
    assert set(gate["timings"]) == {f"{dtype}/{batch_size}x{s}x{s}x{c}" for s, c in (
        (32, 4), (16, 8), (8, 16), (4, 32))}
    for entry in gate["timings"].values():
        assert set(entry["seconds"]) == {"relu", "silu", "sparta/depthwise", "sparta/shifted"}
        assert set(entry["ratios"]) == {f"sparta/{form} / {ref}" for form in (
            "depthwise", "shifted") for ref in ("relu", "silu")}
        assert all(0 < r["min"] <= r["median"] <= r["max"] for r in entry["ratios"].values())


def test_gate_forms_times_each_form_and_holds_them_to_numpy(tmp_path):
    out = _run("gate_forms.py", "--width=0.0625", "--batch_size=2", "--rounds=1", "--steps=1",
               f"--output_dir={tmp_path}", folder=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    _check_gate_report(json.loads((tmp_path / "gate_tensorflow.json").read_text()), "float32",
                       2)
    assert "| forms held to each other |" in (tmp_path / "GATE_TENSORFLOW.md").read_text()


def _tiny_cifar(folder):
    """A .tar.gz in the CIFAR-10 archive's layout: 10 classes, 8 training and 4 test images
    of noise each, under a top folder."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 8), ("test", 4)):
        for c in range(10):
            os.makedirs(folder / "tiny" / split / f"class{c}")
            for i in range(count):
                pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / "tiny" / split / f"class{c}" / f"{i}.png")
    archive = folder / "tiny.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder / "tiny", arcname="tiny")
    return str(archive)


@needs_jax
def test_gpu_jax_tiny_runs_every_part_without_tensorflow(tmp_path):
    """TINY=1 is the GPU run's whole path on the CPU, with TensorFlow unimportable as on the
    lent GPU machine: a GPU never meets the script untried. (Minutes on 2 cores: compiling
    the 11 steps is nearly all of it.)"""
    env = dict(jax_without_tensorflow(tmp_path / "blocked"), TINY="1", PYTHON=sys.executable,
               WHEELS="")
    out_dir = tmp_path / "out"
    out = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_jax.sh"), str(out_dir),
                          _tiny_cifar(tmp_path)], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=1500)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    report = json.loads((out_dir / "gpu_jax.json").read_text())
    assert not report["tensorflow_imported"]
    assert report["machine"]["keras_backend"] == "jax" and report["machine"]["jax"]

    step = report["step"]
    assert set(step["configs"]) == {f"{kind}/{a}/bfloat16" for kind, a in [
        ("at", "relu"), ("at", "sparta"), ("at", "sparta_autodiff"), ("standard", "relu"),
        ("standard", "sparta")]}
    for figures in step["configs"].values():
        assert figures["img_s"] > 0 and figures["compile_s"] > 0 and figures["xla_bytes"] > 0
        s = figures["s_per_step"]
        assert 0 < s["min"] <= s["median"] <= s["max"]
    assert set(step["ratios"]) == {
        "sparta / relu, AT, bfloat16", "sparta custom gradient / autodiff, AT, bfloat16",
        "AT efficiency (K+1) t(standard) / t(AT), relu, bfloat16",
        "AT efficiency (K+1) t(standard) / t(AT), sparta, bfloat16"}

    gate = report["gate"]  # each form of the gate alone, held to the others first
    _check_gate_report(gate, "bfloat16", 16)

    pilot = report["pilot"]
    assert pilot["plan"]["arms"] == ["relu", "sparta"] and pilot["plan"]["epochs"] == 1
    assert pilot["plan"]["train_images"] == 64 and pilot["plan"]["test_images"] == 32
    for arm in ("relu", "sparta"):
        result = pilot["arms"][arm]
        assert 0 <= result["results"]["clean_acc"] <= 1 and "pgd2_acc" in result["results"]
        assert [row["epoch"] for row in result["epochs"]] == [1]
        model = (out_dir / result["model"]).read_bytes()  # for AutoAttack afterwards
        assert hashlib.sha256(model).hexdigest() == result["model_sha256"]
        config = json.loads((out_dir / "pilot" / arm / "config.json").read_text())
        assert config["lr_schedule"] == "onecycle" and config["backend"] == "jax"
        autoattack = result["autoattack"]
        assert autoattack["images"] == 16 and 0 <= autoattack["accuracy"] <= 1
        assert list(autoattack["after"]) == ["apgd-ce", "apgd-t", "fab-t", "square"]
    pair = pilot["paired"]["sparta - relu"]  # no SiLU arm here
    assert set(pilot["paired"]) == {"sparta - relu"} and pair["images"] == 16
    assert pair["low"] <= pair["mean"] <= pair["high"]
    markdown = (out_dir / "GPU_JAX.md").read_text()
    assert "## The compiled AT step" in markdown and "| sparta | " in markdown
    assert "| sparta - relu | " in markdown


def test_gpu_jax_fits_the_pilot_to_the_time_left():
    """The pilot's epochs are the most that fit; the last arm goes while fewer than the
    minimum fit, down to two arms."""
    code = ("import gpu_jax as g; s = {'relu': 1e-4, 'sparta': 2e-4, 'silu': 1.5e-4}; "
            "o = dict.fromkeys(s, 60); print(g.fit_pilot(list(s), s, o, 50000, 450, 10, 15), "
            "g.fit_pilot(list(s), s, o, 50000, 4000, 10, 15), "
            "g.fit_pilot(list(s), {a: 10 * v for a, v in s.items()}, o, 50000, 300, 10, 15))")
    out = subprocess.run([sys.executable, "-c", code], cwd=os.path.join(ROOT, "benchmarks"),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    # 450 s: 3 arms fit 8 epochs (1.25 * (180 + 8 * 22.5) = 450), under 10: SiLU goes;
    # 4000 s: all 3 at the most; 300 s with steps 10 times slower: not one epoch.
    assert out.stdout.split("\n")[0] == \
        "(['relu', 'sparta'], 15) (['relu', 'sparta', 'silu'], 15) (['relu', 'sparta'], 0)"
