"""Sparta's math, as docs/SPARTA.md writes it: for a feature map `X` in NHWC,

    Z = DW_k(X) + b          # depthwise k x k convolution, stride 1, SAME zero padding
    Sparta(X) = X * sigmoid(Z)

`sparta_forward` is that, differentiated by autodiff; `sparta_exact` is the same with its
exact gradient written out (it keeps X and recomputes the gate in the backward).

`DW_k` comes in two forms (`FORMS`) that compute the same numbers:

- "depthwise": the backend's depthwise convolution (`keras.ops.depthwise_conv`);
- "shifted": the k x k shifted copies of the (zero-padded) input, each times its tap of the
  kernel, summed. Its backward is the same form: dL/dX through the flipped shifts, dL/dK as
  k x k reductions over N, H, W, dL/db as a sum. Each is a chain of elementwise operations
  that XLA fuses into few passes over X, where its CPU lowering of a depthwise convolution
  computes far more than the k x k taps per output (issue 41).

`default_form()` picks "shifted" wherever XLA compiles the gate: always on JAX, and on
TensorFlow inside a function compiled with XLA (`jit_compile`, as Keras's
`compile(jit_compile=True)` makes, and its "auto" on a GPU); elsewhere "depthwise"
(TensorFlow's own depthwise kernel without XLA; PyTorch's). It is read when the gate is
traced. Everything is `keras.ops`; this module imports no backend (TensorFlow's XLA probe
imports it only on that backend) and nothing of `sparta_tf`.
"""

import keras
from keras import ops

FORMS = ("depthwise", "shifted")


def default_form():
    """The form of `DW_k` for this Keras backend, here (see the module docstring)."""
    backend = keras.backend.backend()
    xla = backend == "jax" or (backend == "tensorflow" and _tracing_for_tf_xla())
    return "shifted" if xla else "depthwise"


def _tracing_for_tf_xla():
    """Whether TensorFlow is tracing a function that XLA will compile (`jit_compile=True`).

    `tf.__internal__.get_enclosing_xla_context` is the check tf.function itself makes when
    one XLA function calls another; TensorFlow has no public one. Where it is missing (an
    older or newer TensorFlow) this says False, and the gate keeps the depthwise form: the
    same numbers, at the speed of before. `test_layers` holds it to a traced graph's ops.
    """
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    probe = getattr(tf.__internal__, "get_enclosing_xla_context", None)
    return probe is not None and probe() is not None


def normalized(x, epsilon=1e-6):
    """`x / sqrt(mean over H, W of x^2 + epsilon)`, per example and channel.

    The optional normalised gate input: it makes the gate blind to the scale of
    each feature map, so `Sparta(c * x) = c * Sparta(x)` for c > 0. Half
    precision is computed in float32 and returned in x's dtype.
    """
    half = keras.backend.standardize_dtype(x.dtype) in ("float16", "bfloat16")
    wide = ops.cast(x, "float32") if half else x
    # A sum over the count, not keras.ops.mean: on JAX that computes float64 in float32.
    count = ops.cast(ops.shape(x)[1] * ops.shape(x)[2], wide.dtype)
    rms = ops.sqrt(ops.sum(ops.square(wide), axis=(1, 2), keepdims=True) / count + epsilon)
    return ops.cast(wide / rms, x.dtype)


def gate_logits(u, kernel, bias, form="depthwise"):
    """`Z = DW_k(u) + b`: the depthwise convolution, stride 1, SAME zero padding, in the
    form `form` (one of `FORMS`; "shifted" needs a static height and width, and falls back
    to "depthwise" without them)."""
    if form == "depthwise" or not _static(u):
        return ops.depthwise_conv(u, kernel, padding="same") + bias
    return _shifted(u, kernel) + bias


def _static(u):
    return u.shape[1] is not None and u.shape[2] is not None


def _padded(u, k):
    return ops.pad(u, [[0, 0], [k // 2, k // 2], [k // 2, k // 2], [0, 0]])


def _shifted(u, kernel):
    """DW_k(u) as k x k shifted copies of the padded u, each times its tap of the kernel:
    out[h, w] = sum over i, j of u[h + i - k//2, w + j - k//2] K[i, j]."""
    k, height, width = kernel.shape[0], u.shape[1], u.shape[2]
    padded, out = _padded(u, k), None
    for i in range(k):
        for j in range(k):
            term = padded[:, i:i + height, j:j + width, :] * kernel[i, j, :, 0]
            out = term if out is None else out + term
    return out


def _taps(u, d, k):
    """dL/dK of DW_k(u) for dL/dZ = d: tap (i, j) is the sum over N, H, W of the shifted u
    times d (accumulated in float32 for half precision)."""
    height, width, padded = u.shape[1], u.shape[2], _padded(u, k)
    wide = "float32" if keras.backend.standardize_dtype(d.dtype) in (
        "float16", "bfloat16") else d.dtype
    taps = [[ops.sum(ops.cast(padded[:, i:i + height, j:j + width, :] * d, wide),
                     axis=(0, 1, 2)) for j in range(k)] for i in range(k)]
    return ops.cast(ops.expand_dims(ops.stack([ops.stack(row) for row in taps]), -1), d.dtype)


def sparta_forward(x, kernel, bias, normalize=False, form="depthwise"):
    """The plain forward, `x * sigmoid(DW_k(x) + b)`, differentiated by autodiff.

    With `normalize`, the gate sees `normalized(x)` in place of `x`; `form` is DW_k's.
    """
    u = normalized(x) if normalize else x
    return x * ops.sigmoid(gate_logits(u, kernel, bias, form))


def sparta_exact(x, kernel, bias, normalize=False, form="depthwise"):
    """The same forward with its exact gradient written out (SPARTA.md, "Gradients").

    With S = sigmoid(Z), upstream G and D = G * X * S * (1 - S) = dL/dZ:

        dL/dX = G * S + DW_k^T(D)
        dL/dK = sum over N of the correlation of X with D
        dL/db = sum of D over N, H, W

    The backward keeps X (and u, the gate's input: X itself unless
    normalised), K and b, not Z, S or the output: it recomputes S. With
    `normalize`, autodiff carries u's gradient on through `normalized`.
    Nothing is approximated, so attacks see the true gradient.

    - "shifted" (`_shifted_gate`): the whole gate is one custom gradient,
      written in the form of its forward: DW_k^T(D) is the shifted sum of D
      with the kernel flipped, dL/dK its k x k reductions (`_taps`), dL/db a
      sum.
    - "depthwise" (`_gate`): the custom gradient owns the nonlinear half; it
      takes Z and returns X * S, and gives G * S to X and D to Z. D goes back
      through the linear half, Z = DW_k(u) + b, in the backend's own
      depthwise-convolution gradient, which keeps only u and K, and is no
      slower: written out in `keras.ops` (a transposed, grouped or
      per-offset correlation), dL/dK took 3 to 10 times as long as
      TensorFlow's kernel on the CPU.
    """
    u = normalized(x) if normalize else x
    if form == "shifted" and _static(u):
        return _shifted_gate(x, u, kernel, bias)
    return _gate(x, gate_logits(u, kernel, bias, "depthwise"), ops.stop_gradient(u),
                 ops.stop_gradient(kernel), ops.stop_gradient(bias))


@ops.custom_gradient
def _gate(x, z, u, kernel, bias):
    """`x * sigmoid(z)`, z = DW_k(u) + b (depthwise), with S recomputed from u in the
    backward. u, kernel and bias come in (gradient-stopped) only for the recomputation;
    their gradients reach them through `gate_logits`, so this returns None for them."""
    y = x * ops.sigmoid(z)

    def grad(*args, upstream=None):  # TF, JAX: grad(G); PyTorch: grad(*inputs, upstream=G)
        g = args[0] if upstream is None else upstream
        s = ops.sigmoid(gate_logits(u, kernel * _one_after(g), bias, "depthwise"))
        gs = g * s
        return gs, gs * (x - x * s), None, None, None

    return y, grad


@ops.custom_gradient
def _shifted_gate(x, u, kernel, bias):
    """`x * sigmoid(DW_k(u) + b)` with DW_k shifted, and its whole exact gradient."""
    y = x * ops.sigmoid(_shifted(u, kernel) + bias)

    def grad(*args, upstream=None):  # TF, JAX: grad(G); PyTorch: grad(*inputs, upstream=G)
        g = args[0] if upstream is None else upstream
        u_again = u * _one_after(g)  # not the forward's u: its shifted slices are not kept
        s = ops.sigmoid(_shifted(u_again, kernel) + bias)
        gs = g * s
        d = gs * (x - x * s)
        return (gs, _shifted(d, ops.flip(kernel, axis=(0, 1))),
                _taps(u_again, d, kernel.shape[0]), ops.sum(d, axis=(0, 1, 2)))

    return y, grad


def _one_after(g):
    """The number 1, computed from `g`.

    `K * _one_after(G)` is K (and `u * _one_after(G)` is u), but a compiler
    cannot see that, so the backward's recomputed convolution differs from the
    forward's one. Without it common-subexpression elimination (grappler's and
    XLA's both) merges the two, keeps Z (in the shifted form, u's k x k
    shifted slices) alive from the forward to the backward, and undoes the
    memory saving. It costs a few scalar operations (and, in the shifted form,
    a multiply that XLA fuses).
    """
    return ops.sign(1.0 + ops.abs(ops.nan_to_num(ops.sum(g[:1, :1, :1, :1]))))


# Backends whose keras.ops.custom_gradient differentiates; NumPy's and OpenVINO's
# (inference only) just run the forward, and there the layer uses `sparta_forward`.
HAS_CUSTOM_GRADIENT = keras.backend.backend() in ("tensorflow", "jax", "torch")
