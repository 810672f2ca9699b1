"""The gates-only probe: a trained network kept frozen, only a Sparta trained in place of its
activations (`transfer.copy_network_and_freeze`, `--gates_from`, the grid's gate arms)."""

import json
import subprocess
import sys

import keras
import numpy as np
import pytest

from conftest import ROOT
from sparta_tf import adversarial, models, training, transfer
from sparta_tf.experiments import arms

TINY = 0.0625


def _trained_looking(activation="silu", model="resnet18", width=TINY, seed=3):
    """A network whose every weight (batch norm statistics too) is random, not its init."""
    net = models.build(model, 10, activation, width)
    rng = np.random.default_rng(seed)
    for variable in net.weights:
        values = rng.normal(size=variable.shape).astype(np.float32)
        if "variance" in variable.path:
            values = np.abs(values) + 0.5
        variable.assign(values * (0.3 if "kernel" in variable.path else 1.0))
    return net


def _sparta(kernel_size=3, model="resnet18", width=TINY):
    return models.build(model, 10, "sparta", width,
                        activation_kwargs={"kernel_size": kernel_size})


@pytest.mark.parametrize("kernel_size", [3, 1])
def test_a_sparta_on_a_silu_network_starts_as_that_network_and_only_its_gates_train(
        kernel_size):
    source, target = _trained_looking(), _sparta(kernel_size)
    x = np.random.default_rng(0).uniform(size=(4, 32, 32, 3)).astype(np.float32)
    assert not np.allclose(target.predict(x, verbose=0), source.predict(x, verbose=0))
    copied = transfer.copy_network_and_freeze(source, target)
    assert "logits" in copied and "stem_conv" in copied and not any(
        n.startswith("sparta") for n in copied)
    # Sparta starts at SiLU (beta0 = 1: the gate sees x itself), so the network is the same,
    # to float32 round-off of the logits' scale (the random weights make them ~1e5: sums in
    # another order then differ by ~1e-2).
    expected = source.predict(x, verbose=0)
    np.testing.assert_allclose(target.predict(x, verbose=0), expected, rtol=1e-5,
                               atol=1e-6 * np.abs(expected).max())
    gates = {id(v) for l in transfer.sparta_layers(target).values() for v in l.weights}
    assert {id(v) for v in target.trainable_variables} == gates


def test_networks_that_differ_are_refused_before_anything_is_copied():
    target = _sparta()
    before = [v.numpy().copy() for v in target.weights]
    for source, match in ((_trained_looking(width=2 * TINY), "shapes"),
                          (_trained_looking(model="resnet34"), "only in the source: s1b2_bn1")):
        with pytest.raises(transfer.TransferError, match=match):
            transfer.copy_network_and_freeze(source, target)
    assert all(np.array_equal(a, v.numpy()) for a, v in zip(before, target.weights))
    assert all(v.trainable for v in target.weights if "moving" not in v.path)
    with pytest.raises(transfer.TransferError, match="no Sparta layer"):
        transfer.copy_network_and_freeze(_trained_looking(), _trained_looking("relu"))


def _config(model_dir, gates_from, **overrides):
    values = dict(model_dir=str(model_dir), max_train=64, max_test=8, width_multiplier=TINY,
                  epochs=1, batch_size=32, pgd_steps=1, eval_pgd_steps=0, checkpoint_every=1,
                  gates_from=gates_from, sparta_lr_multiplier=10.0, sparta_weight_decay=False,
                  weight_decay=5e-2)
    values.update(overrides)
    return training.TrainConfig(**values)


def test_gates_only_training_keeps_the_network_bit_identical_and_resumes(tmp_path):
    source = _trained_looking()
    source.save(tmp_path / "silu_seed0.keras")
    template = str(tmp_path / "silu_seed{seed}.keras")  # '{seed}' is the run's seed
    run_dir = tmp_path / "run"
    config, sources = training.with_sources(_config(run_dir, template))
    model = adversarial.build(config, 10, (32, 32, 3), 2, sources)
    gates = {id(v) for l in transfer.sparta_layers(model.model).values() for v in l.weights}
    assert {id(v) for v in model.model.trainable_variables} == gates
    assert not model.decayed  # the frozen network, and the gates with --nosparta_weight_decay

    def check_network(path):
        net = keras.models.load_model(path)
        for name, layer in transfer.network_layers(net).items():
            for a, b in zip(layer.get_weights(), source.get_layer(name).get_weights()):
                assert np.array_equal(a, b), name
        return [l.kernel.numpy() for l in transfer.sparta_layers(net).values()]

    training.run(_config(run_dir, template), verbose=0)
    stored = json.loads((run_dir / "config.json").read_text())
    assert stored["gates_from"] == template
    assert stored["gates_from_sha256"] == transfer.network_fingerprint(source)
    first = check_network(run_dir / "model.keras")
    assert any(not np.array_equal(k, _sparta().get_layer(n).kernel.numpy())
               for k, n in zip(first, transfer.sparta_layers(_sparta())))  # the gates trained
    training.run(_config(run_dir, template, epochs=2), verbose=0)  # resumes
    assert [json.loads(l)["epoch"] for l in open(run_dir / "metrics.jsonl")] == [1, 2]
    second = check_network(run_dir / "model.keras")
    assert any(not np.array_equal(a, b) for a, b in zip(first, second))

    source.get_layer("logits").bias.assign(source.get_layer("logits").bias.numpy() + 1)
    source.save(tmp_path / "silu_seed0.keras")
    with pytest.raises(training.ConfigMismatchError, match="gates_from_sha256"):
        training.run(_config(run_dir, template, epochs=3), verbose=0)
    with pytest.raises(FileNotFoundError):
        training.with_sources(_config(tmp_path / "other", template, seed=1))


def test_the_gate_arms_differ_in_the_gates_kernel_only():
    base = training.TrainConfig(gates_from="runs/silu/seed{seed}", sparta_from="x.keras",
                                activation="relu")
    cells = {arm: arms.cell_config(base, "root", "pgd", arm, 2) for arm in arms.GATE_ARMS}
    assert cells["sparta_gates"].sparta_kernel_size == 3
    assert cells["sparta_k1_gates"].sparta_kernel_size == 1
    for arm, cell in cells.items():
        assert (cell.activation, cell.gates_from, cell.sparta_from, cell.seed) == (
            "sparta", "runs/silu/seed{seed}", None, 2)
        assert cell.model_dir == f"root/pgd/{arm}/seed2"
    assert arms.cell_config(base, "root", "pgd", "silu", 0).gates_from is None
    with pytest.raises(ValueError, match="set gates_from"):
        arms.arm_overrides("sparta_gates", training.TrainConfig())


def test_the_flags_refuse_a_probe_that_cannot_run():
    cases = [(["--gates_from=runs/x{seed}", "--activation=relu"], "needs --activation=sparta"),
             (["--gates_from=runs/x{seed}", "--sparta_from=."], "give one of them"),
             (["--gates_from=/no/such/model"], "must be an existing")]
    code = ("from absl import flags; from flags import core; core.define_training()\n"
            f"for given, _ in {cases!r}:\n"
            "    core.FLAGS.unparse_flags()\n"
            "    try:\n"
            "        core.FLAGS(['x', *given])\n"
            "        print('ACCEPTED', given)\n"
            "    except flags.IllegalFlagValueError as e:\n"
            "        print('REFUSED', str(e).replace(chr(10), ' '))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)  # one process: the flags are defined once
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [l for l in out.stdout.splitlines() if l.startswith(("ACCEPTED", "REFUSED"))]
    assert len(lines) == len(cases)
    for line, (_, message) in zip(lines, cases):
        assert line.startswith("REFUSED") and message in line, line
