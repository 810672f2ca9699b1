"""A Keras user's first day: Sparta into a model they have (`models.replace_activations`),
`import sparta_tf` enough to load its files with Keras's own loader on TensorFlow and on
JAX, and their own model adversarially trained as the README shows it."""

import json
import os
import re
import subprocess
import sys

import keras
import numpy as np
import pytest

import keras_user_checks
import sparta_tf
from conftest import ROOT, jax_without_tensorflow, needs_jax
from sparta_tf import training


def _dense_net():
    inputs = keras.Input((6,))
    x = keras.layers.Dense(5, activation="relu", name="hidden")(inputs)
    x = keras.layers.ReLU(negative_slope=0.1, name="leaky")(x)  # not a ReLU: kept
    x = keras.layers.Dense(4, name="plain")(x)
    x = keras.layers.Activation("relu", name="act")(x)
    return keras.Model(inputs, keras.layers.Dense(3, name="out")(x))


def test_replace_activations_splits_a_relu_layer_and_keeps_every_other_weight():
    net = _dense_net()
    new = sparta_tf.models.replace_activations(net, "silu")
    names = [layer.name for layer in new.layers]
    assert names == ["input_layer" if names[0].startswith("input_layer") else names[0],
                     "hidden", "hidden_silu", "leaky", "plain", "act", "out"]
    assert new.get_layer("hidden").get_config()["activation"] == "linear"
    assert keras.activations.serialize(new.get_layer("act").activation) == "silu"
    assert keras_user_checks.same_other_weights(net, new)
    x = np.random.default_rng(0).normal(size=(4, 6)).astype("float32")
    h = keras.ops.silu(x @ net.get_layer("hidden").kernel + net.get_layer("hidden").bias)
    h = np.where(h > 0, h, 0.1 * h) @ net.get_layer("plain").kernel + net.get_layer("plain").bias
    want = keras.ops.silu(h) @ net.get_layer("out").kernel + net.get_layer("out").bias
    np.testing.assert_allclose(new(x), want, rtol=1e-5, atol=1e-6)
    assert keras.activations.serialize(net.get_layer("hidden").activation) == "relu"  # as it was


def test_replace_activations_on_a_sequential_model_and_the_refusals():
    seq = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(4, 3, activation="relu"),
                            keras.layers.ReLU(max_value=6.0), keras.layers.Flatten(),
                            keras.layers.Dense(2)])
    with pytest.raises(ValueError, match=r"1 capped ReLU\(s\) \(ReLU6\): re_lu.*capped='keep'"):
        sparta_tf.models.replace_activations(seq, "sparta")
    kept = sparta_tf.models.replace_activations(seq, "sparta", capped="keep", kernel_size=5)
    assert [type(layer).__name__ for layer in kept.layers] == [
        "Conv2D", "Sparta", "ReLU", "Flatten", "Dense"]
    assert kept.layers[1].kernel_size == 5 and kept.layers[2].max_value == 6.0
    assert keras_user_checks.same_other_weights(seq, kept)
    with pytest.raises(ValueError, match="capped must be one of"):
        sparta_tf.models.replace_activations(seq, "sparta", capped="drop")
    with pytest.raises(ValueError, match="Unknown activation|unknown"):
        sparta_tf.models.replace_activations(seq, "nosuch")
    outer_in = keras.Input((6,))
    nested = keras.Model(outer_in, _dense_net()(outer_in))
    with pytest.raises(ValueError, match="nested model .* holds ReLUs"):
        sparta_tf.models.replace_activations(nested, "sparta")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model_dir trained on TensorFlow, and images with its logits."""
    folder = tmp_path_factory.mktemp("user")
    config = training.TrainConfig(model_dir=str(folder / "run"), max_train=32, max_test=8,
                                  width_multiplier=0.0625, epochs=1, batch_size=16,
                                  pgd_steps=1, eval_pgd_steps=0, checkpoint_every=0)
    training.run(config, verbose=0)
    x = np.random.default_rng(0).uniform(size=(4, 32, 32, 3)).astype("float32")
    path = folder / "run" / "model.keras"
    logits = np.asarray(keras.models.load_model(path)(x))
    (folder / "trained.keras").write_bytes(path.read_bytes())
    np.savez(folder / "images.npz", x=x, logits=logits)
    return folder


def test_keras_applications_take_sparta_and_round_trip_on_tensorflow(trained):
    found = keras_user_checks.check(str(trained))
    _assert_found(found)


@needs_jax
def test_on_jax_import_sparta_tf_loads_every_file_with_keras_own_loader(trained, tmp_path):
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "keras_user_checks.py"),
                          str(trained)], cwd=ROOT, capture_output=True, text=True,
                         timeout=900, env=jax_without_tensorflow(tmp_path / "blocked"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "tensorflow imported: False" in out.stdout
    _assert_found(json.loads((trained / "jax.json").read_text()), ("mobilenet_v2",))


def _assert_found(found, applications=keras_user_checks.APPLICATIONS):
    assert found["trained_logits_diff"] < 1e-4  # the model_dir's file: TensorFlow's logits
    assert found["mobilenet_v2"]["before"] == [35, 0]  # 35 ReLU6, replaced by choice
    assert set(found) == {"trained_logits_diff", *applications}
    if "resnet50_v2" in applications:
        assert found["resnet50_v2"]["before"] == [49, 0]
    for name in applications:
        assert found[name]["after"] == [0, found[name]["before"][0]], name
        assert found[name]["same_other_weights"], name
        assert found[name]["round_trip_diff"] < 1e-5, name


def test_the_readme_snippet_trains_your_own_model_adversarially(tmp_path):
    """The README's "Your own model, adversarially trained" code, run as written."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    snippet = re.search(r"## Your own model, adversarially trained.*?```python\n(.*?)```",
                        readme, re.S).group(1)
    out = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, capture_output=True,
                         text=True, timeout=600, env=dict(os.environ, KERAS_BACKEND="tensorflow"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "adv_acc" in out.stdout
