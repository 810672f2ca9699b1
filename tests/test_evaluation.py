"""Tests of sparta_tf.evaluation and sparta_tf.autoattack: accuracy, AutoAttack via ART, the
robustness report on a normal and a masked model, loading. Each masking check alone, on
reports built to fail it: tests/test_masking.py.

Tiny models (conftest.conv_model, two convolutions on 8x8x3 images, or a 1/16-wide Sparta
ResNet-18 on 16x16x3) and 16-32 random images keep the file fast on 2 CPU cores.
Labels are the model's own clean predictions unless a test says otherwise.
The cross-check of the project's PGD with cleverhans is in tests/test_attacks.py.
"""

import os
import re

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import conv_model
from sparta_tf import attacks, autoattack, evaluation, export, layers, models, protocol

SHAPE = (8, 8, 3)


def _data(model, n, shape=SHAPE, seed=0):
    """Random pixels in [0, 1] and the model's own predictions as labels."""
    x = np.clip(np.random.default_rng(seed).uniform(-0.1, 1.1, (n,) + shape), 0, 1)
    x = x.astype(np.float32)
    return x, np.argmax(model(x), axis=1).astype(np.int32)


@tf.custom_gradient
def _no_gradient(x):
    return tf.identity(x), lambda g: tf.zeros_like(g)


class MaskGradient(keras.layers.Layer):
    """The identity, with a zero gradient: a "fake robust" defence."""

    def call(self, x):
        return _no_gradient(x)


def _masked(model):
    """`model` behind MaskGradient: the same predictions, no usable gradient."""
    inputs = keras.Input(SHAPE)
    return keras.Model(inputs, model(MaskGradient()(inputs)))


# --- accuracy -----------------------------------------------------------------

def test_accuracy_of_uint8_and_float_pixels():
    model = conv_model()
    x = np.random.default_rng(1).integers(0, 256, (20,) + SHAPE).astype(np.uint8)
    y = np.argmax(model(x / 255.0), axis=1)
    y[:5] = (y[:5] + 1) % 10                     # 5 of 20 wrong
    assert evaluation.accuracy(model, x, y, batch_size=8) == 0.75
    assert evaluation.accuracy(model, x / 255.0, tf.constant(y), batch_size=7) == 0.75
    assert evaluation.accuracy(model, x, y, attacks.PGD(8 / 255, 5), batch_size=8) < 0.6


def test_custom_gradient_and_autodiff_give_the_same_robust_accuracy():
    def sparta_resnet(custom):
        keras.utils.set_random_seed(0)
        return models.build("resnet18", 10, activation="sparta", width_multiplier=0.0625,
                            input_shape=(16, 16, 3),
                            activation_kwargs={"use_custom_gradient": custom})

    exact, auto = sparta_resnet(True), sparta_resnet(False)
    auto.set_weights(exact.get_weights())
    assert {l.use_custom_gradient for l in exact.layers if isinstance(l, layers.Sparta)} == {True}
    assert {l.use_custom_gradient for l in auto.layers if isinstance(l, layers.Sparta)} == {False}
    x, y = _data(exact, 32, shape=(16, 16, 3))
    pgd = attacks.PGD(1 / 255, steps=5, random_start=False)
    acc_exact = evaluation.accuracy(exact, x, y, pgd, batch_size=16)
    acc_auto = evaluation.accuracy(auto, x, y, pgd, batch_size=16)
    print(f"PGD-5 at 1/255: custom gradient {acc_exact:.4f}, autodiff {acc_auto:.4f}")
    assert 0.2 < acc_exact < 0.8               # the attack breaks some, not all
    assert acc_exact == acc_auto


# --- AutoAttack -----------------------------------------------------------------

def test_autoattack_through_art():
    model = conv_model()
    x, y = _data(model, 16)
    y[:2] = (y[:2] + 1) % 10                     # 2 of 16 wrong before any attack
    np.random.seed(0)                            # ART's random starts and squares
    eps = 4 / 255
    clean = evaluation.accuracy(model, x, y)
    pgd = evaluation.accuracy(model, x, y, attacks.PGD(eps, 20))
    aa = autoattack.robust_accuracy(model, x, y, eps, batch_size=16, iterations=5, queries=50,
                                    verbose=False)
    print(f"clean {clean}, PGD-20 {pgd}, AutoAttack {aa}")
    assert clean == 14 / 16
    assert list(aa["after"]) == ["apgd-ce", "apgd-t", "square"]
    after = list(aa["after"].values())
    assert after == sorted(after, reverse=True) and aa["accuracy"] == after[-1]
    assert aa["accuracy"] < clean               # it broke something
    assert aa["accuracy"] <= pgd + 2 / 16       # about as strong as PGD-20, or stronger
    # APGD-DLR, untargeted: one run, and it breaks images too.
    dlr = autoattack.robust_accuracy(model, x, y, eps, batch_size=16, iterations=5,
                                     attacks=("apgd-dlr",), verbose=False)
    assert list(dlr["after"]) == ["apgd-dlr"] and dlr["accuracy"] < clean
    with pytest.raises(ValueError, match="fab"):
        autoattack.robust_accuracy(model, x, y, eps, attacks=("fab-t",))



def test_a_seeded_autoattack_repeats_and_leaves_numpys_generator_alone():
    model = conv_model()
    x, y = _data(model, 16)
    eps = 4 / 255

    def run(seed):
        return autoattack.robust_accuracy(model, x, y, eps, batch_size=16, iterations=3,
                                          queries=20, verbose=False, seed=seed)["robust"]

    np.random.seed(5)
    first = run(1)
    assert np.random.rand() == np.random.RandomState(5).rand()  # the state before the call
    np.random.seed(6)  # another global state: the seed alone decides
    assert np.array_equal(run(1), first)
    after = np.random.RandomState(6).rand()
    assert np.random.rand() == after
    assert 0 < first.sum() < len(first)  # some images broken, some not: not a trivial repeat
    # What the seed fixes: ART draws its random starts and squares from that generator.
    np.random.seed(6)
    run(None)
    assert np.random.rand() != after


# --- the gradient-masking checks --------------------------------------------------

def _report(model, x, y):
    np.random.seed(0)
    return evaluation.robustness_report(
        model, x, y, 8 / 255, steps=(5, 20), restarts=2, autoattack_iterations=5,
        square_queries=50, batch_size=32, verbose=False)


def test_masking_checks_pass_on_a_normal_model_and_catch_a_masked_one():
    normal = conv_model()
    masked = _masked(normal)
    x, y = _data(normal, 32)
    np.testing.assert_array_equal(np.argmax(masked(x), axis=1), y)   # the same classifier

    good, fake = _report(normal, x, y), _report(masked, x, y)
    print(evaluation.to_markdown(good))
    print(evaluation.to_markdown(fake))
    checks = {r: {c["name"]: c["passed"] for c in rep["checks"]}
              for r, rep in (("normal", good), ("masked", fake))}
    # The normal model: PGD breaks most examples and every check passes.
    assert good["accuracy"]["clean"] == 1.0
    assert good["accuracy"]["pgd20_ce"] < 0.5
    assert all(checks["normal"].values()), checks["normal"]
    assert "WARNING" not in evaluation.to_markdown(good)
    # The masked one looks robust to every gradient attack ...
    assert fake["accuracy"]["fgsm"] == 1.0
    assert min(v for k, v in fake["accuracy"].items() if k.startswith("pgd")) > 0.85
    # ... but the black-box Square breaks it, and so AutoAttack does too ...
    assert fake["accuracy"]["square"] < fake["accuracy"]["pgd20_ce"] - 0.15
    assert fake["accuracy"]["autoattack"] <= fake["accuracy"]["square"]
    # (Square sees only predictions, which the mask leaves as they are.)
    assert fake["accuracy"]["square"] == good["accuracy"]["square"]
    # ... and PGD at eps 0.5 leaves much standing: two checks catch it.
    assert dict(map(tuple, fake["eps_sweep"]))[0.5] > 0.3
    assert not checks["masked"]["black_box_weaker"]
    assert not checks["masked"]["large_eps"]
    markdown = evaluation.to_markdown(fake)
    assert "**WARNING** `black_box_weaker`" in markdown
    assert "**WARNING** `large_eps`" in markdown
    assert "| PGD-20, CE loss, 2 restarts |" in markdown and "eps = 8/255" in markdown
    # The report names its PGD protocol (`sparta_tf.protocol`); one written before has none.
    assert fake["protocol"] == protocol.Protocol(eps=8 / 255, steps=5, restarts=2,
                                                 batch_size=32).to_json()
    assert ("PGD protocol (`sparta_tf.protocol`): PGD-5 CE x2 at eps 8/255, CE loss, 5 steps "
            "of 2.5 eps / 5, 2 random starts, batches of 32 seeded with [0, 0]; ") in markdown
    old = evaluation.to_markdown({k: v for k, v in fake.items() if k != "protocol"})
    assert old.splitlines() == markdown.splitlines()[:2] + markdown.splitlines()[4:]


# --- load_model -------------------------------------------------------------------

def test_load_model_from_keras_and_savedmodel(tmp_path):
    keras.utils.set_random_seed(0)
    model = models.build("resnet18", 10, activation="sparta", width_multiplier=0.0625,
                         input_shape=(16, 16, 3))
    model.save(tmp_path / "model.keras")
    version = export.export(model, str(tmp_path / "export"), [str(i) for i in range(10)])
    x, y = _data(model, 12, shape=(16, 16, 3))
    expected = model(x, training=False).numpy()
    loaded = {path: evaluation.load_model(path)
              for path in (tmp_path, tmp_path / "model.keras", tmp_path / "export", version)}
    for m in loaded.values():
        np.testing.assert_allclose(m(x, training=False), expected, atol=1e-5)
    keras_model, saved = loaded[tmp_path], loaded[version]
    assert isinstance(keras_model, keras.Model)
    assert isinstance(saved.layer, keras.layers.TFSMLayer)  # serving_default's logits
    assert isinstance(loaded[tmp_path / "export"].layer, keras.layers.TFSMLayer)

    pgd = attacks.PGD(1 / 255, steps=3, random_start=False)
    robust = evaluation.accuracy(model, x, y, pgd)
    assert 0 < robust < 1
    assert evaluation.accuracy(keras_model, x, y, pgd) == robust
    assert evaluation.accuracy(saved, x, y, pgd) == robust

    def gradient(m, x):
        x = tf.convert_to_tensor(x)
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(m(x, training=False)[:, 3])
        return tape.gradient(loss, x)

    # ART differentiates eagerly, on ever smaller subsets of x. Run eagerly at a new batch
    # size, the backward pass of a ResNet (Keras or SavedModel) corrupts the heap of TF 2.21
    # on the CPU (oneDNN) in about half the runs; robust_accuracy() hands ART the model through
    # _compiled, whose backward pass is a graph. The reference is a graph too.
    compiled = autoattack._compiled(saved)
    reference = tf.function(gradient, reduce_retracing=True)
    for n in (12, 5, 1):
        np.testing.assert_allclose(gradient(compiled, x[:n]), reference(model, x[:n]),
                                   atol=1e-5)


def test_load_model_error_names_the_path(tmp_path):
    for path in (str(tmp_path / "missing"), str(tmp_path)):
        with pytest.raises(FileNotFoundError, match="No model at " + re.escape(repr(path))):
            evaluation.load_model(path)
    assert not os.listdir(tmp_path)
