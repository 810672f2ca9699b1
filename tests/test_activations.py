"""Tests of `sparta_tf.activations`."""

import math

import keras
import numpy as np
import pytest

from sparta_tf import activations, layers


def _x():
    return np.random.default_rng(0).normal(size=(2, 5, 5, 3)).astype("float32") * 3


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


_EXPECTED = {
    "relu": lambda x: np.maximum(x, 0),
    "silu": lambda x: x * _sigmoid(x),
    "softplus": lambda x: np.log1p(np.exp(x)),
    "gelu": np.vectorize(lambda v: v * 0.5 * (1 + math.erf(v / math.sqrt(2)))),
    "elu": lambda x: np.where(x > 0, x, np.expm1(x)),
    "prelu": lambda x: np.maximum(x, 0),  # the slopes start at 0
}


def test_names_are_the_documented_ones():
    assert activations.NAMES == (
        "relu", "silu", "softplus", "gelu", "elu", "prelu", "frelu", "sparta",
        "sparta_shift", "sparta_bn")


@pytest.mark.parametrize("name", activations.NAMES + ("swish",))
def test_every_name_makes_a_layer_that_runs(name):
    layer = activations.get(name)(name=f"act_{name}")
    assert isinstance(layer, keras.layers.Layer)
    assert layer.name == f"act_{name}"
    x = _x()
    y = np.asarray(layer(x))
    assert y.shape == x.shape
    assert np.all(np.isfinite(y))
    assert not np.allclose(y, x)


@pytest.mark.parametrize("name", sorted(_EXPECTED))
def test_math(name):
    x = _x()
    np.testing.assert_allclose(
        np.asarray(activations.get(name)()(x)), _EXPECTED[name](x), rtol=1e-5, atol=1e-6)


def test_swish_is_silu():
    assert activations.canonical_name("swish") == "silu"
    x = _x()
    np.testing.assert_allclose(
        np.asarray(activations.get("swish")()(x)), _EXPECTED["silu"](x), rtol=1e-5, atol=1e-6)


def test_sparta_with_kernel_size_1_starts_as_silu():
    layer = activations.get("sparta", kernel_size=1, beta0=1.0)()
    assert isinstance(layer, layers.Sparta)
    x = _x()
    np.testing.assert_allclose(np.asarray(layer(x)), _EXPECTED["silu"](x), rtol=1e-5, atol=1e-6)


def test_sparta_kwargs_reach_the_layer():
    layer = activations.get("sparta", kernel_size=5, beta0=2.0, use_custom_gradient=False,
                            normalize_gate_input=True, kernel_regularizer="l2")()
    assert (layer.kernel_size, layer.beta0, layer.use_custom_gradient,
            layer.normalize_gate_input) == (5, 2.0, False, True)
    assert isinstance(layer.kernel_regularizer, keras.regularizers.L2)
    layer(_x())
    assert tuple(layer.kernel.shape) == (5, 5, 3, 1)


def test_prelu_has_one_slope_per_channel():
    layer = activations.get("prelu")()
    layer(_x())
    assert [tuple(w.shape) for w in layer.weights] == [(1, 1, 3)]


def test_frelu_is_max_of_x_and_its_funnel():
    layer = activations.get("frelu", kernel_size=5)()
    assert isinstance(layer, layers.FReLU) and layer.kernel_size == 5
    x = _x()
    y = np.asarray(layer(x))
    assert np.all(y >= x)


def test_factory_makes_a_new_layer_each_call():
    for name in activations.NAMES:
        factory = activations.get(name)
        first, second = factory(), factory()
        assert first is not second
        assert first.name != second.name


def test_unknown_name_lists_the_valid_names():
    with pytest.raises(ValueError, match="tanhh") as info:
        activations.get("tanhh")
    for name in activations.NAMES:
        assert name in str(info.value)


def test_kwargs_for_an_activation_without_parameters_are_an_error():
    with pytest.raises(ValueError, match="relu.*takes no arguments"):
        activations.get("relu", kernel_size=3)
