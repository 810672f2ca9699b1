"""Tests of sparta_tf.layers: Sparta's math, its exact custom gradient, Keras plumbing."""

import functools

import numpy as np
import pytest
import keras
import tensorflow as tf

import backend_checks
from conftest import np_depthwise, np_sigmoid, spy_on_sparta_paths
from sparta_tf import gate, layers

# Shapes with odd H and W, H = W = 1, and batch 1.
SHAPES = [(1, 1, 1, 3), (1, 5, 7, 4), (2, 9, 9, 2), (3, 4, 6, 5)]


def _params(shape, kernel_size, dtype, seed):
    rng = np.random.default_rng(seed)
    x = tf.constant(rng.normal(size=shape), dtype)
    k = tf.constant(rng.normal(size=(kernel_size, kernel_size, shape[-1], 1)), dtype)
    b = tf.constant(rng.normal(size=shape[-1:]), dtype)
    return x, k, b


def _grads(fn, x, k, b, upstream):
    with tf.GradientTape() as tape:
        tape.watch([x, k, b])
        y = fn(x, k, b)
        loss = tf.reduce_sum(y * upstream)
    return tape.gradient(loss, [x, k, b])


@pytest.mark.parametrize("form", ["depthwise", "shifted"])
@pytest.mark.parametrize("dtype,tol", [(tf.float32, 1e-5), (tf.float64, 1e-12)])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kernel_size", [1, 3, 5])
def test_custom_gradient_matches_autodiff(shape, kernel_size, dtype, tol, form):
    """The exact gradient in each form of DW_k against autodiff of the depthwise form."""
    x, k, b = _params(shape, kernel_size, dtype, seed=sum(shape) + kernel_size)
    upstream = tf.constant(np.random.default_rng(1).normal(size=shape), dtype)
    exact_fn = functools.partial(layers.sparta_exact, form=form)
    np.testing.assert_allclose(exact_fn(x, k, b), layers.sparta_forward(x, k, b), atol=tol)
    expected = np_sigmoid(np_depthwise(x.numpy(), k.numpy()) + b.numpy()) * x.numpy()
    np.testing.assert_allclose(exact_fn(x, k, b), expected, atol=tol)  # and NumPy's
    exact = _grads(exact_fn, x, k, b, upstream)
    auto = _grads(layers.sparta_forward, x, k, b, upstream)
    for name, g1, g2 in zip(("dX", "dK", "db"), exact, auto):
        err = float(tf.reduce_max(tf.abs(g1 - g2)))
        assert err <= tol, f"{name}: max abs difference {err:.3g} > {tol:g} at shape {shape}"


@pytest.mark.parametrize("dtype,tol", [(tf.float32, 1e-5), (tf.float64, 1e-12)])
@pytest.mark.parametrize("shape", SHAPES)
def test_custom_gradient_matches_autodiff_with_normalised_gate_input(shape, dtype, tol):
    x, k, b = _params(shape, 3, dtype, seed=sum(shape))
    upstream = tf.constant(np.random.default_rng(2).normal(size=shape), dtype)
    exact, auto = (functools.partial(f, normalize=True)
                   for f in (layers.sparta_exact, layers.sparta_forward))
    np.testing.assert_allclose(exact(x, k, b), auto(x, k, b), atol=tol)
    for name, g1, g2 in zip(("dX", "dK", "db"), _grads(exact, x, k, b, upstream),
                            _grads(auto, x, k, b, upstream)):
        err = float(tf.reduce_max(tf.abs(g1 - g2)))
        assert err <= 10 * tol, f"{name}: max abs difference {err:.3g} at shape {shape}"


# Not normalised at H = W = 1: there the gate input is x / sqrt(x^2 + 1e-6), too
# steep near 0 for finite differences (autodiff checks it above).
@pytest.mark.parametrize("form", ["depthwise", "shifted"])
@pytest.mark.parametrize("shape,normalize", [
    ((1, 3, 5, 2), False), ((2, 1, 1, 3), False), ((1, 5, 3, 1), False),
    ((1, 3, 5, 2), True), ((2, 4, 3, 3), True)])
def test_custom_gradient_matches_finite_differences(shape, normalize, form):
    x, k, b = _params(shape, 3, tf.float64, seed=7)
    exact = functools.partial(layers.sparta_exact, normalize=normalize, form=form)
    theoretical, numerical = tf.test.compute_gradient(exact, [x, k, b])
    for name, t, n in zip(("dX", "dK", "db"), theoretical, numerical):
        err = np.max(np.abs(t - n))
        assert err < 1e-6, f"{name}: custom gradient vs finite differences differ by {err:.3g}"


def test_custom_gradient_holds_less_memory_than_autodiff():
    # The backward keeps X and recomputes S, so it holds less than autodiff, which keeps S
    # (and Z, had a compiler merged the recomputation with the forward's convolution).
    # TensorFlow's allocator peak over one step of a chain of convolutions and Sparta.
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=(32, 32, 32, 16)), tf.float32)  # 2 MiB a map
    weights = [tf.constant(rng.normal(size=(3, 3, 16, 16)) * 0.1, tf.float32) for _ in range(4)]
    k = tf.constant(rng.normal(size=(3, 3, 16, 1)) * 0.1, tf.float32)
    b = tf.zeros([16])
    peaks = {}
    for fn in (layers.sparta_exact, layers.sparta_forward):
        @tf.function
        def step(x, fn=fn):
            with tf.GradientTape() as tape:
                tape.watch([x, k, b])
                h = x
                for w in weights:
                    h = fn(tf.nn.conv2d(h, w, 1, "SAME"), k, b)
                loss = tf.reduce_sum(h)
            return tape.gradient(loss, [x, k, b])
        step(x)
        try:
            tf.config.experimental.reset_memory_stats("CPU:0")
            before = tf.config.experimental.get_memory_info("CPU:0")["current"]
        except (ValueError, RuntimeError):
            pytest.skip("no allocator statistics on this device")
        step(x)
        peaks[fn.__name__] = tf.config.experimental.get_memory_info("CPU:0")["peak"] - before
    assert peaks["sparta_exact"] < 0.9 * peaks["sparta_forward"], peaks


@pytest.mark.parametrize("custom,path", [(True, "sparta_exact"), (False, "sparta_forward")])
def test_use_custom_gradient_chooses_the_exact_gradient_or_autodiff(custom, path, monkeypatch):
    calls = spy_on_sparta_paths(monkeypatch)
    layer = layers.Sparta(use_custom_gradient=custom)
    x = tf.random.normal([2, 5, 5, 3])
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x)
    tape.gradient(y, x)
    assert calls == [path]
    layers.Sparta.from_config(layer.get_config())(x)  # and a saved layer keeps its path
    assert calls == [path, path]


@pytest.mark.parametrize("jit_compile,form", [(False, "depthwise"), (True, "shifted")])
def test_auto_form_on_tensorflow_follows_xla(jit_compile, form):
    """gate_form="auto" on TensorFlow: TensorFlow's depthwise kernels in a plain tf.function,
    the shifted form (no depthwise op in the traced graph) where XLA compiles the step, as
    Keras's compile(jit_compile=...) makes it; the same numbers either way."""
    layer = layers.Sparta()
    x = tf.random.uniform([2, 6, 6, 3], seed=2)
    layer(x)
    layer.kernel.assign(np.random.default_rng(0).normal(size=layer.kernel.shape))

    def grads(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            total = tf.reduce_sum(layer(x) * x)
        return tape.gradient(total, [x, *layer.trainable_variables])

    step = tf.function(grads, jit_compile=jit_compile)
    ops_ = {op.type for op in step.get_concrete_function(x).graph.get_operations()}
    assert ("DepthwiseConv2dNative" in ops_) == (form == "depthwise"), sorted(ops_)
    for a, b in zip(step(x), tf.function(grads)(x)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    model = keras.Sequential([keras.Input((6, 6, 3)), layers.Sparta(),
                              keras.layers.GlobalAveragePooling2D()])
    seen = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(layers, "default_form", lambda: seen.append(gate.default_form()) or seen[-1])
        model.compile("sgd", "mse", jit_compile=jit_compile)
        model.fit(x, tf.zeros([2, 3]), verbose=0)
    assert set(seen) == {form}


def test_starts_as_swish():
    x = tf.random.normal([2, 6, 5, 3])
    for kernel_size, beta0 in [(1, 1.0), (3, 1.0), (5, 4.0)]:
        layer = layers.Sparta(kernel_size=kernel_size, beta0=beta0)
        np.testing.assert_allclose(layer(x), x * tf.sigmoid(beta0 * x), rtol=1e-6, atol=1e-6)
    assert layer.kernel.shape == (5, 5, 3, 1) and layer.bias.shape == (3,)
    assert layer.count_params() == 5 * 5 * 3 + 3


@pytest.mark.parametrize("dtype", [tf.float32, tf.float16])
def test_normalized_divides_each_feature_map_by_its_rms(dtype):
    scales = np.array([0.1, 1.0, 300.0])  # one per channel, and per example below
    x = np.random.default_rng(3).normal(size=(2, 5, 4, 3)) * scales * [[[[1.0]]], [[[7.0]]]]
    u = layers.normalized(tf.constant(x, dtype))
    assert u.dtype == dtype
    rms = np.sqrt(np.mean(np.square(np.asarray(u, np.float64)), axis=(1, 2)))
    np.testing.assert_allclose(rms, np.ones((2, 3)), rtol=2e-3)


def test_normalised_gate_input_makes_the_layer_positively_homogeneous():
    x = tf.random.stateless_normal([2, 6, 5, 3], seed=[0, 1])
    scaled = {}
    for normalize in (False, True):
        layer = layers.Sparta(normalize_gate_input=normalize)
        layer.build(x.shape)
        layer.kernel.assign(tf.random.stateless_normal(layer.kernel.shape, seed=[2, 3]))
        scaled[normalize] = float(tf.reduce_max(tf.abs(layer(5.0 * x) - 5.0 * layer(x))))
        np.testing.assert_allclose(layer.gate(x) * x, layer(x), rtol=1e-5, atol=1e-6)
    assert scaled[True] < 1e-4 < 0.1 < scaled[False]


def test_gate_is_spatial_and_in_unit_interval():
    layer = layers.Sparta(kernel_size=3)
    x = tf.random.normal([1, 5, 5, 2])
    layer(x)
    layer.kernel.assign(tf.random.normal(layer.kernel.shape))
    gate = layer.gate(x).numpy()
    assert gate.shape == (1, 5, 5, 2) and (gate > 0).all() and (gate < 1).all()
    # Changing one neighbour changes the gate at the centre: the gate sees the neighbourhood.
    x2 = x.numpy()
    x2[0, 2, 3, 0] += 1.0
    assert abs(layer.gate(x2)[0, 2, 2, 0] - gate[0, 2, 2, 0]) > 1e-4
    np.testing.assert_allclose(layer(x), x * gate, rtol=1e-6)


def test_bad_input_raises():
    with pytest.raises(ValueError, match="4-D NHWC"):
        layers.Sparta()(tf.zeros([2, 3, 3]))
    with pytest.raises(ValueError, match="odd"):
        layers.Sparta(kernel_size=2)
    layer = layers.Sparta()
    layer(tf.zeros([1, 3, 3, 4]))
    with pytest.raises(ValueError, match="expected axis -1 of input shape to have value 4"):
        layer(tf.zeros([1, 3, 3, 5]))


def _sequential():
    return keras.Sequential([keras.Input((7, 7, 3)), keras.layers.Conv2D(4, 3, padding="same"),
                             layers.Sparta(), layers.FReLU(), keras.layers.Flatten(),
                             keras.layers.Dense(2)])


def _functional():
    inputs = keras.Input((7, 7, 3))
    h = keras.layers.Conv2D(4, 3)(inputs)
    shared = layers.Sparta(kernel_size=5, beta0=2.0)
    h = shared(keras.layers.Conv2D(4, 3, padding="same")(shared(h)))
    return keras.Model(inputs, keras.layers.Dense(2)(keras.layers.GlobalAveragePooling2D()(h)))


@keras.saving.register_keras_serializable(package="sparta_tf_tests")
class SubclassedNet(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.conv = keras.layers.Conv2D(4, 3)
        self.act = layers.Sparta(use_custom_gradient=False, normalize_gate_input=True)
        self.head = keras.layers.Dense(2)

    def call(self, x):
        return self.head(keras.ops.mean(self.act(self.conv(x)), axis=(1, 2)))


@pytest.mark.parametrize("make", [_sequential, _functional, SubclassedNet])
def test_keras_save_load_round_trip(make, tmp_path):
    model = make()
    x = np.random.default_rng(0).uniform(size=(1, 7, 7, 3)).astype("float32")
    model(x)
    for layer in model.layers:  # move away from the init so the test sees the weights
        if isinstance(layer, layers.Sparta):
            layer.kernel.assign(tf.random.normal(layer.kernel.shape))
            layer.bias.assign(tf.random.normal(layer.bias.shape))
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(np.repeat(x, 4, 0), np.array([0, 1, 0, 1]), epochs=1, verbose=0)
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_array_equal(loaded(x), model(x))


def test_get_config_round_trip():
    layer = layers.Sparta(kernel_size=5, beta0=3.0, use_custom_gradient=False,
                          normalize_gate_input=True, kernel_regularizer="l2", name="s")
    clone = layers.Sparta.from_config(layer.get_config())
    assert (clone.kernel_size, clone.beta0, clone.use_custom_gradient,
            clone.normalize_gate_input, clone.name) == (5, 3.0, False, True, "s")
    assert isinstance(clone.kernel_regularizer, keras.regularizers.L2)


@pytest.mark.parametrize("form", ["depthwise", "shifted"])
@pytest.mark.parametrize("policy", ["float32", "mixed_float16", "mixed_bfloat16"])
def test_mixed_precision(policy, form):
    """Each form of DW_k under each policy: the compute dtype, float32 weights, finite
    gradients, Swish at the start, and (from random weights) the other form's output and
    gradients to the policy's precision."""
    keras.config.set_dtype_policy(policy)
    try:
        layer = layers.Sparta(gate_form=form)
        x = tf.random.uniform([2, 4, 4, 3], seed=1)
        with tf.GradientTape() as tape:
            y = layer(x)
            loss = tf.reduce_sum(tf.cast(y, "float32"))
        grads = tape.gradient(loss, layer.trainable_variables)
        rng = np.random.default_rng(0)
        layer.kernel.assign(rng.normal(size=layer.kernel.shape))
        layer.bias.assign(rng.normal(size=layer.bias.shape))
        other = layers.Sparta(gate_form="shifted" if form == "depthwise" else "depthwise")
        other(x)
        other.set_weights(layer.get_weights())
        found = []
        for each in (layer, other):
            with tf.GradientTape() as tape:
                tape.watch(x)
                out = tf.cast(each(x), "float32")
                total = tf.reduce_sum(out * x)
            found.append([out, *tape.gradient(total, [x, *each.trainable_variables])])
    finally:
        keras.config.set_dtype_policy("float32")
    assert y.dtype == keras.mixed_precision.Policy(policy).compute_dtype
    assert layer.kernel.dtype == "float32"
    assert all(g is not None and np.isfinite(g.numpy()).all() for g in grads)
    tol = 1e-6 if policy == "float32" else 2e-2
    np.testing.assert_allclose(tf.cast(y, "float32"), x * tf.sigmoid(x), atol=tol)
    for a, b in zip(*found):  # the output, dX, dK, db
        scale = max(1.0, float(tf.reduce_max(tf.abs(b))))
        np.testing.assert_allclose(a, b, atol=(1e-5 if policy == "float32" else 3e-2) * scale)


def test_frelu_is_max_of_x_and_bn_dw():
    layer = layers.FReLU()
    x = tf.random.normal([2, 5, 5, 3])
    y = layer(x, training=False)
    z = layer.bn(layer.conv(x), training=False)
    np.testing.assert_allclose(y, tf.maximum(x, z), rtol=1e-6)
    assert layer.count_params() == 3 * 3 * 3 + 4 * 3  # depthwise kernel + BN


@pytest.mark.parametrize("embed", [True, False])
def test_non_local_means_matches_a_numpy_reference(embed):
    x = np.random.default_rng(0).normal(size=(2, 3, 5, 6)).astype("float32")
    layer = layers.NonLocalMeans(embed=embed)
    y = layer(x).numpy()
    weights = (layer.theta.kernel.numpy(), layer.phi.kernel.numpy()) if embed else ()
    np.testing.assert_allclose(y, backend_checks.np_non_local(x, *weights), rtol=1e-5,
                               atol=1e-5)
    assert layer.count_params() == (2 * 6 * 3 if embed else 0)
    # A weighted mean of the positions: within each channel's range, and a constant map stays.
    assert (y <= x.max(axis=(1, 2), keepdims=True) + 1e-5).all()
    flat = np.full((1, 4, 4, 6), 0.7, "float32")
    np.testing.assert_allclose(layer(flat), flat, rtol=1e-6)


def test_non_local_means_config_round_trip():
    layer = layers.NonLocalMeans(embed=False, name="nl")
    clone = layers.NonLocalMeans.from_config(layer.get_config())
    assert (clone.embed, clone.name) == (False, "nl")


def test_frelu_batch_norm_is_synchronised_over_replicas():
    assert layers.FReLU().bn.synchronized


@pytest.mark.parametrize("shape,kernel_size", [((2, 5, 7, 3), 3), ((1, 4, 4, 2), 5),
                                                ((1, 1, 1, 2), 3)])
def test_sparta_forward_matches_a_numpy_reference(shape, kernel_size):
    rng = np.random.default_rng(3)
    x = rng.normal(size=shape)
    kernel = rng.normal(size=(kernel_size, kernel_size, shape[-1], 1))  # not symmetric
    bias = rng.normal(size=shape[-1])
    z = np_depthwise(x, kernel) + bias
    expected = x * np_sigmoid(z)
    for use_custom_gradient in (True, False):
        layer = layers.Sparta(kernel_size, use_custom_gradient=use_custom_gradient,
                              dtype="float64")
        layer.build(shape)
        layer.kernel.assign(kernel)
        layer.bias.assign(bias)
        np.testing.assert_allclose(layer(x), expected, rtol=1e-12, atol=1e-12)


def test_frelu_matches_a_numpy_reference():
    backend_checks.check_frelu_matches_numpy()  # the check that every backend runs
