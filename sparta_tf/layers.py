"""The Sparta activation (and FReLU, the spatial activation it is compared with).

The definition is `docs/SPARTA.md` of the project: for a feature map `X` in NHWC,

    Z = DW_k(X) + b          # depthwise k x k convolution, stride 1, SAME zero padding
    Sparta(X) = X * sigmoid(Z)

This module imports nothing else of `sparta_tf`.
"""

import keras
import numpy as np
import tensorflow as tf

_STRIDES = [1, 1, 1, 1]


def normalized(x, epsilon=1e-6):
    """`x / sqrt(mean over H, W of x^2 + epsilon)`, per example and channel.

    The optional normalised gate input: it makes the gate blind to the scale of
    each feature map, so `Sparta(c * x) = c * Sparta(x)` for c > 0. Half
    precision is computed in float32 and returned in x's dtype.
    """
    wide = tf.cast(x, tf.float32 if x.dtype in (tf.float16, tf.bfloat16) else x.dtype)
    rms = tf.sqrt(tf.reduce_mean(tf.square(wide), axis=[1, 2], keepdims=True) + epsilon)
    return tf.cast(wide / rms, x.dtype)


def sparta_forward(x, kernel, bias, normalize=False):
    """The plain forward, `x * sigmoid(DW_k(x) + b)`, differentiated by autodiff.

    With `normalize`, the gate sees `normalized(x)` in place of `x`.
    """
    u = normalized(x) if normalize else x
    z = tf.nn.depthwise_conv2d(u, kernel, _STRIDES, "SAME") + bias
    return x * tf.sigmoid(z)


def sparta_exact(x, kernel, bias, normalize=False):
    """The same forward with its exact gradient written out (SPARTA.md, "Gradients").

    See `_gated`; with `normalize`, autodiff carries the gate input's gradient
    on through `normalized`.
    """
    u = normalized(x) if normalize else x
    return _gated(x, u, kernel, bias)


@tf.custom_gradient
def _gated(x, u, kernel, bias):
    """`x * sigmoid(DW_k(u) + b)`, `u` the gate's input, with its exact gradient.

    With S = sigmoid(Z), upstream G and D = G * X * S * (1 - S) = dL/dZ:

        dL/dX = G * S            (through the gated value)
        dL/du = DW_k^T(D)        (through the gate)
        dL/dK = depthwise_conv2d_backprop_filter(u, K.shape, D)
        dL/db = sum of D over N, H, W

    With u = X, the two gradients to X add up to SPARTA.md's
    dL/dX = G * S + DW_k^T(D). D is computed as (G * S) * (X - Y), Y = X * S
    the output: the same number in three passes over the map instead of five
    (G * S is needed anyway). The backward keeps X, u (the same tensor unless
    normalised), S, Y (which the next layer keeps too) and K alive; nothing is
    approximated, so attacks see the true gradient.
    """
    s = tf.sigmoid(tf.nn.bias_add(tf.nn.depthwise_conv2d(u, kernel, _STRIDES, "SAME"), bias))
    y = x * s

    def grad(g):
        gs = g * s
        d = gs * (x - y)
        du = tf.nn.depthwise_conv2d_backprop_input(tf.shape(u), kernel, d, _STRIDES, "SAME")
        dk = tf.nn.depthwise_conv2d_backprop_filter(
            u, tf.shape(kernel), d, _STRIDES, "SAME")
        db = tf.reduce_sum(d, axis=[0, 1, 2])
        return gs, du, dk, db

    return y, grad


def _check_nhwc(layer, shape):
    if len(shape) != 4:
        raise ValueError(
            f"{type(layer).__name__} layer '{layer.name}' expects 4-D NHWC input "
            f"(batch, height, width, channels); got shape {tuple(shape)}.")
    if shape[-1] is None:
        raise ValueError(
            f"{type(layer).__name__} layer '{layer.name}' needs a known channel "
            f"count; got shape {tuple(shape)}.")


@keras.saving.register_keras_serializable(package="sparta_tf")
class Sparta(keras.layers.Layer):
    """Spatially attentive activation: `x * sigmoid(DW_k(x) + b)`.

    The gate `sigmoid(DW_k(x) + b)` is one value in (0, 1) per position and
    channel, computed from the k x k neighbourhood of that position in the same
    channel. The kernel starts as `beta0` at its centre and 0 elsewhere, and the
    bias at 0, so the layer starts out as Swish `x * sigmoid(beta0 * x)`
    (`beta0 = 1` is SiLU). With `kernel_size=1` it stays in the Swish family.
    With `normalize_gate_input`, the gate is `sigmoid(DW_k(normalized(x)) + b)`:
    it sees each feature map divided by its root mean square (`normalized`).

    Args:
        kernel_size: odd int, the size k of the depthwise gate kernel.
        beta0: the initial centre weight of the kernel.
        use_custom_gradient: if True, differentiate through `sparta_exact`
            (the hand-written exact gradient, less activation memory); if
            False, through autodiff of `sparta_forward`. Both give the same
            numbers.
        kernel_regularizer: optional regularizer for the gate kernel.
        bias_regularizer: optional regularizer for the gate bias.
        normalize_gate_input: if True, the gate sees `normalized(x)`, so it
            does not depend on the scale of each feature map. Off by default
            (the README's ablation).
        **kwargs: the usual Keras layer arguments (`name`, `dtype`,
            `trainable`, ...).

    Input shape: 4-D `(batch, height, width, channels)`, any height and width
    of 1 or more. Output shape: the same as the input.
    """

    def __init__(self, kernel_size=3, beta0=1.0, use_custom_gradient=True,
                 kernel_regularizer=None, bias_regularizer=None,
                 normalize_gate_input=False, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd int; got {kernel_size!r}.")
        self.kernel_size = kernel_size
        self.beta0 = float(beta0)
        self.use_custom_gradient = bool(use_custom_gradient)
        self.normalize_gate_input = bool(normalize_gate_input)
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)
        self.bias_regularizer = keras.regularizers.get(bias_regularizer)

    def build(self, input_shape):
        _check_nhwc(self, input_shape)
        channels = input_shape[-1]
        k = self.kernel_size
        init = np.zeros((k, k, channels, 1))
        init[k // 2, k // 2] = self.beta0  # Swish with beta0 at the start
        self.kernel = self.add_weight(
            name="kernel", shape=init.shape,
            initializer=lambda shape, dtype=None: tf.constant(init, dtype or "float32"),
            regularizer=self.kernel_regularizer)
        self.bias = self.add_weight(
            name="bias", shape=(channels,), initializer="zeros",
            regularizer=self.bias_regularizer)
        self.input_spec = keras.layers.InputSpec(ndim=4, axes={-1: channels})

    def call(self, inputs):
        kernel = tf.cast(self.kernel, inputs.dtype)
        bias = tf.cast(self.bias, inputs.dtype)
        fn = sparta_exact if self.use_custom_gradient else sparta_forward
        return fn(inputs, kernel, bias, normalize=self.normalize_gate_input)

    def gate(self, inputs):
        """The attention map `sigmoid(DW_k(x) + b)`, for plots and analysis."""
        inputs = tf.convert_to_tensor(inputs, self.compute_dtype)
        if self.normalize_gate_input:
            inputs = normalized(inputs)
        z = tf.nn.depthwise_conv2d(inputs, tf.cast(self.kernel, inputs.dtype),
                                   _STRIDES, "SAME")
        return tf.sigmoid(z + tf.cast(self.bias, inputs.dtype))

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update({
            "kernel_size": self.kernel_size,
            "beta0": self.beta0,
            "use_custom_gradient": self.use_custom_gradient,
            "normalize_gate_input": self.normalize_gate_input,
            "kernel_regularizer": keras.regularizers.serialize(self.kernel_regularizer),
            "bias_regularizer": keras.regularizers.serialize(self.bias_regularizer),
        })
        return config


@keras.saving.register_keras_serializable(package="sparta_tf")
class FReLU(keras.layers.Layer):
    """Funnel activation (Ma et al., 2020): `max(x, BN(DW_3x3(x)))`.

    A spatial activation made without adversarial training, compared with
    Sparta. The depthwise convolution has no bias (the batch norm has one).

    Args:
        kernel_size: odd int, the size of the depthwise kernel (3 in the paper).
        **kwargs: the usual Keras layer arguments.
    """

    def __init__(self, kernel_size=3, **kwargs):
        super().__init__(**kwargs)
        self.kernel_size = kernel_size
        self.conv = keras.layers.DepthwiseConv2D(
            kernel_size, padding="same", use_bias=False, dtype=self.dtype_policy,
            name="dw")
        # Synchronised over replicas, as every other batch norm of sparta_tf.models.
        self.bn = keras.layers.BatchNormalization(synchronized=True, dtype=self.dtype_policy,
                                                  name="bn")

    def build(self, input_shape):
        _check_nhwc(self, input_shape)
        self.conv.build(input_shape)
        self.bn.build(input_shape)
        self.input_spec = keras.layers.InputSpec(ndim=4, axes={-1: input_shape[-1]})

    def call(self, inputs, training=None):
        return tf.maximum(inputs, self.bn(self.conv(inputs), training=training))

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config["kernel_size"] = self.kernel_size
        return config


@keras.saving.register_keras_serializable(package="sparta_tf")
class NonLocalMeans(keras.layers.Layer):
    """Non-local means over positions (Xie et al., CVPR 2019, "Feature Denoising").

    For a feature map with positions i, j (all H x W of them) and C channels:

        y_i = sum_j softmax_j(theta(x_i) . phi(x_j) / sqrt(C_e)) * x_j

    `theta` and `phi` are 1x1 convolutions to `C_e = max(1, C // 2)` channels
    (the "embedded Gaussian" version, the one Xie et al. found best); with
    `embed=False` they are the identity and `C_e = C`. The denoising block of
    `sparta_tf.models` follows it with a 1x1 convolution and BN and adds it
    back to `x`.

    Args:
        embed: whether theta and phi are learned 1x1 convolutions.
        **kwargs: the usual Keras layer arguments.
    """

    def __init__(self, embed=True, **kwargs):
        super().__init__(**kwargs)
        self.embed = bool(embed)

    def build(self, input_shape):
        _check_nhwc(self, input_shape)
        channels = input_shape[-1]
        self.embed_channels = max(1, channels // 2) if self.embed else channels
        if self.embed:
            self.theta = keras.layers.Conv2D(self.embed_channels, 1, use_bias=False,
                                             dtype=self.dtype_policy, name="theta")
            self.phi = keras.layers.Conv2D(self.embed_channels, 1, use_bias=False,
                                           dtype=self.dtype_policy, name="phi")
            self.theta.build(input_shape)
            self.phi.build(input_shape)

    def call(self, inputs):
        theta = self.theta(inputs) if self.embed else inputs
        phi = self.phi(inputs) if self.embed else inputs
        shape = tf.shape(inputs)
        flat = lambda t: tf.reshape(t, [shape[0], shape[1] * shape[2], t.shape[-1]])
        scores = tf.matmul(flat(theta), flat(phi), transpose_b=True)  # [N, HW, HW]
        weights = tf.nn.softmax(scores * tf.cast(self.embed_channels ** -0.5, scores.dtype))
        return tf.reshape(tf.matmul(weights, flat(inputs)), shape)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config["embed"] = self.embed
        return config
