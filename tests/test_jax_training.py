"""PGD adversarial training on JAX: the step agrees with TensorFlow's, and sparta-train runs,
resumes after a kill and writes what TensorFlow's apps read, with TensorFlow unimportable."""

import importlib.util
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from conftest import ROOT, jax_without_tensorflow, metrics_rows, needs_jax
from sparta_tf import transfer

_CHECKS = os.path.join(ROOT, "tests", "jax_checks_training.py")


def _checks():
    spec = importlib.util.spec_from_file_location("jax_checks_training", _CHECKS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@needs_jax
def test_the_tf_and_jax_steps_agree(tmp_path):
    """The same weights and batch, PGD without a random start: the two backends' AT steps
    give the same adversarial images, loss and updated weights (the gradients, lr 1).

    TRADES is left out: without a random start its attack begins where the KL's gradient
    is exactly 0, so the sign of round-off decides its first step on each backend."""
    checks = _checks()
    with tf.device("/cpu:0"):
        checks.setup(str(tmp_path))
        for objective in ("pgd", "standard"):
            checks.step(str(tmp_path), objective)
    out = subprocess.run([sys.executable, _CHECKS, str(tmp_path)], capture_output=True,
                         text=True, env=jax_without_tensorflow(tmp_path / "blocked"),
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "tensorflow imported: False" in out.stdout
    for objective in ("pgd", "standard"):
        tf_out = np.load(tmp_path / f"tensorflow_{objective}.npz")
        jax_out = np.load(tmp_path / f"jax_{objective}.npz")
        same = np.mean(np.abs(tf_out["x_adv"] - jax_out["x_adv"]) < 1e-6)  # standard: x
        assert same >= 0.999, f"{objective}: {same:.4%} of the adversarial pixels agree"
        np.testing.assert_allclose(jax_out["loss"], tf_out["loss"], rtol=1e-5)
        weights = [k for k in tf_out if k.startswith("w")]
        assert len(weights) > 20
        for name in weights:
            np.testing.assert_allclose(jax_out[name], tf_out[name], rtol=1e-4, atol=1e-5,
                                       err_msg=f"{objective} {name}")
    # A mistake that both backends share (PGD's loss taken on the clean images) agrees with
    # itself: JAX's PGD step, its attack stubbed to known images, takes its loss on them.
    known = np.load(tmp_path / "jax_known_pgd.npz")
    assert abs(known["known"] - known["clean"]) > 0.01
    np.testing.assert_allclose(known["loss"], known["known"], rtol=1e-5)
    # TRADES on JAX: the step runs, and its loss is TRADES's on the attack's images.
    trades = np.load(tmp_path / "jax_trades.npz")
    assert np.isfinite(trades["loss"]) and trades["moved"] <= 8 / 255 + 1e-6
    np.testing.assert_allclose(trades["loss"], trades["expected"], rtol=1e-5)


def _train(model_dir, env, limit=None, **popen):
    """Runs sparta-train on a tiny run (`popen`: started, not waited for); `limit`: the
    largest file it may write, in bytes (`ulimit -f`)."""
    cmd = [sys.executable, "-m", "trainers.train", f"--model_dir={model_dir}", "--model=resnet10",
           "--max_train=96", "--max_test=20", "--width_multiplier=0.0625", "--epochs=2",
           "--batch_size=16", "--pgd_steps=1", "--eval_pgd_steps=2", "--checkpoint_every=2"]
    if popen:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, **popen)
    limited = limit and (lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
                          preexec_fn=limited)


def _weights(model_dir):
    return transfer.load(model_dir).get_weights()


@needs_jax
def test_sparta_train_on_jax_without_tensorflow_resumes_after_a_kill(tmp_path):
    """Run a trains on one device. Run b, on two host devices, is killed after its first
    checkpoint (step 2 of 6), then stopped in one line by a full disk at the next one
    (`ulimit -f`: Python ignores SIGXFSZ, so writes fail with EFBIG), then resumed: it ends
    as run a, never stopped and on one device, with the same weights, results and metrics
    rows (the resumed epoch's metrics go on from the checkpoint's sums), both devices holding
    the whole training state, and TensorBoard logs. A copy of it whose checkpoint lacks those
    sums (written before they were saved) resumes to the same weights, its row saying from
    which step its metrics count."""
    env = jax_without_tensorflow(tmp_path / "blocked")
    two = dict(env, XLA_FLAGS=env["XLA_FLAGS"] + " --xla_force_host_platform_device_count=2")
    straight = _train(tmp_path / "a", env)
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert "not exported: a SavedModel needs TensorFlow" in straight.stdout
    assert "devices    1 device (jax)" in straight.stdout
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert config["backend"] == "jax"

    killed = tmp_path / "b"
    proc = _train(killed, two, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed / "checkpoints" / "ckpt-1").exists() and proc.poll() is None \
            and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "results.json").exists(), "the run ended before it was killed"
    assert os.listdir(killed / "checkpoints") == ["ckpt-1"], "killed after step 2's save"

    # A checkpoint's weights are ~170 KB, config.json 1 KB: the next save fails.
    limited = _train(killed, two, limit=100_000)
    last = limited.stderr.strip().splitlines()[-1]
    assert limited.returncode == 1 and "Traceback" not in limited.stderr, limited.stderr[-3000:]
    assert last.startswith(f"error: Could not write {killed / 'checkpoints' / 'ckpt-2'} ("), last
    assert "at epoch 1, step 2 of 6" in limited.stdout
    assert not (killed / "metrics.jsonl").exists()  # epoch 1 did not end
    assert os.listdir(killed / "checkpoints") == ["ckpt-1"]  # nothing of ckpt-2 is left
    assert sorted(os.listdir(killed / "checkpoints" / "ckpt-1")) == ["position.json",
                                                                     "state.npz"]

    old = tmp_path / "old"  # its checkpoint as written before state.npz: no metrics' sums
    shutil.copytree(killed, old)
    rewritten = subprocess.run([sys.executable, _CHECKS, "--old_checkpoint", str(old)],
                               cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert rewritten.returncode == 0, rewritten.stderr[-3000:]
    assert sorted(os.listdir(old / "checkpoints" / "ckpt-1")) == ["position.json",
                                                                  "state.weights.h5"]

    for folder, devices in ((killed, two), (old, env)):
        resumed = _train(folder, devices)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert "at epoch 1, step 2 of 6" in resumed.stdout
        assert f"devices    {2 if devices is two else 1} device" in resumed.stdout
        # Read on TensorFlow. Two devices sum the batch's gradients in another order: after
        # 12 steps the weights differ by 1e-4 at most (||diff|| / ||w||: 2e-5 measured).
        a, b = (np.concatenate([w.ravel() for w in _weights(f)]) for f in (tmp_path / "a",
                                                                           folder))
        assert np.linalg.norm(b - a) / np.linalg.norm(a) < 1e-3
    results = {f: json.loads((f / "results.json").read_text()) for f in (tmp_path / "a", killed)}
    assert results[killed].pop("devices") == 2 and results[tmp_path / "a"].pop("devices") == 1
    accuracies = {f: {k: r.pop(k) for k in ("clean_acc", "pgd2_acc")} for f, r in results.items()}
    assert results[killed] == results[tmp_path / "a"]  # the protocol, sizes and eps
    assert accuracies[killed] == pytest.approx(accuracies[tmp_path / "a"], abs=0.051)
    for row, want in zip(metrics_rows(killed), metrics_rows(tmp_path / "a")):
        assert set(row) == set(want)
        for name in set(want) - {"img/s"}:  # an accuracy: one image of 96 may flip
            assert row[name] == pytest.approx(want[name], rel=1e-3,
                                              abs=0.025 if name.endswith("acc") else 0), name
    assert [r.get("metrics_from_step") for r in metrics_rows(old)] == [3, None]

    # TensorBoard's logs: each epoch's row, as scalars.
    from tensorboard.backend.event_processing import event_accumulator
    logs = event_accumulator.EventAccumulator(str(killed / "logs"))
    logs.Reload()
    assert [e.step for e in logs.Scalars("loss")] == [1, 2]
    assert [e.value for e in logs.Scalars("loss")] == pytest.approx(
        [r["loss"] for r in metrics_rows(killed)], rel=1e-6)

    # Two devices: each holds the whole training state after training.
    placed = subprocess.run([sys.executable, _CHECKS, "--state_devices"], cwd=ROOT, env=two,
                            capture_output=True, text=True, timeout=600)
    assert placed.returncode == 0, placed.stderr[-3000:]
    assert placed.stdout.strip().splitlines()[-1] == "devices of each variable: [2]"

    # TensorFlow's apps read it: resuming it on TensorFlow is refused (another backend) ...
    on_tf = subprocess.run(
        [sys.executable, "-m", "trainers.train", f"--model_dir={killed}", "--model=resnet10",
         "--max_train=96", "--max_test=20", "--width_multiplier=0.0625", "--epochs=2",
         "--batch_size=16", "--pgd_steps=1", "--eval_pgd_steps=2"], cwd=ROOT,
        capture_output=True, text=True, timeout=300)
    assert on_tf.returncode != 0 and "backend: 'jax' in model_dir" in on_tf.stderr
    # ... and sparta-evaluate evaluates it.
    evaluated = subprocess.run(
        [sys.executable, "-m", "trainers.evaluate", f"--model_path={killed}",
         "--autoattack=none", "--eval_steps=2", "--pgd_restarts=1", "--square_queries=10"],
        cwd=ROOT,
        capture_output=True, text=True, timeout=300)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    report = json.loads((killed / "eval.json").read_text())
    assert report["accuracy"]["clean"] == pytest.approx(
        json.loads((killed / "results.json").read_text())["clean_acc"], abs=0.1)


@needs_jax
@pytest.mark.parametrize("app", ["export"])  # the others run on JAX
def test_the_tensorflow_only_apps_refuse_jax_in_one_line(app, tmp_path):
    out = subprocess.run([sys.executable, "-m", f"trainers.{app}", "--model_path=x"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env=jax_without_tensorflow(tmp_path / "blocked"))
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1].startswith("error: sparta-")
    assert "needs TensorFlow" in out.stderr and "runs on jax here" in out.stderr
    assert "TensorFlow is not installed" in out.stderr
    assert "Traceback" not in out.stderr


@needs_jax
def test_a_strategy_that_jax_lacks_and_a_batch_that_does_not_split_are_refused_in_one_line(
        tmp_path):
    env = jax_without_tensorflow(tmp_path / "blocked")
    env["XLA_FLAGS"] += " --xla_force_host_platform_device_count=2"
    for flag, needle in (("--strategy=multi_worker", "--strategy=multi_worker needs TensorFlow"),
                         ("--batch_size=15", "--batch_size=15 does not split evenly over the "
                                             "2 devices")):
        out = subprocess.run([sys.executable, "-m", "trainers.train", flag,
                              f"--model_dir={tmp_path / 'run'}"], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
        last = out.stderr.strip().splitlines()[-1]
        assert last.startswith("error: ") and needle in last, last
        assert not (tmp_path / "run").exists()  # refused before anything is written
