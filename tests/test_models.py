"""Tests of `sparta_tf.models`."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import spy_on_sparta_paths
from sparta_tf import config, layers, models

TINY = 0.0625  # ResNet widths 4, 8, 16, 32; WRN stem 1, widths 10, 20, 40

# The activations of each network, one name per place (see the models docstring).
_ACTIVATION_COUNTS = {
    "resnet10": 1 + 4 * 2,
    "resnet18": 1 + 8 * 2,
    "resnet34": 1 + 16 * 2,
    "resnet50": 1 + 16 * 3,
    "preact_resnet18": 8 * 2,
    "wrn34_10": 15 * 2 + 1,
}


def _pixels(shape, seed=0):
    return np.random.default_rng(seed).uniform(size=shape).astype("float32")


def _spartas(model):
    return [layer for layer in model.layers if isinstance(layer, layers.Sparta)]


def _trainable_count(model):
    return int(sum(np.prod(w.shape) for w in model.trainable_weights))


def _call_inputs(model, layer_name):
    """The names of the layers that feed `layer_name`, one per call, from the saved config."""
    config = next(c for c in model.get_config()["layers"] if c["name"] == layer_name)
    return [node["args"][0]["config"]["keras_history"][0] for node in config["inbound_nodes"]]


def test_names():
    assert models.NAMES == (
        "resnet10", "resnet18", "resnet34", "resnet50", "preact_resnet18", "wrn34_10")


@pytest.mark.parametrize("name", models.NAMES)
def test_every_model_outputs_logits_with_one_activation_per_place(name):
    model = models.build(name, 7, activation="sparta", width_multiplier=TINY)
    assert model.name == f"{name}_sparta"
    logits = model(_pixels((2, 32, 32, 3)), training=False)
    assert logits.shape == (2, 7)
    assert logits.dtype == tf.float32
    assert np.all(np.isfinite(logits))
    assert not np.allclose(logits[0], logits[1])
    spartas = _spartas(model)
    assert len(spartas) == _ACTIVATION_COUNTS[name]
    assert all(len(_call_inputs(model, s.name)) == 1 for s in spartas)


def test_resnet18_has_the_reference_parameter_count():
    model = models.build("resnet18", 10)
    assert _trainable_count(model) == 11_173_962


def test_resnet18_activation_names():
    model = models.build("resnet18", 10, activation="swish", width_multiplier=TINY)
    assert model.name == "resnet18_silu"
    names = [layer.name for layer in model.layers
             if isinstance(layer, keras.layers.Activation)]
    assert names == ["silu_stem"] + [
        f"silu_s{stage}b{block}_{i}"
        for stage in (1, 2, 3, 4) for block in (0, 1) for i in ("1", "out")]


def test_width_multiplier_scales_every_width():
    model = models.build("resnet18", 10, width_multiplier=0.125)
    assert model.get_layer("stem_conv").filters == 8
    assert model.get_layer("s2b0_conv1").filters == 16
    assert model.get_layer("s4b1_conv2").filters == 64
    wrn = models.build("wrn34_10", 10, width_multiplier=TINY)
    assert wrn.get_layer("stem_conv").filters == 1  # max(1, round(0.0625 * 16))
    assert wrn.get_layer("s1b0_conv1").filters == 10


def test_sparta_overhead_layer_and_stage_sharing():
    # Sparta with k=3 costs 10 * C parameters per layer of C channels.
    relu = _trainable_count(models.build("resnet18", 10, width_multiplier=TINY))
    layer = _trainable_count(models.build("resnet18", 10, "sparta", TINY))
    stage = _trainable_count(models.build("resnet18", 10, "sparta", TINY, "stage"))
    assert layer - relu == 10 * (4 + 4 * 4 + 4 * 8 + 4 * 16 + 4 * 32)
    assert stage - relu == 10 * (4 + 8 + 16 + 32)


def test_stage_sharing_uses_one_sparta_per_stage_and_the_stem_uses_the_first():
    model = models.build("resnet18", 10, "sparta", TINY, sparta_sharing="stage")
    assert [s.name for s in _spartas(model)] == [f"sparta_s{i}" for i in (1, 2, 3, 4)]
    calls = {s.name: _call_inputs(model, s.name) for s in _spartas(model)}
    assert {name: len(inputs) for name, inputs in calls.items()} == {
        "sparta_s1": 5, "sparta_s2": 4, "sparta_s3": 4, "sparta_s4": 4}
    assert calls["sparta_s1"][0] == "stem_bn"
    assert calls["sparta_s4"] == ["s4b0_bn1", "s4b0_add", "s4b1_bn1", "s4b1_add"]


@pytest.mark.parametrize("name, expected", [
    ("resnet50", ["sparta_s1", "sparta_s1_c16", "sparta_s2", "sparta_s2_c32",
                  "sparta_s3", "sparta_s3_c64", "sparta_s4", "sparta_s4_c128"]),
    ("preact_resnet18", ["sparta_s1", "sparta_s2_c4", "sparta_s2", "sparta_s3_c8",
                         "sparta_s3", "sparta_s4_c16", "sparta_s4"]),
    ("wrn34_10", ["sparta_s1_c1", "sparta_s1", "sparta_s2_c10", "sparta_s2",
                  "sparta_s3_c20", "sparta_s3"]),
])
def test_stage_sharing_with_several_widths_shares_per_width(name, expected):
    model = models.build(name, 10, "sparta", TINY, sparta_sharing="stage")
    assert [s.name for s in _spartas(model)] == expected
    total_calls = sum(len(_call_inputs(model, s.name)) for s in _spartas(model))
    assert total_calls == _ACTIVATION_COUNTS[name]
    if name == "wrn34_10":
        assert _call_inputs(model, "sparta_s3")[-1] == "head_bn"


def test_errors_list_the_valid_values():
    with pytest.raises(ValueError, match="resnet18.*wrn34_10"):
        models.build("resnet19", 10)
    with pytest.raises(ValueError, match="layer, stage"):
        models.build("resnet18", 10, "sparta", sparta_sharing="block")
    with pytest.raises(ValueError, match="for the sparta activation only"):
        models.build("resnet18", 10, "relu", sparta_sharing="stage")
    with pytest.raises(ValueError, match="relu, silu"):
        models.build("resnet18", 10, "tanh")


@pytest.mark.parametrize("sharing", ["layer", "stage"])
def test_trains_saves_and_loads(sharing, tmp_path):
    model = models.build("resnet18", 10, "sparta", TINY, sparta_sharing=sharing)
    model.compile(optimizer=keras.optimizers.SGD(0.1),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x = _pixels((2, 32, 32, 3))
    y = np.array([3, 7])
    kernel = _spartas(model)[0].kernel.numpy()
    model.fit(x, y, batch_size=2, epochs=1, verbose=0)
    assert not np.allclose(kernel, _spartas(model)[0].kernel)

    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert [s.name for s in _spartas(loaded)] == [s.name for s in _spartas(model)]
    np.testing.assert_allclose(
        loaded(x, training=False), model(x, training=False), rtol=1e-6, atol=1e-6)


def test_normalisation_uses_mean_and_std():
    mean, std = (0.3, 0.5, 0.7), (0.1, 0.2, 0.4)
    model = models.build("resnet18", 10, width_multiplier=TINY, mean=mean, std=std)
    normalize = model.get_layer("normalize")
    np.testing.assert_allclose(normalize(np.array([[mean]], "float32")), 0, atol=1e-6)
    np.testing.assert_allclose(
        normalize(np.array([[np.add(mean, std)]], "float32")), 1, rtol=1e-5)

    default = models.build("resnet18", 10, width_multiplier=TINY).get_layer("normalize")
    np.testing.assert_allclose(
        default(np.array([[models.CIFAR10_MEAN]], "float32")), 0, atol=1e-6)


def test_inference_depends_on_each_image_alone():
    model = models.build("resnet18", 10, "sparta", TINY)
    x = np.random.default_rng(0).uniform(size=(4, 32, 32, 3)).astype("float32")
    together = np.array(model(x, training=False))
    np.testing.assert_array_equal(model(x, training=False), together)  # no randomness
    alone = np.concatenate([model(x[i:i + 1], training=False) for i in range(4)])
    np.testing.assert_allclose(together, alone, rtol=1e-5, atol=1e-6)  # no batch statistics
    # What this guards against: in training mode BN uses the batch's statistics, so an
    # image's logits change with the other images of its batch.
    others = np.concatenate([x[:1], 1 - x[1:]])
    assert not np.allclose(model(x, training=True)[0], model(others, training=True)[0],
                           atol=1e-4)


@pytest.mark.parametrize("custom,path", [(True, "sparta_exact"), (False, "sparta_forward")])
def test_the_custom_gradient_flag_reaches_every_sparta_layer(custom, path, monkeypatch):
    """sparta-train's --sparta_custom_gradient, through TrainConfig and models.build, decides
    which path each Sparta layer takes."""
    calls = spy_on_sparta_paths(monkeypatch)
    kwargs = config.TrainConfig(sparta_custom_gradient=custom).activation_kwargs()
    model = models.build("resnet18", 10, "sparta", TINY, input_shape=(16, 16, 3),
                         activation_kwargs=kwargs)
    calls.clear()
    model(_pixels((2, 16, 16, 3)), training=True)
    assert calls == [path] * len(_spartas(model)) == [path] * _ACTIVATION_COUNTS["resnet18"]


def test_input_gradient_is_the_same_with_and_without_the_custom_gradient():
    keras.utils.set_random_seed(0)
    custom, plain = (
        models.build("resnet18", 10, "sparta", TINY, input_shape=(16, 16, 3),
                     activation_kwargs={"use_custom_gradient": flag})
        for flag in (True, False))
    rng = np.random.default_rng(1)
    for sparta in _spartas(custom):  # move the gates away from their Swish start
        sparta.kernel.assign(rng.normal(size=sparta.kernel.shape).astype("float32"))
        sparta.bias.assign(rng.normal(size=sparta.bias.shape).astype("float32"))
    plain.set_weights(custom.get_weights())

    x = tf.constant(_pixels((2, 16, 16, 3)))
    labels = tf.constant([1, 4])
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def input_gradient(model):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = loss_fn(labels, model(x, training=False))
        return tape.gradient(loss, x).numpy()

    grad_custom, grad_plain = input_gradient(custom), input_gradient(plain)
    scale = np.abs(grad_plain).max()
    assert scale > 1e-4
    # Float32 round-off through ~20 layers: compare relative to the gradient's size.
    diff = np.abs(grad_custom - grad_plain).max() / scale
    assert diff <= 1e-4, f"max |custom - plain| / max |plain| input gradient = {diff:.3g}"
    print(f"relative input-gradient difference {diff:.3g} (scale {scale:.3g})")


@pytest.mark.parametrize("input_shape", [(8, 8, 3), (9, 9, 3)])
def test_batch_of_one_and_small_odd_inputs(input_shape):
    model = models.build("resnet18", 10, "sparta", TINY, input_shape=input_shape)
    logits = model(_pixels((1,) + input_shape), training=False)
    assert logits.shape == (1, 10)
    assert np.all(np.isfinite(logits))


def test_mixed_precision_keeps_float32_logits():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = models.build("resnet18", 10, "sparta", TINY)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert _spartas(model)[0].compute_dtype == "float16"
    assert model.output.dtype == "float32"


@pytest.mark.parametrize("denoise", ["nonlocal", "mean"])
def test_denoising_blocks_follow_every_stage_and_start_as_the_identity(denoise, tmp_path):
    plain = models.build("resnet18", 10, "relu", TINY)
    model = models.build("resnet18", 10, "relu", TINY, denoise=denoise)
    names = [l.name for l in model.layers]
    for stage in (1, 2, 3, 4):
        assert names.index(f"s{stage}_denoise") > names.index(f"relu_s{stage}b1_out")
        assert _call_inputs(model, f"s{stage}_denoise") == [f"relu_s{stage}b1_out"]
    # Parameters: per stage of width C a 1x1 conv (C^2) and BN (4C), plus theta and phi.
    widths = (4, 8, 16, 32)
    extra = sum(c * c + 4 * c + (2 * c * (c // 2) if denoise == "nonlocal" else 0)
                for c in widths)
    assert model.count_params() - plain.count_params() == extra
    # BN's scale starts at 0, so every block starts as the identity.
    probe = keras.Model(model.input, [model.get_layer("relu_s2b1_out").output,
                                      model.get_layer("s2_denoise_add").output])
    before, after = probe(_pixels((2, 32, 32, 3)), training=False)
    np.testing.assert_array_equal(before, after)
    path = tmp_path / "model.keras"
    model.save(path)
    x = _pixels((2, 32, 32, 3), seed=1)
    np.testing.assert_allclose(keras.models.load_model(path)(x), model(x), rtol=1e-6)
    with pytest.raises(ValueError, match="none, nonlocal, mean"):
        models.build("resnet18", 10, denoise="median")


def _norms(model):
    return [l for l in model._flatten_layers() if isinstance(l, keras.layers.BatchNormalization)]


def test_batch_norm_is_synchronised_only_when_asked_and_a_saved_model_says_it_is_not():
    # Synchronised on TensorFlow where several replicas train (MirroredStrategy's global
    # batch), the one backend where Keras has the option; a file of the model says plain
    # batch norm, so that it loads on every backend. tests/test_backends.py builds the same
    # models on JAX and PyTorch with the same parameter count.
    plain = models.build("resnet18", 10, "relu", TINY, denoise="nonlocal")
    assert len(_norms(plain)) > 20 and not any(l.synchronized for l in _norms(plain))
    synced = models.build("resnet18", 10, "relu", TINY, denoise="nonlocal", synchronized=True)
    assert all(l.synchronized for l in _norms(synced) if l.name != "gate_bn")
    models.unsynchronize(synced)
    assert not any(l.synchronized for l in _norms(synced))
