"""Sparta's math, as docs/SPARTA.md writes it: for a feature map `X` in NHWC,

    Z = DW_k(X) + b          # depthwise k x k convolution, stride 1, SAME zero padding
    Sparta(X) = X * sigmoid(Z)

`sparta_forward` is that, differentiated by autodiff; `sparta_exact` is the same with its
exact gradient written out (it keeps X and recomputes the gate in the backward).

`DW_k` comes in two forms (`FORMS`) that compute the same numbers:

- "depthwise": the backend's depthwise convolution (`keras.ops.depthwise_conv`);
- "shifted": the k x k shifted copies of the (zero-padded) input, each times its tap of the
  kernel, summed. Its backward, by autodiff, is the same form: dL/dX through the flipped
  shifts, dL/dK as k x k reductions over N, H, W, dL/db as a sum. Each is a chain of
  elementwise operations that XLA fuses into few passes over X, where its CPU lowering of a
  depthwise convolution computes far more than the k x k taps per output (issue 41).

`default_form()` picks "shifted" on JAX (XLA compiles everything there) and "depthwise"
elsewhere (TensorFlow's own depthwise kernel without XLA; PyTorch's). Everything is
`keras.ops`; this module imports no backend and nothing of `sparta_tf`.
"""

import keras
from keras import ops

FORMS = ("depthwise", "shifted")


def default_form():
    """The form of `DW_k` for this Keras backend (see the module docstring)."""
    return "shifted" if keras.backend.backend() == "jax" else "depthwise"


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
    height, width = u.shape[1], u.shape[2]
    if form == "depthwise" or height is None or width is None:
        return ops.depthwise_conv(u, kernel, padding="same") + bias
    k = kernel.shape[0]
    padded = ops.pad(u, [[0, 0], [k // 2, k // 2], [k // 2, k // 2], [0, 0]])
    z = bias
    for i in range(k):  # out[h, w] = sum over i, j of u[h + i - k//2, w + j - k//2] K[i, j]
        for j in range(k):
            z = z + padded[:, i:i + height, j:j + width, :] * kernel[i, j, :, 0]
    return z


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

    `_gate` (a `keras.ops.custom_gradient`) owns the nonlinear half: it takes
    Z and returns X * S, and its backward gives G * S to X and D to Z from X
    and an S that it recomputes. What it keeps for the backward is X, u (the
    gate's input: X itself unless normalised), K and b; not Z, S or the
    output. The linear half, Z = DW_k(u) + b, is differentiated by the
    backend: D goes back through the depthwise convolution as DW_k^T(D) (the
    kernel flipped) to u, as the correlation of u with D to K and as its sum
    to b, in each backend's own depthwise-convolution gradient, which keeps
    only u and K. Those are the formulas above, and no slower: written out in
    `keras.ops` (a transposed, grouped or per-offset correlation), dL/dK took
    3 to 10 times as long as TensorFlow's kernel on the CPU. In the "shifted"
    form, the same formulas are the autodiff of the shifted sums (the module
    docstring). With `normalize`, autodiff carries u's gradient on through
    `normalized`. Nothing is approximated, so attacks see the true gradient.
    """
    u = normalized(x) if normalize else x
    z = gate_logits(u, kernel, bias, form)
    return _GATES[form](x, z, ops.stop_gradient(u), ops.stop_gradient(kernel),
                        ops.stop_gradient(bias))


def _gate_of(form):
    """The nonlinear half of `sparta_exact` for DW_k's form `form`."""

    @ops.custom_gradient
    def gate(x, z, u, kernel, bias):
        """`x * sigmoid(z)`, z = DW_k(u) + b, with S recomputed from u in the backward.

        u, kernel and bias come in (gradient-stopped) only for the recomputation;
        their gradients reach them through `gate_logits`, so this returns None
        for them.
        """
        y = x * ops.sigmoid(z)

        def grad(*args, upstream=None):  # TF, JAX: grad(G); PyTorch: grad(*inputs, upstream=G)
            g = args[0] if upstream is None else upstream
            s = ops.sigmoid(gate_logits(u, kernel * _one_after(g), bias, form))
            gs = g * s
            return gs, gs * (x - x * s), None, None, None

        return y, grad

    return gate


_GATES = {form: _gate_of(form) for form in FORMS}


def _one_after(g):
    """The number 1, computed from `g`.

    `K * _one_after(G)` is K, but a compiler cannot see that, so the backward's
    recomputed convolution differs from the forward's one. Without it
    common-subexpression elimination (grappler's and XLA's both) merges the
    two, keeps Z alive from the forward to the backward, and undoes the
    memory saving. It costs a few scalar operations.
    """
    return ops.sign(1.0 + ops.abs(ops.nan_to_num(ops.sum(g[:1, :1, :1, :1]))))


# Backends whose keras.ops.custom_gradient differentiates; NumPy's and OpenVINO's
# (inference only) just run the forward, and there the layer uses `sparta_forward`.
HAS_CUSTOM_GRADIENT = keras.backend.backend() in ("tensorflow", "jax", "torch")
