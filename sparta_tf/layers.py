"""The Sparta activation (and FReLU, the spatial activation it is compared with).

The definition is `docs/SPARTA.md` of the project: for a feature map `X` in NHWC,

    Z = DW_k(X) + b          # depthwise k x k convolution, stride 1, SAME zero padding
    Sparta(X) = X * sigmoid(Z)

The math (the gate, its two forms and its exact gradient) is `sparta_tf.gate`, whose
functions this module names too (`layers.sparta_exact`, ...). Everything here is `keras.ops`
and Keras layers, so it runs on every Keras 3 backend (TensorFlow, JAX, PyTorch); the module
imports no backend itself, and nothing of `sparta_tf` but `gate`.
"""

import keras
import numpy as np
from keras import ops

from sparta_tf.gate import (  # noqa: F401  (the layer's math, named here as before)
    FORMS, HAS_CUSTOM_GRADIENT, default_form, gate_logits, normalized, sparta_exact,
    sparta_forward)


MAX_SHIFT = 0.95  # the most `beta` of `Sparta(shift=True)` can be: 1 / (1 - beta) <= 20


@keras.saving.register_keras_serializable(package="sparta_tf")
class _Interval(keras.constraints.Constraint):
    """Clips a weight into [low, high] after each update."""

    def __init__(self, low, high):
        self.low, self.high = float(low), float(high)

    def __call__(self, w):
        return ops.clip(w, self.low, self.high)

    def get_config(self):
        return {"low": self.low, "high": self.high}


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

    Backends. The layer is `keras.ops` only. The exact custom gradient
    (`sparta_exact`, through `keras.ops.custom_gradient`) is used on
    TensorFlow, JAX and PyTorch, which all have `custom_gradient`; on a
    backend without one (NumPy, OpenVINO: inference only) the layer falls
    back to `sparta_forward`, which gives the same numbers. PyTorch's
    `custom_gradient` saves every input of the op, Z included in the
    depthwise form (its default there), so there it saves no memory.

    Cost against autodiff (`benchmarks/sparta_memory.py`: ResNet-18 at
    width 0.25, batch 128, 32x32, one forward and backward, 2-core CPU;
    docs/BENCHMARKS.md): on TensorFlow (depthwise form) the custom gradient
    holds 0.76x to 0.83x autodiff's peak memory in 0.97x to 1.18x its time
    (two runs, the second on a loaded machine). On JAX (XLA, shifted form)
    it holds 0.23x autodiff's memory in 0.76x to 0.84x its time; with DW_k as
    a depthwise convolution it held 0.91x in 1.34x the time, XLA lowering
    that convolution slowly on its CPU. In the shifted form the PGD-3 AT
    step of that ResNet with Sparta takes about 1.1x ReLU's time on JAX's
    CPU, against 2.45x with the depthwise form (docs/BENCHMARKS.md).

    Args:
        kernel_size: odd int, the size k of the depthwise gate kernel.
        beta0: the initial centre weight of the kernel.
        use_custom_gradient: if True, differentiate through `sparta_exact`
            (the exact gradient that recomputes the gate in the backward,
            less activation memory); if False, through autodiff of
            `sparta_forward`. Both give the same numbers.
        kernel_regularizer: optional regularizer for the gate kernel.
        bias_regularizer: optional regularizer for the gate bias.
        normalize_gate_input: if True, the gate sees `normalized(x)`, so it
            does not depend on the scale of each feature map. Off by default
            (the README's ablation).
        shift: if True (activation `sparta_shift`), the output is
            `x * (sigmoid(Z) - beta) / (1 - beta)`, with `beta` learned per
            channel in [0, 0.95] (it starts at 0, as plain Sparta): negative
            inputs get an output, as in PSSiLU (Dai et al. 2022). The custom
            gradient is kept: the output is `(Sparta(x) - beta * x) / (1 - beta)`.
        gate_batch_norm: if True (activation `sparta_bn`), the gate is
            `sigmoid(BN(DW_k(x)) + b)`, a batch norm on the spatial branch as
            in FReLU, so the gate does not depend on the scale of its input.
            It starts away from Swish (the batch norm standardises DW_k(x)),
            and it is differentiated by autodiff: the batch norm sits between
            the convolution and the sigmoid, where the custom gradient would
            have to recompute it.
        gate_form: how DW_k is computed (`sparta_tf.gate`): "depthwise" (the
            backend's depthwise convolution), "shifted" (k x k shifted
            multiply-adds, which XLA fuses), or "auto" (the default): shifted
            wherever XLA compiles the gate, depthwise elsewhere. That is
            shifted on JAX, and on TensorFlow inside a function compiled with
            XLA (Keras's `compile(jit_compile=True)`; read when the step is
            traced), where the gate alone was 9x to 11x faster in the shifted
            form; TensorFlow without XLA keeps its native kernel (the shifted
            form was 9x slower there), as does PyTorch. Both forms give the
            same numbers and gradients.
        **kwargs: the usual Keras layer arguments (`name`, `dtype`,
            `trainable`, ...).

    Input shape: 4-D `(batch, height, width, channels)`, any height and width
    of 1 or more. Output shape: the same as the input.
    """

    def __init__(self, kernel_size=3, beta0=1.0, use_custom_gradient=True,
                 kernel_regularizer=None, bias_regularizer=None,
                 normalize_gate_input=False, shift=False, gate_batch_norm=False,
                 gate_form="auto", **kwargs):
        super().__init__(**kwargs)
        if gate_form not in ("auto", *FORMS):
            raise ValueError(f"gate_form must be 'auto' or one of {FORMS}; got {gate_form!r}.")
        self.gate_form = gate_form
        if not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd int; got {kernel_size!r}.")
        self.kernel_size = kernel_size
        self.beta0 = float(beta0)
        self.use_custom_gradient = bool(use_custom_gradient)
        self.normalize_gate_input = bool(normalize_gate_input)
        self.shift = bool(shift)
        self.gate_batch_norm = bool(gate_batch_norm)
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)
        self.bias_regularizer = keras.regularizers.get(bias_regularizer)
        if self.gate_batch_norm:
            # Synchronised on TensorFlow, as every batch norm of sparta_tf.models.
            self.gate_bn = keras.layers.BatchNormalization(
                momentum=0.9, epsilon=1e-5, center=False, dtype=self.dtype_policy,
                synchronized=keras.backend.backend() == "tensorflow", name="gate_bn")

    def build(self, input_shape):
        _check_nhwc(self, input_shape)
        channels = input_shape[-1]
        k = self.kernel_size
        init = np.zeros((k, k, channels, 1))
        init[k // 2, k // 2] = self.beta0  # Swish with beta0 at the start
        self.kernel = self.add_weight(
            name="kernel", shape=init.shape,
            initializer=lambda shape, dtype=None: ops.convert_to_tensor(
                init, dtype or "float32"),
            regularizer=self.kernel_regularizer)
        self.bias = self.add_weight(
            name="bias", shape=(channels,), initializer="zeros",
            regularizer=self.bias_regularizer)
        if self.shift:
            self.beta = self.add_weight(name="beta", shape=(channels,), initializer="zeros",
                                        constraint=_Interval(0.0, MAX_SHIFT))
        if self.gate_batch_norm:
            self.gate_bn.build(input_shape)
        self.input_spec = keras.layers.InputSpec(ndim=4, axes={-1: channels})

    def call(self, inputs, training=None):
        kernel = ops.cast(self.kernel, inputs.dtype)
        bias = ops.cast(self.bias, inputs.dtype)
        if self.gate_batch_norm:
            y = inputs * ops.sigmoid(self._gate_logits(inputs, training))
        else:
            exact = self.use_custom_gradient and HAS_CUSTOM_GRADIENT
            fn = sparta_exact if exact else sparta_forward
            y = fn(inputs, kernel, bias, normalize=self.normalize_gate_input,
                   form=self.form())
        if self.shift:
            beta = ops.cast(self.beta, inputs.dtype)
            y = (y - beta * inputs) / (1.0 - beta)
        return y

    def _gate_logits(self, inputs, training=None):
        u = normalized(inputs) if self.normalize_gate_input else inputs
        kernel = ops.cast(self.kernel, inputs.dtype)
        bias = ops.cast(self.bias, inputs.dtype)
        if not self.gate_batch_norm:
            return gate_logits(u, kernel, bias, self.form())
        z = self.gate_bn(ops.depthwise_conv(u, kernel, padding="same"), training=training)
        return z + bias

    def form(self):
        """The form of DW_k that this layer computes (`gate_form`, "auto" resolved)."""
        return default_form() if self.gate_form == "auto" else self.gate_form

    def gate(self, inputs):
        """The attention map `sigmoid(Z)`, Z = DW_k(x) + b (with `gate_batch_norm`,
        BN(DW_k(x)) + b, the batch norm in inference mode), for plots and analysis."""
        return ops.sigmoid(self._gate_logits(ops.convert_to_tensor(inputs, self.compute_dtype)))

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update({
            "kernel_size": self.kernel_size,
            "beta0": self.beta0,
            "use_custom_gradient": self.use_custom_gradient,
            "gate_form": self.gate_form,
            "normalize_gate_input": self.normalize_gate_input,
            "shift": self.shift,
            "gate_batch_norm": self.gate_batch_norm,
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
        # Synchronised over replicas, as every other batch norm of sparta_tf.models, on
        # TensorFlow: Keras has the option on that backend only (elsewhere it raises).
        self.bn = keras.layers.BatchNormalization(
            synchronized=keras.backend.backend() == "tensorflow", dtype=self.dtype_policy,
            name="bn")

    def build(self, input_shape):
        _check_nhwc(self, input_shape)
        self.conv.build(input_shape)
        self.bn.build(input_shape)
        self.input_spec = keras.layers.InputSpec(ndim=4, axes={-1: input_shape[-1]})

    def call(self, inputs, training=None):
        return ops.maximum(inputs, self.bn(self.conv(inputs), training=training))

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
        shape = ops.shape(inputs)
        flat = lambda t: ops.reshape(t, (shape[0], shape[1] * shape[2], t.shape[-1]))
        scores = ops.einsum("nid,njd->nij", flat(theta), flat(phi))  # [N, HW, HW]
        weights = ops.softmax(scores * (self.embed_channels ** -0.5), axis=-1)
        return ops.reshape(ops.matmul(weights, flat(inputs)), shape)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config["embed"] = self.embed
        return config
