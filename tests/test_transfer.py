"""Tests of sparta_tf.transfer, `sparta-train --sparta_from` and `sparta-transfer`."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow_datasets as tfds

from conftest import run_app_cases, run_apps
from sparta_tf import adversarial, checkpoints, layers, models, training, transfer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = 0.0625


def _source(tmp_path, model="resnet18", sharing="stage", width=TINY, kernel_size=3):
    """A Sparta model with distinct random gate values, saved as .keras; returns (model, path)."""
    net = models.build(model, 10, "sparta", width, sparta_sharing=sharing,
                       activation_kwargs={"kernel_size": kernel_size})
    rng = np.random.default_rng(7)
    for layer in transfer.sparta_layers(net).values():
        layer.kernel.assign(rng.normal(size=layer.kernel.shape))
        layer.bias.assign(rng.normal(size=layer.bias.shape))
    path = str(tmp_path / f"{model}_{sharing}_{width}_{kernel_size}.keras")
    net.save(path)
    return net, path


def _values(layer):
    return layer.kernel.numpy(), layer.bias.numpy()


def _assert_copied(source, target, pairs):
    src, tgt = transfer.sparta_layers(source), transfer.sparta_layers(target)
    assert [t for _, t in pairs] == list(tgt)  # every target layer, in order
    for s, t in pairs:
        for a, b in zip(_values(src[s]), _values(tgt[t])):
            assert np.array_equal(a, b), (s, t)
        assert not tgt[t].trainable
    frozen = {id(v) for l in tgt.values() for v in l.weights}
    assert not frozen & {id(v) for v in target.trainable_variables}
    assert target.trainable_variables  # the rest still trains


def test_stage_shared_maps_stage_to_stage_resnet18_to_resnet34(tmp_path):
    source, _ = _source(tmp_path)
    target = models.build("resnet34", 10, "sparta", TINY, sparta_sharing="stage")
    pairs = transfer.copy_and_freeze(source, target)
    assert pairs == [(f"sparta_s{i}", f"sparta_s{i}") for i in (1, 2, 3, 4)]
    _assert_copied(source, target, pairs)


def test_per_layer_maps_by_relative_position_inside_each_stage(tmp_path):
    source, _ = _source(tmp_path, sharing="layer")
    target = models.build("resnet34", 10, "sparta", TINY)
    pairs = dict((t, s) for s, t in transfer.copy_and_freeze(source, target))
    # Stages of 3, 4, 6, 3 blocks from 2 each: block b takes floor((b + 1/2) * 2 / B_t).
    expected = {"sparta_stem": "sparta_stem",
                "sparta_s1b1_1": "sparta_s1b1_1", "sparta_s1b2_out": "sparta_s1b1_out",
                "sparta_s2b1_1": "sparta_s2b0_1", "sparta_s2b2_1": "sparta_s2b1_1",
                "sparta_s3b2_out": "sparta_s3b0_out", "sparta_s3b3_out": "sparta_s3b1_out",
                "sparta_s4b0_1": "sparta_s4b0_1", "sparta_s4b2_1": "sparta_s4b1_1"}
    assert {t: pairs[t] for t in expected} == expected
    assert len(pairs) == 1 + 16 * 2
    _assert_copied(source, target, list((s, t) for t, s in pairs.items()))
    # The same network maps layer to layer.
    same = models.build("resnet18", 10, "sparta", TINY)
    assert all(s == t for s, t in transfer.copy_and_freeze(source, same))


@pytest.mark.parametrize("target_kwargs,needles", [
    (dict(width_multiplier=0.125), ["sparta_s1", "(3, 3, 4, 1)", "(3, 3, 8, 1)"]),
    (dict(activation_kwargs={"kernel_size": 5}), ["sparta_s1", "(3, 3, 4, 1)",
                                                 "(5, 5, 4, 1)"]),
    (dict(sparta_sharing="layer"), ["sharings differ", "'stage'", "'layer'", "sparta_s1",
                                    "sparta_stem"]),
    (dict(activation="relu", sparta_sharing="layer"), ["resnet34_relu", "no Sparta layer"]),
    (dict(activation_kwargs={"normalize_gate_input": True}), ["normalize_gate_input"]),
])
def test_what_does_not_fit_is_an_error_naming_both_sides(tmp_path, target_kwargs, needles):
    source, _ = _source(tmp_path)
    kwargs = dict(activation="sparta", width_multiplier=TINY, sparta_sharing="stage")
    kwargs.update(target_kwargs)
    target = models.build("resnet34", 10, **kwargs)
    before = [w.numpy() for w in target.weights]
    with pytest.raises(transfer.TransferError) as info:
        transfer.copy_and_freeze(source, target)
    assert all(n in str(info.value) for n in needles), str(info.value)
    assert all(np.array_equal(a, w.numpy()) for a, w in zip(before, target.weights))
    assert all(l.trainable for l in transfer.sparta_layers(target).values())


def test_other_names_need_an_explicit_mapping():
    def net(name, beta0):
        inputs = keras.Input((8, 8, 3))
        x = keras.layers.Conv2D(4, 3, padding="same")(inputs)
        x = layers.Sparta(name=name, beta0=beta0)(x)
        return keras.Model(inputs, keras.layers.Dense(2)(keras.layers.Flatten()(x)))

    source, target = net("gate_a", 2.0), net("my_gate", 1.0)
    with pytest.raises(transfer.TransferError, match="names="):
        transfer.copy_and_freeze(source, target)
    assert transfer.copy_and_freeze(source, target, names={"my_gate": "gate_a"}) == [
        ("gate_a", "my_gate")]
    np.testing.assert_array_equal(target.get_layer("my_gate").kernel.numpy(),
                                  source.get_layer("gate_a").kernel.numpy())


def test_fingerprint_changes_with_any_value(tmp_path):
    source, path = _source(tmp_path)
    assert transfer.fingerprint(transfer.load(path)) == transfer.fingerprint(source)
    layer = transfer.sparta_layers(source)["sparta_s3"]
    bias = layer.bias.numpy()
    bias[0] = np.nextafter(bias[0], np.float32(1))
    layer.bias.assign(bias)
    assert transfer.fingerprint(transfer.load(path)) != transfer.fingerprint(source)
    with pytest.raises(FileNotFoundError, match="model.keras"):
        transfer.load(tmp_path)  # a folder without model.keras


def _config(model_dir, sparta_from, **overrides):
    values = dict(model_dir=str(model_dir), max_train=64, max_test=8, width_multiplier=TINY,
                  epochs=1, batch_size=32, pgd_steps=1, eval_pgd_steps=0, checkpoint_every=1,
                  model="resnet18", sparta_sharing="stage", sparta_from=sparta_from,
                  weight_decay=5e-2)
    values.update(overrides)
    return training.TrainConfig(**values)


def test_training_keeps_the_copied_sparta_bit_identical_through_checkpoints_and_resume(
        tmp_path):
    source, path = _source(tmp_path)
    run_dir = tmp_path / "run"
    training.run(_config(run_dir, path), verbose=0)
    config = json.load(open(run_dir / "config.json"))
    assert config["sparta_from"] == path
    assert config["sparta_from_sha256"] == transfer.fingerprint(source)

    def check(model):
        for name, layer in transfer.sparta_layers(model).items():
            expected = transfer.sparta_layers(source)[name]
            for a, b in zip(_values(layer), _values(expected)):
                assert np.array_equal(a, b), name
            assert not layer.trainable

    first = keras.models.load_model(run_dir / "model.keras")
    check(first)
    training.run(_config(run_dir, path, epochs=2), verbose=0)  # resumes from the checkpoint
    assert [json.loads(l)["epoch"] for l in open(run_dir / "metrics.jsonl")] == [1, 2]
    second = keras.models.load_model(run_dir / "model.keras")
    check(second)
    assert not np.array_equal(first.get_layer("logits").kernel.numpy(),
                              second.get_layer("logits").kernel.numpy())  # the rest trained
    # The checkpoint names variables by their paths: Sparta's are the [3, 3, C, 1] kernels.
    latest = checkpoints.Checkpoints(str(run_dir / "checkpoints")).latest()
    with np.load(os.path.join(latest, checkpoints.STATE)) as saved:
        values = {path: saved[f"v{i}"] for i, path in enumerate(saved["paths"].tolist())}
    gates = [p.removesuffix("/kernel") for p, v in values.items()
             if p.endswith("/kernel") and v.ndim == 4 and v.shape[-1] == 1]
    stored = sorted((values[f"{g}/kernel"].tobytes(), values[f"{g}/bias"].tobytes())
                    for g in gates)
    wanted = sorted((k.tobytes(), b.tobytes()) for k, b in
                    map(_values, transfer.sparta_layers(source).values()))
    assert stored == wanted


def test_frozen_sparta_gets_no_weight_decay_and_a_changed_source_is_refused(tmp_path):
    source, path = _source(tmp_path)
    config = _config(tmp_path / "run", path)
    config, loaded = training.with_sparta_source(config)
    model = adversarial.build(config, 10, (32, 32, 3), 2, {"sparta_from": loaded})
    frozen = {id(v) for l in transfer.sparta_layers(model.model).values() for v in l.weights}
    assert frozen and not frozen & {id(v) for v in model.decayed}
    assert not frozen & {id(v) for v in model.optimizer.variables}

    training.run(_config(tmp_path / "run", path), verbose=0)
    layer = transfer.sparta_layers(source)["sparta_s2"]
    layer.bias.assign(layer.bias.numpy() + 1)
    source.save(path)
    with pytest.raises(training.ConfigMismatchError, match="sparta_from_sha256"):
        training.run(_config(tmp_path / "run", path, epochs=2), verbose=0)


def test_svhn_cropped_target_through_tfds(tmp_path, monkeypatch):
    """The paper's cross-dataset target, read through TFDS (mocked: no network here)."""
    _, path = _source(tmp_path, model="resnet10")
    monkeypatch.setattr(tfds.core.DatasetBuilder, "is_prepared", lambda self: True)
    with tfds.testing.mock_data(num_examples=64):
        results = training.run(_config(tmp_path / "svhn", path, model="resnet10",
                                       dataset="svhn_cropped", data_dir=str(tmp_path)),
                               verbose=0)
    assert results["train_examples"] == 64 and 0 <= results["clean_acc"] <= 1
    net = keras.models.load_model(tmp_path / "svhn" / "model.keras")
    assert net.output_shape == (None, 10)
    assert not any(l.trainable for l in transfer.sparta_layers(net).values())


def _run(app, *args):
    return subprocess.run([sys.executable, "-m", f"trainers.{app}", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


REFUSED_SOURCES = [
    (["--width_multiplier=0.125"], ["error:", "(3, 3, 4, 1)", "(3, 3, 8, 1)", "sparta_s1"]),
    (["--sparta_sharing=layer"], ["error:", "sharings differ"]),
    (["--activation=relu", "--sparta_sharing=layer"], ["--sparta_from", "--activation=sparta"]),
]


def test_trainer_refuses_a_source_that_does_not_fit_and_writes_nothing(tmp_path):
    """The first as a user runs it, in its own process; the others in one process."""
    _, path = _source(tmp_path)
    cases = [[f"--sparta_from={path}", "--model=resnet34", "--max_train=64", "--batch_size=32",
              "--max_test=8", f"--width_multiplier={TINY}", "--sparta_sharing=stage", *args,
              f"--model_dir={tmp_path / 'run'}"] for args, _ in REFUSED_SOURCES]
    runs = [_run("train", *cases[0]), *run_app_cases("train", cases[1:])]
    for out, (args, needles) in zip(runs, REFUSED_SOURCES):
        assert out.returncode != 0, args
        assert all(n in out.stderr for n in needles), (args, out.stderr[-2000:])
        assert "Traceback" not in out.stderr and "Epoch" not in out.stdout, args
        assert not (tmp_path / "run").exists(), args


def test_a_corrupt_source_file_is_one_line_in_every_app_that_reads_it(tmp_path):
    """`--sparta_from` naming a file that is no .keras archive: sparta-train,
    sparta-transfer and sparta-compare (its sparta_transfer arm) each end in one line that
    names it, and write nothing. All in one process."""
    corrupt = tmp_path / "corrupt.keras"
    corrupt.write_bytes(b"PK\x03\x04 not a model")
    run = [f"--sparta_from={corrupt}", f"--model_dir={tmp_path / 'run'}", "--max_train=64",
           "--batch_size=32", "--max_test=8", f"--width_multiplier={TINY}"]
    runs = run_apps([("train", run), ("transfer", [*run, "--seeds=0", "--autoattack=none"]),
                     ("compare", [*run, "--seeds=0", "--activations=relu,sparta_transfer"])])
    for out in runs:
        assert out.returncode == 1, (out.args, out.stderr[-2000:])
        assert out.stderr == (f"error: {corrupt} is not a .keras file: it is no zip archive "
                              "(corrupt or truncated?).\n"), (out.args, out.stderr[-2000:])
        assert "Epoch" not in out.stdout, out.args
    assert os.listdir(tmp_path) == ["corrupt.keras"]


def test_transfer_trainer_needs_a_source():
    out = _run("transfer", "--model_dir=/nonexistent/never_written")
    assert out.returncode != 0 and "--sparta_from" in out.stderr
    assert "Traceback" not in out.stderr
    out = _run("compare", "--activations=relu,sparta_transfer",
               "--model_dir=/nonexistent/never_written")
    assert out.returncode != 0 and "needs --sparta_from" in out.stderr


def test_transfer_trainer_compares_relu_fresh_and_transferred_sparta(tmp_path):
    """A trained Sparta into a deeper network, stage to stage: ResNet-10 to ResNet-18 here, as
    ResNet-18 to ResNet-34 in the paper, with fewer layers to train."""
    _, path = _source(tmp_path, model="resnet10")
    flags = ["--dataset=bundled", "--max_train=64", "--max_test=8", "--width_multiplier=0.0625",
             "--epochs=1", "--batch_size=32", "--pgd_steps=1", "--eval_pgd_steps=1",
             "--checkpoint_every=0", "--autoattack=none", "--noplots", "--seeds=0",
             "--eps_curve=0,8/255", "--model=resnet18", "--sparta_sharing=stage",
             f"--sparta_from={path}", f"--model_dir={tmp_path / 'cmp'}"]
    out = _run("transfer", *flags)
    assert out.returncode == 0, out.stderr[-3000:]
    for arm in ("relu", "sparta", "sparta_transfer"):
        assert f"| {arm} |" in out.stdout
    assert "| seed by seed: clean / PGD | seed 0 |" in out.stdout
    cell = tmp_path / "cmp" / "pgd" / "sparta_transfer" / "seed0"
    config = json.load(open(cell / "config.json"))
    assert config["sparta_from"] == path and config["activation"] == "sparta"
    fresh = json.load(open(tmp_path / "cmp" / "pgd" / "sparta" / "seed0" / "config.json"))
    assert fresh["sparta_from"] is None and fresh["sparta_sharing"] == "stage"
    report = json.load(open(tmp_path / "cmp" / "comparison.json"))
    assert report["train"]["sparta_from_sha256"] == config["sparta_from_sha256"]
    mtime = os.path.getmtime(cell / "model.keras")
    again = _run("transfer", *flags)  # every cell is finished: nothing retrains
    assert again.returncode == 0 and os.path.getmtime(cell / "model.keras") == mtime
