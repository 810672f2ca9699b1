"""Tests of sparta_tf.training: the AT train step, MirroredStrategy, checkpoints and resume."""

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import types

import keras
import numpy as np
import pytest
import tensorflow as tf

import jax_checks_training
from conftest import assert_same_rows, metrics_rows
from sparta_tf import adversarial, attacks, checkpoints, layers, model_dir, models, training

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny_config(model_dir, **overrides):
    values = dict(model_dir=str(model_dir), model="resnet10", max_train=160, max_test=20,
                  width_multiplier=0.0625, epochs=1, batch_size=32, pgd_steps=1, eval_pgd_steps=2,
                  checkpoint_every=2)
    values.update(overrides)
    return training.TrainConfig(**values)


@pytest.mark.parametrize("objective", training.OBJECTIVES)
def test_objectives_train_and_report_metrics(objective):
    net = models.build("resnet10", 10, "sparta", width_multiplier=0.0625)
    attack = None if objective == "standard" else attacks.PGD(8 / 255, 2)
    model = adversarial.AdversarialModel(net, objective, attack, weight_decay=5e-4)
    model.compile(keras.optimizers.SGD(0.05, momentum=0.9))
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(16, 32, 32, 3)).astype("float32")
    y = rng.integers(0, 10, 16).astype("int32")
    before = [w.copy() for w in net.get_weights()]
    history = model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    expected = {"standard": {"loss", "clean_acc"}, "pgd": {"loss", "adv_acc"},
                "trades": {"loss", "clean_acc", "adv_acc"}}[objective]
    assert set(history.history) == expected
    assert np.isfinite(history.history["loss"][0])
    assert any(not np.array_equal(a, b) for a, b in zip(before, net.get_weights()))


@pytest.mark.parametrize("objective,trained_on", [("pgd", "known"), ("standard", "clean")])
def test_the_step_trains_on_the_images_of_its_objective(objective, trained_on):
    """PGD's step takes its loss on what the attack returns (stubbed to known images), not on
    the clean batch; the standard step on the clean batch."""
    found = jax_checks_training.known_images_step(objective)
    assert abs(found["known"] - found["clean"]) > 0.01, found  # the two can be told apart
    np.testing.assert_allclose(found["loss"], found[trained_on], rtol=1e-5)


def test_sparta_weight_decay_switch():
    net = models.build("resnet10", 10, "sparta", width_multiplier=0.0625)
    with_decay = adversarial.AdversarialModel(net, "standard", weight_decay=1e-3)
    without = adversarial.AdversarialModel(net, "standard", weight_decay=1e-3, decay_sparta=False)
    sparta_vars = [v for v in net.trainable_variables if "sparta" in v.path]
    assert sparta_vars and len(with_decay.decayed) - len(without.decayed) == len(sparta_vars)


def test_sparta_lr_multiplier_scales_only_the_sparta_steps():
    keras.utils.set_random_seed(0)
    net = models.build("resnet18", 10, "sparta", width_multiplier=0.0625,
                       input_shape=(16, 16, 3))
    init = net.get_weights()
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(8, 16, 16, 3)).astype("float32")
    y = rng.integers(0, 10, 8).astype("int32")
    steps = []
    for multiplier in (1.0, 10.0):
        net.set_weights(init)
        model = adversarial.AdversarialModel(net, "standard", sparta_lr_multiplier=multiplier)
        model.compile(keras.optimizers.SGD(0.01))
        model.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False)
        steps.append({v.path: v.numpy() - w for v, w in zip(net.weights, init)
                      if v.trainable})
    sparta = [p for p in steps[0] if "sparta" in p]
    assert len(sparta) == 2 * 17
    for path, step in steps[0].items():
        want = 10 * step if path in sparta else step
        # atol: w + step - w in float32 is off by a few ulps of w (~1)
        np.testing.assert_allclose(steps[1][path], want, rtol=1e-4, atol=1e-6, err_msg=path)
    assert max(np.abs(steps[0][p]).max() for p in sparta) > 1e-6  # the gate did move


_MIRRORED = textwrap.dedent("""
    import json, sys
    import numpy as np, tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    # The same numbers on every run (seed 0's PGD diff was bit-identical in two processes).
    tf.config.experimental.enable_op_determinism()
    import keras
    from sparta_tf import adversarial, attacks, layers, model_dir, models, training

    rng = np.random.default_rng(0)
    x = rng.uniform(size=(32, 16, 16, 3)).astype("float32")
    y = rng.integers(0, 10, 32).astype("int32")

    def train(strategy, objective, init):
        with strategy.scope():
            # Synchronized batch norm where several replicas train, as training.run builds it.
            net = models.build("resnet10", 10, "sparta", width_multiplier=0.0625,
                               input_shape=(16, 16, 3),
                               synchronized=strategy.num_replicas_in_sync > 1)
            net.set_weights(init)
            # No random start: the replicas would draw other noise than one device.
            model = adversarial.AdversarialModel(
                net, objective, attacks.PGD(8 / 255, 2, random_start=False), weight_decay=5e-4)
            model.compile(keras.optimizers.SGD(0.05, momentum=0.9))
        ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
        model.fit(ds, epochs=1, verbose=0)
        return net.get_weights(), strategy.num_replicas_in_sync

    result = {}
    for objective in sys.argv[1:]:
        keras.utils.set_random_seed(0)
        init = models.build("resnet10", 10, "sparta", width_multiplier=0.0625,
                            input_shape=(16, 16, 3)).get_weights()
        one, n1 = train(tf.distribute.OneDeviceStrategy("/cpu:0"), objective, init)
        two, n2 = train(tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]), objective, init)
        norm = lambda ws: float(np.sqrt(sum(np.sum(np.square(w)) for w in ws)))
        change = norm([a - b for a, b in zip(one, init)])
        diff = norm([a - b for a, b in zip(one, two)])
        result[objective] = {"replicas": [n1, n2], "relative_diff": diff / change,
                             "change": change}
    print(json.dumps(result))
""")


def test_mirrored_strategy_matches_one_device():
    out = subprocess.run([sys.executable, "-c", _MIRRORED, "standard", "pgd"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads(out.stdout.strip().splitlines()[-1])
    for objective, result in results.items():
        assert result["replicas"] == [1, 2], objective
        assert result["change"] > 1e-3, f"{objective}: training did not move the weights"
    # ||w_two - w_one|| / ||w_one - w_init||: 1.8e-6 (standard) and 2.0e-6 (pgd) measured; with
    # the loss not divided by the replicas, 0.42 and 0.48. Without PGD only round-off differs.
    assert results["standard"]["relative_diff"] < 1e-4, f"2 replicas vs 1 device: {results}"
    # PGD takes the sign of the input gradient: round-off can flip it where the gradient is
    # near 0. With op determinism and a fixed seed they repeat run to run, but they depend on
    # the initial weights (seed 0: 2e-6; seed 7 of 0-11: 0.044), and may on the CPU.
    assert results["pgd"]["relative_diff"] < 0.15, f"2 replicas vs 1 device: {results}"


def test_config_mismatch_is_refused_unless_overwrite(tmp_path):
    config = _tiny_config(tmp_path / "run")
    training.prepare_model_dir(config, overwrite=False)
    other = _tiny_config(tmp_path / "run", activation="relu", eps=4 / 255)
    with pytest.raises(training.ConfigMismatchError, match="activation: 'sparta' in model_dir"):
        training.prepare_model_dir(other, overwrite=False)
    # More epochs is the same experiment, continued.
    assert training.prepare_model_dir(_tiny_config(tmp_path / "run", epochs=3), False)
    assert not training.prepare_model_dir(other, overwrite=True)


@pytest.mark.parametrize("field, value", [
    ("lr", 0.05), ("lr_schedule", "cosine"), ("lr_decay_epochs", (1.0,)), ("momentum", 0.5),
    ("weight_decay", 0.0), ("sparta_weight_decay", False), ("mixed_precision", "mixed_bfloat16"),
    ("sparta_custom_gradient", False), ("max_train", 96)])
def test_every_field_of_the_recipe_is_the_experiments_identity(tmp_path, field, value):
    training.prepare_model_dir(_tiny_config(tmp_path / "run"), overwrite=False)
    with pytest.raises(training.ConfigMismatchError, match=f"{field}: "):
        training.prepare_model_dir(_tiny_config(tmp_path / "run", **{field: value}), False)


@pytest.mark.parametrize("field, value", [
    ("epochs", 3), ("checkpoint_every", 0), ("eval_pgd_steps", 0), ("max_test", 10),
    ("data_dir", "/elsewhere"), ("jit_compile", True), ("strategy", "multi_worker"),
    ("max_extract_gb", 64.0), ("max_extract_ratio", 500.0)])
def test_only_the_resumable_fields_may_change_on_resume(tmp_path, field, value):
    training.prepare_model_dir(_tiny_config(tmp_path / "run"), overwrite=False)
    assert training.prepare_model_dir(_tiny_config(tmp_path / "run", **{field: value}), False)
    assert set(training.TrainConfig.RESUMABLE) == {
        "model_dir", "data_dir", "max_extract_gb", "max_extract_ratio", "max_test", "epochs",
        "checkpoint_every", "eval_pgd_steps", "jit_compile", "strategy", "sparta_from",
        "gates_from"}


def test_a_dataset_archive_counts_by_its_name_not_its_folder(tmp_path):
    first = _tiny_config(tmp_path / "run", dataset="/data/a/cifar10-jpeg.tar.gz")
    training.prepare_model_dir(first, overwrite=False)
    moved = _tiny_config(tmp_path / "run", dataset="/elsewhere/cifar10-jpeg.tar.gz")
    assert training.prepare_model_dir(moved, overwrite=False)
    other = _tiny_config(tmp_path / "run", dataset="/elsewhere/gtsrb-32.tar.gz")
    with pytest.raises(training.ConfigMismatchError, match="dataset: 'cifar10-jpeg.tar.gz'"):
        training.prepare_model_dir(other, overwrite=False)


def test_a_config_written_before_a_field_existed_takes_its_default(tmp_path):
    config = _tiny_config(tmp_path / "run")
    training.prepare_model_dir(config, overwrite=False)
    path = tmp_path / "run" / "config.json"
    old = json.loads(path.read_text())
    del old["sparta_lr_multiplier"]  # as written before the flag existed
    path.write_text(json.dumps(old))
    assert training.prepare_model_dir(config, overwrite=False)  # resumes
    path.write_text(json.dumps(old))
    with pytest.raises(training.ConfigMismatchError, match="sparta_lr_multiplier: 1.0 in"):
        training.prepare_model_dir(_tiny_config(tmp_path / "run", sparta_lr_multiplier=10.0),
                                    overwrite=False)


def test_run_resumes_with_more_epochs(tmp_path):
    """A finished run given more epochs resumes from its epoch-end checkpoint, and its rows
    are an uninterrupted run's: epoch 2's metrics start from zero, not from the sums of
    epoch 1 that the checkpoint at (epoch 1, step 0) holds (once added to them)."""
    first = training.run(_tiny_config(tmp_path / "run", epochs=1), verbose=0)
    assert set(first) >= {"clean_acc", "pgd2_acc"}
    assert [r["epoch"] for r in metrics_rows(tmp_path / "run")] == [1]
    training.run(_tiny_config(tmp_path / "run", epochs=2), verbose=0)
    training.run(_tiny_config(tmp_path / "straight", epochs=2), verbose=0)
    assert [r["epoch"] for r in metrics_rows(tmp_path / "run")] == [1, 2]
    assert_same_rows(metrics_rows(tmp_path / "run"), metrics_rows(tmp_path / "straight"))
    for name in ("config.json", "results.json", "model.keras", "logs", "checkpoints"):
        assert os.path.exists(tmp_path / "run" / name), name


def test_a_retrained_run_replaces_the_old_runs_metrics(tmp_path):
    run_dir = tmp_path / "run"
    training.run(_tiny_config(run_dir, epochs=2), verbose=0)
    first = [json.loads(l) for l in open(run_dir / "metrics.jsonl")]
    # The checkpoints and model go (as when only the reports are kept); config.json and
    # metrics.jsonl stay, so the same experiment trains again from scratch.
    for name in ("checkpoints", "model.keras"):
        path = run_dir / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    training.run(_tiny_config(run_dir, epochs=2), verbose=0)
    second = [json.loads(l) for l in open(run_dir / "metrics.jsonl")]
    assert [r["epoch"] for r in second] == [1, 2]  # not [1, 2, 1, 2]
    assert [r["epoch"] for r in first] == [1, 2]


def test_no_checkpoint_at_an_epochs_last_step_and_a_damaged_one_falls_back(tmp_path, capsys):
    """With --checkpoint_every dividing the epoch's 5 steps, the last step is not saved
    apart (a kill after it resumed into an empty epoch, forever). A truncated newest
    checkpoint falls back to the older one; what a kill left half-written is removed."""
    run_dir = tmp_path / "run"
    training.run(_tiny_config(run_dir, checkpoint_every=1, objective="standard"), verbose=0)
    folder = run_dir / "checkpoints"
    kept = sorted(os.listdir(folder), key=lambda name: int(name[5:]))
    positions = [json.loads((folder / name / "position.json").read_text()) for name in kept]
    assert [(p["epoch"], p["step"]) for p in positions] == [(0, 4), (1, 0)]  # not (0, 5)

    newest = folder / kept[-1]
    with open(newest / "state.npz", "r+b") as f:
        f.truncate(100)
    (folder / "ckpt-9_temp").mkdir()  # as a kill during a save leaves them
    (run_dir / ".model.keras.tmp-abc123.keras").write_bytes(b"half a model")
    capsys.readouterr()
    training.run(_tiny_config(run_dir, checkpoint_every=1, objective="standard", epochs=2),
                 verbose=0)
    out = capsys.readouterr().out
    assert f"checkpoint {newest} cannot be read" in out and "at epoch 1, step 4 of 5" in out
    assert not (folder / "ckpt-9_temp").exists()
    assert not (run_dir / ".model.keras.tmp-abc123.keras").exists()


def test_a_corrupt_config_json_is_one_clear_error(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.json").write_text('{"model": "resnet18", "epo')
    with pytest.raises(training.ConfigMismatchError, match="config.json is not valid JSON"):
        training.prepare_model_dir(_tiny_config(run_dir), overwrite=False)
    (run_dir / "config.json").write_text("[1, 2]")
    with pytest.raises(training.ConfigMismatchError, match="not a config.json of sparta-train"):
        training.prepare_model_dir(_tiny_config(run_dir), overwrite=False)
    assert not training.finished(_tiny_config(run_dir))


def test_an_empty_model_file_is_not_a_finished_run(tmp_path):
    """A kill used to leave a 0-byte model.keras that `finished` trusted: sparta-compare
    skipped the cell, then failed on every rerun."""
    config = _tiny_config(tmp_path / "run")
    training.prepare_model_dir(config, overwrite=False)
    (tmp_path / "run" / "model.keras").write_bytes(b"")
    assert not training.finished(config)


def test_overwrite_deletes_only_a_model_dir_and_a_held_one_is_refused(tmp_path):
    users = tmp_path / "mine"
    users.mkdir()
    (users / "data.csv").write_text("a,b")
    with pytest.raises(model_dir.NotAModelDirError, match="data.csv"):
        training.run(_tiny_config(users), overwrite=True, verbose=0)
    assert sorted(os.listdir(users)) == ["data.csv"]  # nothing deleted, nothing written

    held = str(tmp_path / "held")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from sparta_tf import model_dir\n"
         "with model_dir.lock(sys.argv[1]):\n print('locked', flush=True); time.sleep(600)",
         held], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(model_dir.LockedError, match=f"process {holder.pid} "):
            training.run(_tiny_config(held), verbose=0)
    finally:
        holder.kill()
        holder.wait()
    assert not os.path.exists(os.path.join(held, "config.json"))


def test_stalled_is_a_loss_still_at_chance_from_the_third_epoch():
    assert training.stalled(2.31, 10, 3) and training.stalled(3.77, 43, 5)
    assert not training.stalled(2.31, 10, 2)  # too early to tell
    assert not training.stalled(2.17, 10, 3)  # learning
    assert not training.stalled(2.31, 43, 3)  # below ln 43 = 3.76
    assert not training.stalled(2.31, 10, 3, objective="trades")  # CE + KL: not at chance


@pytest.mark.parametrize("objective", ["pgd", "trades"])
def test_a_run_that_does_not_learn_is_warned_of(tmp_path, capsys, objective):
    training.run(_tiny_config(tmp_path / "run", epochs=3, lr=0.0, objective=objective), verbose=0)
    rows = [json.loads(l) for l in open(tmp_path / "run" / "metrics.jsonl")]
    warned = capsys.readouterr().out.count("still at chance")
    assert rows[-1]["loss"] > 2.3  # not learning
    # At epoch 3, not 1 and 2; never for TRADES, whose loss is not a cross-entropy alone.
    assert warned == (1 if objective == "pgd" else 0)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    config = _tiny_config(tmp_path / "run", lr=1e30, weight_decay=0.0, checkpoint_every=1,
                          objective="standard")
    with pytest.raises(training.NonFiniteLossError, match="last good checkpoint"):
        training.run(config, verbose=0)
    latest = checkpoints.Checkpoints(str(tmp_path / "run" / "checkpoints")).latest()
    assert latest, "no checkpoint was kept"
    with np.load(os.path.join(latest, checkpoints.STATE)) as saved:
        for name in saved.files:  # the checkpoint holds finite weights only
            if saved[name].dtype.kind == "f":
                assert np.isfinite(saved[name]).all(), name
    assert not os.path.exists(tmp_path / "run" / "results.json")


_RESUMED = dict(epochs=2, checkpoint_every=2)  # 5 steps an epoch: saves at steps 2 and 4


def _app_cmd(folder):
    """The sparta-train command of `_tiny_config(folder, **_RESUMED)`."""
    return [sys.executable, "-m", "trainers.train", f"--model_dir={folder}", "--model=resnet10",
            "--max_train=160", "--max_test=20", "--width_multiplier=0.0625", "--epochs=2",
            "--batch_size=32", "--pgd_steps=1", "--eval_pgd_steps=2", "--checkpoint_every=2"]


def _failing_second_save(monkeypatch, error):
    """Makes the second checkpoint save of a run raise `error` as it writes, as a full disk
    does."""
    real, saves = np.savez, []

    def save(*args, **kwargs):
        saves.append(args[0])
        if len(saves) == 2:
            raise error
        return real(*args, **kwargs)

    monkeypatch.setattr(np, "savez", save)


def test_a_failed_checkpoint_stops_the_run_in_one_line_and_it_resumes_to_the_same_run(
        tmp_path, monkeypatch, capsys):
    """A checkpoint that cannot be written stops the run, and no metrics row is written for
    the epoch. TensorFlow reports a full disk as OutOfRangeError, which Keras's fit() took
    for the end of the data: the epoch ended early and its row was written as complete.

    Run b's save at step 4 fails so (in this process); then sparta-train resumes it at step
    2 under `ulimit -f` (Python ignores SIGXFSZ: writes fail with EFBIG) and stops at the
    same save, in one line; then, with space back, it ends as run a, never stopped: the
    same weights, results and metrics rows, the resumed epoch's too (its metrics go on from
    the partial sums in the checkpoint)."""
    straight = training.run(_tiny_config(tmp_path / "a", **_RESUMED), verbose=0)
    run_dir = tmp_path / "b"
    full = tf.errors.OutOfRangeError(None, None, "ckpt: File too large")
    _failing_second_save(monkeypatch, full)
    with pytest.raises(training.WriteError, match=r"checkpoints/ckpt-2 "
                       r"\(OutOfRangeError: ckpt: File too large\)\. Training stopped"):
        training.run(_tiny_config(run_dir, **_RESUMED), verbose=0)
    monkeypatch.undo()
    assert not (run_dir / "metrics.jsonl").exists()  # epoch 1 did not end

    # A checkpoint is ~170 KB, config.json 1 KB: the first save fails.
    limited = subprocess.run(
        _app_cmd(run_dir), cwd=ROOT, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
        capture_output=True, text=True, timeout=600,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000)))
    last = limited.stderr.strip().splitlines()[-1]
    assert limited.returncode == 1 and "Traceback" not in limited.stderr, limited.stderr[-3000:]
    assert last.startswith(f"error: Could not write {run_dir / 'checkpoints' / 'ckpt-2'} (") \
        and "File too large" in last, last
    assert "at epoch 1, step 2 of 5" in limited.stdout
    assert not (run_dir / "metrics.jsonl").exists()

    capsys.readouterr()
    resumed = training.run(_tiny_config(run_dir, **_RESUMED), verbose=0)
    assert "at epoch 1, step 2 of 5" in capsys.readouterr().out
    assert resumed == straight
    for a, b in zip(_final_weights(tmp_path / "a"), _final_weights(run_dir)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    assert_same_rows(metrics_rows(run_dir), metrics_rows(tmp_path / "a"))


def test_a_tf_train_checkpoint_of_the_old_trainer_is_refused_in_one_line(tmp_path):
    """The TensorFlow trainer of 0.1 wrote tf.train checkpoints (a `checkpoint` index and
    `ckpt-N.index`/`.data-*` files): they are refused, named, and left as they are."""
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    (folder / "checkpoint").write_text('model_checkpoint_path: "ckpt-1"\n')
    (folder / "ckpt-1.index").write_bytes(b"old")
    with pytest.raises(training.SetupError, match=r"holds tf\.train checkpoints, written by "
                       r"the TensorFlow trainer of sparta-tf 0\.1.*--overwrite\.$"):
        checkpoints.Checkpoints(str(folder)).restore(None)
    assert sorted(os.listdir(folder)) == ["checkpoint", "ckpt-1.index"]


def test_a_model_or_results_that_cannot_be_written_is_one_write_error(tmp_path):
    """A full disk while saving model.keras or results.json (`ulimit -f` in this process:
    Python ignores SIGXFSZ, so writes fail with EFBIG) is a WriteError naming the file;
    the old file stays whole and no temporary file is left."""
    config = _tiny_config(tmp_path)
    net = models.build("resnet18", 10, "relu", width_multiplier=0.0625)  # ~450 KB saved
    ds = types.SimpleNamespace(class_names=[str(i) for i in range(10)],
                               x_train=np.zeros(4), y_test=np.zeros(2))
    (tmp_path / "model.keras").write_bytes(b"old model")
    (tmp_path / "results.json").write_text("{}")
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    try:
        resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, hard))
        with pytest.raises(training.WriteError, match=r"model\.keras \(.*File too large"):
            training.save_model(config, net, ds)
        resource.setrlimit(resource.RLIMIT_FSIZE, (10, hard))
        with pytest.raises(training.WriteError, match=r"results\.json \(OSError: .*too large"):
            training.write_results(config, ds, {"clean_acc": 0.5})
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert (tmp_path / "model.keras").read_bytes() == b"old model"
    assert (tmp_path / "results.json").read_text() == "{}"
    assert sorted(os.listdir(tmp_path)) == ["model.keras", "results.json"]


def _train_cmd(model_dir):
    return [sys.executable, "-m", "trainers.train", f"--model_dir={model_dir}",
            "--model=resnet10", "--max_train=320", "--max_test=20", "--width_multiplier=0.0625",
            "--epochs=3", "--batch_size=16", "--pgd_steps=1", "--eval_pgd_steps=1",
            "--checkpoint_every=4"]


def _final_weights(model_dir):
    return keras.models.load_model(os.path.join(model_dir, "model.keras")).get_weights()


def _saving(model_dir):
    """Whether a save is under way in model_dir: a temporary file or checkpoint there."""
    for folder in (model_dir, model_dir / "checkpoints"):
        try:
            names = os.listdir(folder)
        except FileNotFoundError:
            continue
        if any(".tmp-" in n or "_temp" in n for n in names):
            return True
    return False


def _run_and_kill(model_dir, env, delay, during_save):
    """Starts the training command, kills it with SIGKILL after `delay` seconds, or as soon
    as a save is seen under way if `during_save` (after `delay` at the latest). Returns what
    the kill met: 'save', 'time', or 'end' if the run had finished."""
    proc = subprocess.Popen(_train_cmd(model_dir), cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, met = time.time() + delay, "time"
    while proc.poll() is None and time.time() < deadline:
        if during_save and _saving(model_dir):
            met = "save"
            break
        time.sleep(0.0005 if during_save else 0.01)
    if proc.poll() is not None:
        return "end"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return met


def test_killed_at_random_points_the_same_command_ends_with_the_same_weights(tmp_path):
    """Killed with SIGKILL at random times and while saving (checkpoints, metrics, the model,
    results), then rerun: the run ends with the weights of an uninterrupted run.

    --checkpoint_every=4 divides the 20 steps of an epoch: a kill between the last step's
    save and the epoch's own once left a checkpoint that could not resume."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    start = time.time()
    straight = subprocess.run(_train_cmd(tmp_path / "a"), cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=600)
    assert straight.returncode == 0, straight.stderr[-3000:]
    duration = time.time() - start

    seed = int(os.environ.get("KILL_SEED", time.time_ns() % 10_000))
    rng = np.random.default_rng(seed)
    killed_dir, kills = tmp_path / "b", []
    for i in range(2):  # a random time, then the first save seen after one
        delay = rng.uniform(0.3, 1.0) * duration
        kills.append(_run_and_kill(killed_dir, env, delay, during_save=i % 2 == 1))
    resumed = subprocess.run(_train_cmd(killed_dir), cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=600)
    note = f"KILL_SEED={seed}, kills met {kills}"
    print(note)
    assert resumed.returncode == 0, f"{note}\n{resumed.stderr[-3000:]}"
    assert kills.count("end") < len(kills), f"{note}: no kill landed"
    for a, b in zip(_final_weights(tmp_path / "a"), _final_weights(killed_dir)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6, err_msg=note)
    assert json.loads((killed_dir / "results.json").read_text()) == \
        json.loads((tmp_path / "a" / "results.json").read_text()), note
    epochs = [json.loads(l)["epoch"] for l in open(killed_dir / "metrics.jsonl")]
    assert epochs == [1, 2, 3], note
    assert_same_rows(metrics_rows(killed_dir), metrics_rows(tmp_path / "a"), note)
    assert not any(".tmp-" in n or "_temp" in n for n in
                   os.listdir(killed_dir) + os.listdir(killed_dir / "checkpoints")), note


def test_jit_compiled_train_step():
    inputs = keras.Input((8, 8, 3))
    h = keras.layers.Conv2D(4, 3, padding="same")(inputs)
    h = keras.layers.BatchNormalization(synchronized=True)(h)
    h = keras.layers.GlobalAveragePooling2D()(layers.Sparta()(h))
    net = keras.Model(inputs, keras.layers.Dense(3)(h))
    model = adversarial.AdversarialModel(net, "pgd", attacks.PGD(8 / 255, 2))
    model.compile(keras.optimizers.SGD(0.1), jit_compile=True)
    x = np.random.default_rng(0).uniform(size=(8, 8, 8, 3)).astype("float32")
    history = model.fit(x, np.arange(8) % 3, batch_size=4, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])


def test_run_restores_the_dtype_policy_and_evaluates_at_eps_with_a_seeded_pgd(tmp_path):
    config = _tiny_config(tmp_path / "run", objective="standard", eps=2 / 255,
                          mixed_precision="mixed_bfloat16", eval_pgd_steps=2)
    first = training.run(config, verbose=0)
    assert keras.config.dtype_policy().name == "float32"
    assert first["eps"] == 2 / 255  # not 8/255 for a standard-trained model
    again = training.run(config, verbose=0)  # trained already: evaluates again
    assert again["pgd2_acc"] == first["pgd2_acc"]
    with pytest.raises(training.SetupError, match="no full batch"):
        training.run(_tiny_config(tmp_path / "small", max_train=20, batch_size=32), verbose=0)
    assert not (tmp_path / "small").exists()


def test_trades_keeps_pgds_own_checks():
    net = models.build("resnet18", 10, "relu", width_multiplier=0.0625)
    with pytest.raises(ValueError, match="restarts > 1 needs int labels"):
        adversarial.AdversarialModel(net, "trades", attacks.PGD(8 / 255, 2, restarts=2))
    model = adversarial.AdversarialModel(net, "trades", attacks.PGD(8 / 255, 2, 0.01))
    assert (model.attack.eps, model.attack.steps, model.attack.step_size) == (8 / 255, 2, 0.01)
