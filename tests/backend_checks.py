"""Checks of sparta_tf.layers and sparta_tf.models on one Keras backend, in one process.

    KERAS_BACKEND=jax python tests/backend_checks.py [--tf_dir DIR] [--out_dir DIR]

`tests/test_backends.py` runs it under JAX, and under PyTorch where torch imports, with
TensorFlow made unimportable (the pytest process is on TensorFlow, and Keras picks its
backend once, at import). Each check prints `PASS name` or `FAIL name: why`; the last line
is `RESULT {json}`. The exit status is 1 if a check failed.

- the forward of `sparta_forward`, `sparta_exact` and the `Sparta` layer against NumPy
  (the depthwise convolution written out, SAME zero padding), FReLU's and NonLocalMeans';
- the custom gradient against autodiff of `sparta_forward` (float32, and float64 where the
  backend has it: JAX with x64 enabled here, PyTorch), against SPARTA.md's formulas in NumPy,
  and against central finite differences (float64);
- ResNet-10 (one block a stage) at width 0.0625 with Sparta: its parameter count, forward,
  and backward, with the custom gradient and without (the same input gradient);
- with `--tf_dir`: the tiny model and the ResNet that `test_backends.py` saved on
  TensorFlow load here and give TensorFlow's logits; with `--out_dir`: this backend saves
  its own, for TensorFlow to load.

Importable on any backend with nothing run, for `tiny_model`, `resnet`, `set_weights` and
the file names, which `test_backends.py` uses on TensorFlow.
"""

import json
import os
import sys
import time
import traceback
import zipfile

if os.environ.get("KERAS_BACKEND") == "jax" and __name__ == "__main__":
    import jax
    jax.config.update("jax_enable_x64", True)  # before any array: float64 checks

import keras
import numpy as np
from keras import ops

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from sparta_tf import layers, models, transfer  # pylint: disable=wrong-import-position
from conftest import np_depthwise, np_sigmoid  # pylint: disable=wrong-import-position

TINY_SHAPE = (7, 7, 3)
TINY_KERAS, TINY_WEIGHTS = "tiny.keras", "tiny.weights.h5"
RESNET_WEIGHTS, RESNET_KERAS = "resnet.weights.h5", "resnet.keras"
RESNET_SYNCHRONIZED = "resnet_synchronized.keras"  # as sparta-tf 0.1 and multi-GPU runs wrote
LOGITS = "logits.npz"


# --- shared with test_backends.py (any backend) -----------------------------------------

def tiny_model():
    """Conv -> Sparta -> Sparta (k=5, normalised gate, autodiff) -> FReLU -> non-local means
    -> pooling -> Dense: every layer of `sparta_tf.layers` with its options."""
    inputs = keras.Input(TINY_SHAPE, name="pixels")
    h = keras.layers.Conv2D(4, 3, padding="same", name="conv")(inputs)
    h = layers.Sparta(name="sparta")(h)
    h = layers.Sparta(kernel_size=5, beta0=2.0, normalize_gate_input=True,
                      use_custom_gradient=False, name="sparta_norm")(h)
    h = layers.FReLU(name="frelu")(h)
    h = layers.NonLocalMeans(name="nonlocal")(h)
    h = keras.layers.GlobalAveragePooling2D(name="pool")(h)
    return keras.Model(inputs, keras.layers.Dense(3, name="logits")(h), name="tiny")


def resnet(use_custom_gradient=True):
    return models.build("resnet10", 10, "sparta", width_multiplier=0.0625,
                        input_shape=(32, 32, 3),
                        activation_kwargs={"use_custom_gradient": use_custom_gradient})


def set_weights(model, seed=0):
    """Every weight from NumPy, so the same on every backend: kernels scaled by their fan-in
    (a depthwise one's is k * k), vectors near 0 (scales and variances near 1)."""
    rng = np.random.default_rng(seed)
    for w in model.weights:
        shape = tuple(w.shape)
        if len(shape) > 1:
            fan_in = int(np.prod(shape[:-2])) * (shape[-2] if shape[-1] != 1 else 1)
            value = rng.normal(0, 1, shape) / np.sqrt(fan_in)
        else:
            near_one = any(n in w.path for n in ("variance", "gamma"))
            value = (rng.uniform(0.5, 1.5, shape) if near_one else rng.normal(0, 0.2, shape))
        w.assign(value.astype(w.dtype))
    return model


def pixels(shape, seed=1):
    return np.random.default_rng(seed).uniform(size=shape).astype("float32")


def logits(model, x):
    return np.asarray(ops.convert_to_numpy(model(x, training=False)))


# --- NumPy references ---------------------------------------------------------------------

def np_sparta(x, kernel, bias):
    return x * np_sigmoid(np_depthwise(x, kernel) + bias)


def np_sparta_grads(x, kernel, bias, g):
    """SPARTA.md's exact gradient, written out: dX = G S + DW^T(D), dK = sum over N of the
    correlation of X with D, db = sum of D, where D = G X S (1 - S)."""
    k = kernel.shape[0]
    s = np_sigmoid(np_depthwise(x, kernel) + bias)
    d = g * x * s * (1 - s)
    dx = g * s + np_depthwise(d, kernel[::-1, ::-1])  # the kernel flipped
    padded = np.pad(x, [(0, 0), (k // 2, k // 2), (k // 2, k // 2), (0, 0)])
    dk = np.zeros_like(kernel)
    for a in range(k):
        for b in range(k):
            dk[a, b, :, 0] = np.sum(padded[:, a:a + x.shape[1], b:b + x.shape[2], :] * d,
                                    axis=(0, 1, 2))
    return dx, dk, d.sum(axis=(0, 1, 2))


def np_non_local(x, theta=None, phi=None):
    """NumPy non-local means: softmax_j(theta_i . phi_j / sqrt(d)) weighted sum of x_j."""
    n, h, w, c = x.shape
    flat = x.reshape(n, h * w, c).astype(np.float64)
    t = flat if theta is None else flat @ theta.reshape(c, -1)
    p = flat if phi is None else flat @ phi.reshape(c, -1)
    scores = np.einsum("nid,njd->nij", t, p) / np.sqrt(t.shape[-1])
    weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
    weights /= weights.sum(axis=-1, keepdims=True)
    return (weights @ flat).reshape(n, h, w, c)


# --- gradients on this backend ------------------------------------------------------------

def _tensor(a, dtype):
    return ops.convert_to_tensor(np.asarray(a), dtype)


def vjp(fn, args, upstream, jit=False):
    """`fn(*args)` and the gradients of `sum(fn(*args) * upstream)` to every arg, as NumPy;
    on JAX with `jit`, under `jax.jit` (as training runs it)."""
    backend = keras.backend.backend()
    if backend == "jax":
        import jax  # pylint: disable=import-outside-toplevel

        def run(args, upstream):
            y, pull = jax.vjp(fn, *args)
            return y, pull(upstream)
        y, grads = (jax.jit(run) if jit else run)(tuple(args), upstream)
    elif backend == "torch":
        import torch  # pylint: disable=import-outside-toplevel
        args = [a.detach().clone().requires_grad_(True) for a in args]
        y = fn(*args)
        grads = torch.autograd.grad(y, args, grad_outputs=upstream)
    else:
        import tensorflow as tf  # pylint: disable=import-outside-toplevel
        with tf.GradientTape() as tape:
            tape.watch(args)
            y = fn(*args)
        grads = tape.gradient(y, args, output_gradients=upstream)
    return ops.convert_to_numpy(y), [ops.convert_to_numpy(g) for g in grads]


def model_gradients(model, x, y):
    """The cross-entropy of `model(x, training=True)`, its gradients to the trainable
    weights and its gradient to `x`, as NumPy (on JAX under `jax.jit`)."""
    backend = keras.backend.backend()
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    if backend == "jax":
        import jax  # pylint: disable=import-outside-toplevel
        trainable = [v.value for v in model.trainable_variables]
        non_trainable = [v.value for v in model.non_trainable_variables]

        def loss(trainable, x):
            out, _ = model.stateless_call(trainable, non_trainable, x, training=True)
            return loss_fn(y, out)
        value, (grads, g_x) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(
            trainable, ops.convert_to_tensor(x))
    elif backend == "torch":
        import torch  # pylint: disable=import-outside-toplevel
        x = ops.convert_to_tensor(x).requires_grad_(True)
        value = loss_fn(ops.convert_to_tensor(y), model(x, training=True))
        *grads, g_x = torch.autograd.grad(
            value, [v.value for v in model.trainable_variables] + [x])
    else:
        import tensorflow as tf  # pylint: disable=import-outside-toplevel
        x = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(x)
            value = loss_fn(y, model(x, training=True))
        *grads, g_x = tape.gradient(value, model.trainable_variables + [x])
    return (float(ops.convert_to_numpy(value)), [ops.convert_to_numpy(g) for g in grads],
            ops.convert_to_numpy(g_x))


def has_float64():
    try:
        return keras.backend.standardize_dtype(_tensor([1.0], "float64").dtype) == "float64"
    except Exception:  # pylint: disable=broad-except
        return False


# --- the checks ---------------------------------------------------------------------------

SHAPES = [(1, 1, 1, 3), (1, 5, 7, 4), (2, 9, 9, 2), (3, 4, 6, 5)]  # odd H, W, batch 1


def _params(shape, kernel_size, seed):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=shape), rng.normal(size=(kernel_size, kernel_size, shape[-1], 1)),
            rng.normal(size=shape[-1:]))


def _max_diff(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def check_forward_matches_numpy():
    dtype, tol = ("float64", 1e-12) if has_float64() else ("float32", 1e-5)
    for shape in SHAPES:
        for kernel_size in (1, 3, 5):
            x, k, b = _params(shape, kernel_size, seed=sum(shape) + kernel_size)
            expected = np_sparta(x, k, b)
            args = [_tensor(a, dtype) for a in (x, k, b)]
            for fn in (layers.sparta_forward, layers.sparta_exact):
                for form in layers.FORMS:
                    err = _max_diff(ops.convert_to_numpy(fn(*args, form=form)), expected)
                    assert err <= tol, f"{fn.__name__} {form} {shape} k={kernel_size}: {err:.3g}"
            layer = layers.Sparta(kernel_size, dtype=dtype)
            layer.build(shape)
            layer.kernel.assign(k)
            layer.bias.assign(b)
            err = _max_diff(ops.convert_to_numpy(layer(args[0])), expected)
            assert err <= tol, f"Sparta layer {shape} k={kernel_size}: {err:.3g}"
            err = _max_diff(ops.convert_to_numpy(layer.gate(args[0])) * x, expected)
            assert err <= tol, f"Sparta.gate {shape} k={kernel_size}: {err:.3g}"
    return {"dtype": dtype}


# Every shape at k = 3, and k = 1 and 5 at one shape (the full grid runs on TensorFlow).
CASES = [(shape, 3) for shape in SHAPES] + [(SHAPES[1], 1), (SHAPES[1], 5)]


def _check_against_autodiff(dtype, tol, cases):
    cases = [(s, k, False) for s, k in cases] + [(SHAPES[0], 3, True), (SHAPES[2], 3, True)]
    for shape, kernel_size, normalize in cases:
        x, k, b = _params(shape, kernel_size, seed=sum(shape) + kernel_size)
        g = np.random.default_rng(1).normal(size=shape)
        args = [_tensor(a, dtype) for a in (x, k, b)]
        upstream = _tensor(g, dtype)
        # Autodiff of the depthwise form against the exact gradient in each form.
        auto = vjp(lambda *a: layers.sparta_forward(*a, normalize=normalize), args,
                   upstream)
        for form in layers.FORMS:
            exact = vjp(lambda *a: layers.sparta_exact(*a, normalize=normalize, form=form),
                        args, upstream, jit=shape == SHAPES[1])  # one shape under jax.jit
            bound = tol * (10 if normalize else 1)
            assert _max_diff(exact[0], auto[0]) <= bound, f"forward, {form}"
            for name, g1, g2 in zip(("dX", "dK", "db"), exact[1], auto[1]):
                err = _max_diff(g1, g2)
                assert err <= bound, (f"{name} {form} {dtype} normalize={normalize} {shape} "
                                      f"k={kernel_size}: {err:.3g} > {bound:g}")
    return {}


def check_custom_gradient_matches_autodiff_float32():
    return _check_against_autodiff("float32", 1e-5, CASES[1:4])


def check_custom_gradient_matches_autodiff_float64():
    if not has_float64():
        return {"skipped": "no float64 on this backend"}
    return _check_against_autodiff("float64", 1e-12, CASES)


def check_custom_gradient_matches_the_formulas_in_numpy():
    dtype, tol = ("float64", 1e-10) if has_float64() else ("float32", 1e-4)
    for shape, kernel_size in CASES:
        x, k, b = _params(shape, kernel_size, seed=3 + sum(shape) + kernel_size)
        g = np.random.default_rng(2).normal(size=shape)
        for form in layers.FORMS:
            _, grads = vjp(lambda *a: layers.sparta_exact(*a, form=form),
                           [_tensor(a, dtype) for a in (x, k, b)], _tensor(g, dtype))
            for name, got, want in zip(("dX", "dK", "db"), grads,
                                       np_sparta_grads(x, k, b, g)):
                err = _max_diff(got, want)
                assert err <= tol * max(1.0, np.abs(want).max()), (
                    f"{name} {form} {shape} k={kernel_size}: {err:.3g}")
    return {"dtype": dtype}


def check_custom_gradient_matches_finite_differences():
    if not has_float64():
        return {"skipped": "no float64 on this backend"}
    worst = 0.0
    # Not normalised at H = W = 1 (too steep near 0 for finite differences).
    for shape, normalize in [((1, 3, 5, 2), False), ((2, 1, 1, 3), False),
                             ((1, 5, 3, 1), False), ((1, 3, 5, 2), True)]:
        params = list(_params(shape, 3, seed=7))
        g = np.random.default_rng(8).normal(size=shape)

        form = layers.default_form()  # this backend's: shifted on JAX

        def loss(*values):
            y = layers.sparta_exact(*[_tensor(v, "float64") for v in values],
                                    normalize=normalize, form=form)
            return float(np.sum(ops.convert_to_numpy(y) * g))
        _, grads = vjp(lambda *a: layers.sparta_exact(*a, normalize=normalize, form=form),
                       [_tensor(p, "float64") for p in params], _tensor(g, "float64"))
        eps = 1e-6
        for name, i in zip(("dX", "dK", "db"), range(3)):
            numerical = np.zeros_like(params[i])
            for index in np.ndindex(params[i].shape):
                plus, minus = [p.copy() for p in params], [p.copy() for p in params]
                plus[i][index] += eps
                minus[i][index] -= eps
                numerical[index] = (loss(*plus) - loss(*minus)) / (2 * eps)
            err = _max_diff(grads[i], numerical)
            worst = max(worst, err)
            assert err < 1e-6, f"{name} {shape} normalize={normalize}: {err:.3g}"
    return {"max_error": worst}


def check_custom_gradient_keeps_less_memory():
    """On JAX, XLA's buffer plan of one step of a chain of convolutions and Sparta, in each
    form of DW_k: the custom gradient's backward keeps X and recomputes S, so it plans less
    than autodiff, which keeps S (and Z, had XLA merged the recomputation with the forward's
    convolution; in the shifted form, X's k x k shifted slices): at most 0.9 of autodiff's
    in the depthwise form, 0.8 (issue 41's target) in the shifted one."""
    if keras.backend.backend() != "jax":
        return {"not_measured": "an exact buffer plan is JAX's (XLA) only"}
    import jax  # pylint: disable=import-outside-toplevel
    rng = np.random.default_rng(0)
    x = _tensor(rng.normal(size=(16, 16, 16, 8)), "float32")
    weights = [_tensor(rng.normal(size=(3, 3, 8, 8)) * 0.1, "float32") for _ in range(4)]
    k = _tensor(rng.normal(size=(3, 3, 8, 1)) * 0.1, "float32")
    b = _tensor(np.zeros(8), "float32")
    temp = {}
    for form in layers.FORMS:
        for fn in (layers.sparta_exact, layers.sparta_forward):
            def loss(x, k, b, fn=fn, form=form):
                h = x
                for w in weights:
                    h = fn(ops.conv(h, w, padding="same"), k, b, form=form)
                return ops.sum(h)
            compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(x, k, b).compile()
            temp[f"{fn.__name__}/{form}"] = compiled.memory_analysis().temp_size_in_bytes
    for form, bound in (("depthwise", 0.9), ("shifted", 0.8)):
        assert temp[f"sparta_exact/{form}"] < bound * temp[f"sparta_forward/{form}"], temp
    return temp


def check_resnet_forward_and_backward():
    x = pixels((2, 32, 32, 3))
    y = np.array([1, 4], np.int32)
    custom = set_weights(resnet(True))
    out = ops.convert_to_numpy(custom(x, training=False))
    assert out.shape == (2, 10) and np.isfinite(out).all(), out.shape
    loss, grads, gx_custom = model_gradients(custom, x, y)
    assert len(grads) == len(custom.trainable_variables)
    assert all(g.shape == tuple(v.shape) and np.isfinite(g).all()
               for g, v in zip(grads, custom.trainable_variables)), "weight gradients"
    assert all(np.abs(g).max() > 0 for g, v in zip(grads, custom.trainable_variables)
               if "sparta" in v.path), "a Sparta weight got no gradient"
    assert gx_custom.shape == x.shape and np.abs(gx_custom).max() > 0, "input gradient"
    return {"params": int(custom.count_params()), "loss": loss}


def check_frelu_matches_numpy():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(2, 5, 6, 3)).astype("float32")
    layer = layers.FReLU()
    layer.build(x.shape)
    kernel = rng.normal(size=(3, 3, 3, 1)).astype("float32")
    gamma, beta, mean, var = (rng.uniform(0.5, 2, 3).astype("float32") for _ in range(4))
    layer.conv.kernel.assign(kernel)
    layer.bn.set_weights([gamma, beta - 1, mean, var])
    z = (np_depthwise(x, kernel) - mean) / np.sqrt(var + layer.bn.epsilon) * gamma + beta - 1
    err = _max_diff(ops.convert_to_numpy(layer(x, training=False)), np.maximum(x, z))
    assert err < 1e-5, f"{err:.3g}"
    assert layer.count_params() == 3 * 3 * 3 + 4 * 3
    return {}


def check_non_local_means_matches_numpy():
    x = np.random.default_rng(0).normal(size=(2, 3, 5, 6)).astype("float32")
    for embed in (True, False):
        layer = layers.NonLocalMeans(embed=embed)
        y = ops.convert_to_numpy(layer(x))
        weights = ((ops.convert_to_numpy(layer.theta.kernel),
                    ops.convert_to_numpy(layer.phi.kernel)) if embed else ())
        err = _max_diff(y, np_non_local(x, *weights))
        assert err < 1e-5, f"embed={embed}: {err:.3g}"
    return {}


def check_loads_what_tensorflow_saved(tf_dir):
    saved = np.load(os.path.join(tf_dir, LOGITS))
    errors = {}
    loaded = keras.models.load_model(os.path.join(tf_dir, TINY_KERAS))
    errors["tiny.keras"] = _max_diff(logits(loaded, saved["tiny_x"]), saved["tiny"])
    rebuilt = tiny_model()
    rebuilt.load_weights(os.path.join(tf_dir, TINY_WEIGHTS))
    errors["tiny.weights.h5"] = _max_diff(logits(rebuilt, saved["tiny_x"]), saved["tiny"])
    net = resnet()
    net.load_weights(os.path.join(tf_dir, RESNET_WEIGHTS))
    errors["resnet.weights.h5"] = _max_diff(logits(net, saved["resnet_x"]), saved["resnet"])
    # `models.build`'s file: Keras's own loader reads it (after `import sparta_tf`).
    loaded = keras.models.load_model(os.path.join(tf_dir, RESNET_KERAS))
    errors["resnet.keras"] = _max_diff(logits(loaded, saved["resnet_x"]), saved["resnet"])
    # Saved on TensorFlow with synchronized batch norm, which only TensorFlow builds: the
    # library's loader (`transfer.load`) reads it as plain batch norm elsewhere.
    with zipfile.ZipFile(os.path.join(tf_dir, RESNET_SYNCHRONIZED)) as saved_file:
        assert '"synchronized": true' in saved_file.read("config.json").decode()
    loaded = transfer.load(os.path.join(tf_dir, RESNET_SYNCHRONIZED))
    errors[RESNET_SYNCHRONIZED] = _max_diff(logits(loaded, saved["resnet_x"]), saved["resnet"])
    for name, err in errors.items():
        assert err < 1e-5, f"{name}: logits differ from TensorFlow's by {err:.3g}"
    return errors


def save_for_tensorflow(out_dir):
    """This backend's tiny model and ResNet, saved, with their logits."""
    os.makedirs(out_dir, exist_ok=True)
    tiny = set_weights(tiny_model(), seed=5)
    tiny.save(os.path.join(out_dir, TINY_KERAS))
    tiny.save_weights(os.path.join(out_dir, TINY_WEIGHTS))
    net = set_weights(resnet(), seed=6)
    net.save_weights(os.path.join(out_dir, RESNET_WEIGHTS))
    tiny_x, resnet_x = pixels((2,) + TINY_SHAPE, seed=7), pixels((2, 32, 32, 3), seed=8)
    np.savez(os.path.join(out_dir, LOGITS), tiny=logits(tiny, tiny_x), tiny_x=tiny_x,
             resnet=logits(net, resnet_x), resnet_x=resnet_x)
    return {}


CHECKS = [name for name in dir() if name.startswith("check_")]


def main(argv):
    import argparse  # pylint: disable=import-outside-toplevel
    parser = argparse.ArgumentParser()
    parser.add_argument("--tf_dir", help="the files that TensorFlow saved, to load here")
    parser.add_argument("--out_dir", help="where to save this backend's files")
    args = parser.parse_args(argv)
    steps = [(name[len("check_"):], globals()[name]) for name in CHECKS
             if name != "check_loads_what_tensorflow_saved"]
    if args.tf_dir:
        steps.append(("loads_what_tensorflow_saved",
                      lambda: check_loads_what_tensorflow_saved(args.tf_dir)))
    if args.out_dir:
        steps.append(("save_for_tensorflow", lambda: save_for_tensorflow(args.out_dir)))
    results = {"backend": keras.backend.backend(),
               "tensorflow_imported": "tensorflow" in sys.modules}
    failed = []
    for name, fn in steps:
        start = time.time()
        try:
            results[name] = fn() or {}
            print(f"PASS {name} ({time.time() - start:.1f} s)", flush=True)
        except Exception as e:  # pylint: disable=broad-except
            failed.append(name)
            results[name] = {"error": f"{type(e).__name__}: {e}"}
            print(f"FAIL {name}: {type(e).__name__}: {e}", flush=True)
            traceback.print_exc()
    results["tensorflow_imported"] = "tensorflow" in sys.modules
    results["failed"] = failed
    print("RESULT " + json.dumps(results), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
