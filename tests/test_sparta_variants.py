"""The two Sparta variants of the gate probe (docs/RESULTS.md): `shift` (PSSiLU's output for
negative inputs) and `gate_batch_norm` (a batch norm on the gate's convolution).

Each against a NumPy reference of its formula, its gradient against autodiff of that
formula and against finite differences, its save/load round trip, and its activation name.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import np_depthwise, np_sigmoid
from sparta_tf import activations, config, layers, models

RNG = np.random.default_rng(0)


def _layer(dtype="float64", **kwargs):
    layer = layers.Sparta(dtype=dtype, **kwargs)
    layer.build((None, 5, 6, 3))
    layer.kernel.assign(RNG.normal(size=layer.kernel.shape) * 0.5)
    layer.bias.assign(RNG.normal(size=layer.bias.shape) * 0.1)
    return layer


def test_shift_matches_its_formula_and_starts_as_sparta():
    x = RNG.normal(size=(2, 5, 6, 3))
    layer = _layer(shift=True)
    plain = layers.Sparta(dtype="float64")
    plain.build(x.shape)
    plain.set_weights(layer.get_weights()[:2])
    np.testing.assert_allclose(layer(x), plain(x), atol=1e-12)  # beta starts at 0
    beta = np.array([0.0, 0.3, 0.9])
    layer.beta.assign(beta)
    s = np_sigmoid(np_depthwise(x, layer.kernel.numpy()) + layer.bias.numpy())
    np.testing.assert_allclose(layer(x), x * (s - beta) / (1 - beta), atol=1e-10)
    assert np.min(layer(x)) < -0.1  # an output for negative inputs


def test_gate_batch_norm_matches_its_formula_in_training_and_inference():
    x = RNG.normal(size=(4, 5, 6, 3)) * 3.0
    layer = _layer(gate_batch_norm=True)
    conv = np_depthwise(x, layer.kernel.numpy())
    mean, var = conv.mean(axis=(0, 1, 2)), conv.var(axis=(0, 1, 2))
    z = (conv - mean) / np.sqrt(var + 1e-5) + layer.bias.numpy()
    np.testing.assert_allclose(layer(x, training=True), x * np_sigmoid(z), atol=1e-8)
    # Inference: the moving statistics, one update of momentum 0.9 from (0, 1).
    moving_mean, moving_var = 0.1 * mean, 0.9 + 0.1 * var
    z = (conv - moving_mean) / np.sqrt(moving_var + 1e-5) + layer.bias.numpy()
    np.testing.assert_allclose(layer(x, training=False), x * np_sigmoid(z), atol=1e-8)
    np.testing.assert_allclose(layer.gate(x), np_sigmoid(z), atol=1e-8)
    # Scale-free: the gate of 10 x in training mode is the gate of x (up to BN's epsilon).
    np.testing.assert_allclose(layer(10 * x, training=True), 10 * layer(x, training=True),
                               rtol=1e-4)


def _gradients(layer, x, g):
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = tf.reduce_sum(layer(x, training=True) * g)
    return tape.gradient(loss, [x] + layer.trainable_weights)


@pytest.mark.parametrize("variant", [{"shift": True}, {"gate_batch_norm": True}])
def test_variant_gradients_match_autodiff_and_finite_differences(variant):
    x = tf.constant(RNG.normal(size=(2, 5, 6, 3)))
    exact = _layer(**variant)
    if variant.get("shift"):
        exact.beta.assign([0.1, 0.5, 0.8])
    auto = layers.Sparta(dtype="float64", use_custom_gradient=False, **variant)
    auto.build(x.shape)
    auto.set_weights(exact.get_weights())
    g = tf.constant(RNG.normal(size=x.shape))
    g_exact, g_auto = _gradients(exact, x, g), _gradients(auto, x, g)
    assert len(g_exact) == 1 + len(exact.trainable_weights)
    for a, b in zip(g_exact, g_auto):
        np.testing.assert_allclose(a, b, atol=1e-10)
    # Finite differences of the loss along a random direction of every input at once.
    params = [x] + [tf.constant(w.numpy()) for w in exact.trainable_weights]
    dirs = [RNG.normal(size=p.shape) for p in params]

    def loss_at(t):
        moved = [p + t * d for p, d in zip(params, dirs)]
        for w, value in zip(exact.trainable_weights, moved[1:]):
            w.assign(value)
        return float(tf.reduce_sum(exact(moved[0], training=True) * g))

    grads = _gradients(exact, x, g)
    directional = sum(float(tf.reduce_sum(gr * d)) for gr, d in zip(grads, dirs))
    h = 1e-5
    numeric = (loss_at(h) - loss_at(-h)) / (2 * h)
    assert abs(directional - numeric) < 1e-6 * max(1.0, abs(numeric)), (directional, numeric)


def test_beta_stays_in_its_interval_under_the_optimizer():
    layer = _layer(dtype="float32", shift=True)
    optimizer = keras.optimizers.SGD(1.0)
    optimizer.apply_gradients([(tf.fill([3], -10.0), layer.beta)])
    np.testing.assert_allclose(layer.beta.numpy(), layers.MAX_SHIFT)
    optimizer.apply_gradients([(tf.fill([3], 100.0), layer.beta)])
    np.testing.assert_allclose(layer.beta.numpy(), 0.0)


@pytest.mark.parametrize("name", ["sparta_shift", "sparta_bn"])
def test_variant_is_an_activation_name_that_builds_saves_and_loads(name, tmp_path):
    kwargs = config.TrainConfig(activation=name, sparta_kernel_size=5).activation_kwargs()
    assert kwargs["kernel_size"] == 5
    model = models.build("resnet18", 10, name, 0.0625, activation_kwargs=kwargs)
    sparta = [l for l in model.layers if isinstance(l, layers.Sparta)]
    assert sparta and all(l.kernel_size == 5 for l in sparta)
    assert all(l.shift == (name == "sparta_shift") for l in sparta)
    assert all(l.gate_batch_norm == (name == "sparta_bn") for l in sparta)
    x = RNG.uniform(size=(2, 32, 32, 3)).astype("float32")
    model(x, training=True)  # moves the batch norms' statistics
    path = tmp_path / "model.keras"
    model.save(path)
    np.testing.assert_allclose(keras.models.load_model(path)(x), model(x), atol=1e-5)
    assert name in activations.NAMES


def test_a_variant_transfers_whole_and_only_to_its_own_kind():
    from sparta_tf import transfer
    source = models.build("resnet18", 10, "sparta_shift", 0.0625)
    for layer in transfer.sparta_layers(source).values():
        layer.beta.assign(np.full(layer.beta.shape, 0.25))
    target = models.build("resnet18", 10, "sparta_shift", 0.0625)
    transfer.copy_and_freeze(source, target)
    for layer in transfer.sparta_layers(target).values():
        np.testing.assert_allclose(layer.beta.numpy(), 0.25)
        assert not layer.trainable
    assert transfer.fingerprint(target) == transfer.fingerprint(source)
    plain = models.build("resnet18", 10, "sparta", 0.0625)
    names = dict(zip(transfer.sparta_layers(plain), transfer.sparta_layers(source)))
    with pytest.raises(transfer.TransferError, match="shift=True"):
        transfer.copy_and_freeze(source, plain, names=names)
