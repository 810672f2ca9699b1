"""Sparta's gate alone, in each form of DW_k (`sparta_tf.gate.FORMS`), against ReLU and SiLU.

    KERAS_BACKEND=jax python benchmarks/gate_forms.py --output_dir=results/benchmarks/NAME
    KERAS_BACKEND=tensorflow python benchmarks/gate_forms.py --jit_compile ...

Each configuration is one compiled function (`jax.jit`; `tf.function`, under XLA with
`--jit_compile`): the forward of the activation on a feature map X, and the gradients of
`sum(f(X) * G)` to X and to the gate's kernel and bias. Configurations: relu, silu, and
sparta/<form> for each form, by the exact custom gradient (`gate.sparta_exact`). The shapes
are ResNet-18's at `--width` and batch `--batch_size` (32x32, 16x16, 8x8 and 4x4 maps), each
dtype of `--dtypes`. The configurations of one shape and dtype take turns, round after round;
each ratio is taken within a round, as its median [min, max].

Before timing, the forms are held to each other at every timed shape (float32) and to a
NumPy reference on a small map in float32 and float64 (`agreement` in the report): the
largest difference of the forward and of each gradient, relative to the larger of 1 and
that output's largest magnitude. Writes
`gate_<backend>.json` and `GATE_<BACKEND>.md` into --output_dir. `benchmarks/gpu_jax.py`
runs `measure` on the device.
"""

import contextlib
import time

import numpy as np
from absl import app, flags

import common

FLAGS = flags.FLAGS


def define_flags():
    """This benchmark's flags (defined only when it runs: gpu_jax.py imports it)."""
    flags.DEFINE_float("width", 0.25, "ResNet-18 width multiplier: the shapes' channels.")
    flags.DEFINE_integer("batch_size", 128, "Batch size.")
    flags.DEFINE_list("dtypes", ["float32"], "Dtypes (float32, bfloat16, float16).")
    flags.DEFINE_integer("rounds", 5, "Rounds; each configuration runs `steps` calls a round.")
    flags.DEFINE_integer("steps", 5, "Timed calls per configuration and round.")
    flags.DEFINE_bool("jit_compile", False, "TensorFlow: compile with XLA.")
    flags.DEFINE_string("output_dir", None, "Where to write the reports.")


def shapes(width, batch_size):
    """ResNet-18's activation shapes (N, H, W, C) at `width`: 64w channels at 32x32, ..."""
    return [(batch_size, 32 // 2 ** i, 32 // 2 ** i, max(1, int(64 * 2 ** i * width)))
            for i in range(4)]


def configs():
    from sparta_tf import gate
    return ["relu", "silu"] + [f"sparta/{form}" for form in gate.FORMS]


def _function(name):
    """f(x, kernel, bias) of configuration `name`."""
    from keras import ops
    from sparta_tf import gate
    if name == "relu":
        return lambda x, kernel, bias: ops.relu(x)
    if name == "silu":
        return lambda x, kernel, bias: ops.silu(x)
    return lambda x, kernel, bias: gate.sparta_exact(x, kernel, bias, form=name.split("/")[1])


def _compiled(name, jit_compile=False):
    """A compiled `(x, kernel, bias, g) -> (f(x), d/dx, d/dkernel, d/dbias of sum(f(x) g))`."""
    import keras
    f = _function(name)
    if keras.backend.backend() == "jax":
        import jax

        def run(x, kernel, bias, g):
            y, back = jax.vjp(f, x, kernel, bias)
            return (y, *back(g))
        return jax.jit(run)
    import tensorflow as tf

    def run(x, kernel, bias, g):
        with tf.GradientTape() as tape:
            tape.watch([x, kernel, bias])
            y = f(x, kernel, bias)
        return (y, *tape.gradient(y, [x, kernel, bias], output_gradients=g))
    return tf.function(run, jit_compile=jit_compile)


def _inputs(shape, dtype, seed=0):
    import keras
    rng = np.random.default_rng(seed)
    c = shape[-1]
    arrays = (rng.normal(size=shape), rng.normal(size=(3, 3, c, 1)) / 3, rng.normal(size=c),
              rng.normal(size=shape))
    return [keras.ops.convert_to_tensor(a.astype(dtype)) for a in arrays]


def _numpy_reference(x, kernel, bias, g):
    """Sparta's forward and gradients in NumPy (float64), from docs/SPARTA.md's formulas."""
    k, (n, h, w, c) = kernel.shape[0], x.shape
    p = k // 2
    xp = np.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
    z = bias + sum(xp[:, i:i + h, j:j + w] * kernel[i, j, :, 0]
                   for i in range(k) for j in range(k))
    s = 1 / (1 + np.exp(-z))
    d = g * x * s * (1 - s)
    dp = np.pad(d, ((0, 0), (p, p), (p, p), (0, 0)))
    dx = g * s + sum(dp[:, 2 * p - i:2 * p - i + h, 2 * p - j:2 * p - j + w] * kernel[i, j, :, 0]
                     for i in range(k) for j in range(k))
    dk = np.stack([np.stack([(xp[:, i:i + h, j:j + w] * d).sum((0, 1, 2)) for j in range(k)])
                   for i in range(k)])[..., None]
    return x * s, dx, dk, d.sum((0, 1, 2))


def _gap(got, ref):
    """The largest difference of the forward and each gradient, each over the larger of 1 and
    its reference's largest magnitude (dL/dK and dL/db sum N x H x W terms)."""
    return max(float(np.max(np.abs(_numpy(a) - b)) / max(1.0, np.max(np.abs(b))))
               for a, b in zip(got, ref))


def _numpy(a):
    import keras
    return keras.ops.convert_to_numpy(a)


def agreement(timed_shapes):
    """{check: the largest difference of forward and gradients (`_gap`)}: every form against
    the first at each timed shape (float32), and against the NumPy reference on a small map
    in float32 and float64."""
    import keras
    from sparta_tf import gate
    out = {}
    for shape in timed_shapes:
        args = _inputs(shape, "float32")
        ref = [_numpy(t) for t in _compiled(f"sparta/{gate.FORMS[0]}")(*args)]
        for form in gate.FORMS[1:]:
            got = _compiled(f"sparta/{form}")(*args)
            out[f"{form} vs {gate.FORMS[0]}, {'x'.join(map(str, shape))}, float32"] = _gap(
                got, ref)
    wide = contextlib.nullcontext()
    if keras.backend.backend() == "jax":
        import jax
        wide = jax.enable_x64(True)  # JAX computes float64 only with x64 on
    with wide:
        for dtype in ("float32", "float64"):
            args = _inputs((2, 7, 6, 3), dtype)
            ref = _numpy_reference(*[keras.ops.convert_to_numpy(a).astype("float64")
                                     for a in args])
            for form in gate.FORMS:
                got = _compiled(f"sparta/{form}")(*args)
                out[f"{form} vs NumPy, 2x7x6x3, {dtype}"] = _gap(got, ref)
    return out


def measure(width, batch_size, dtypes, rounds, steps, jit_compile=False):
    """{"dtype/NxHxWxC": {"seconds": {config: spread}, "ratios": {...}}}: the configurations
    of each shape and dtype, compiled and warmed up, then taking turns for `rounds` rounds of
    `steps` calls."""
    import keras
    out = {}
    for dtype in dtypes:
        for shape in shapes(width, batch_size):
            args = _inputs(shape, dtype)
            runs = {name: _compiled(name, jit_compile) for name in configs()}
            for run in runs.values():  # compile, then one call
                keras.ops.convert_to_numpy(run(*args)[0])
            seconds = {name: [] for name in runs}
            for _ in range(rounds):
                for name, run in runs.items():
                    start = time.perf_counter()
                    for _ in range(steps):
                        result = run(*args)
                    keras.ops.convert_to_numpy(result[1])
                    seconds[name].append((time.perf_counter() - start) / steps)
            ratios = {f"{name} / {ref}": common.spread(
                [a / b for a, b in zip(seconds[name], seconds[ref])])
                for name in runs if name.startswith("sparta") for ref in ("relu", "silu")}
            out[f"{dtype}/{'x'.join(map(str, shape))}"] = {
                "seconds": {name: common.spread(s) for name, s in seconds.items()},
                "ratios": ratios}
    return out


def markdown(report):
    lines = [f"# Sparta's gate alone, by form of DW_k ({report['backend']}"
             f"{', XLA' if report.get('jit_compile') else ''})", "",
             f"Machine: {report['machine']}. Forward and the gradients to x, kernel and bias "
             f"of each activation, compiled; ResNet-18's shapes at width {report['width']}, "
             f"batch {report['batch_size']}; {report['rounds']} interleaved rounds of "
             f"{report['steps']} calls (`benchmarks/gate_forms.py`).", ""]
    return "\n".join(lines + tables(report["timings"], report["agreement"])) + "\n"


def tables(timings, agreement):
    """The Markdown lines of `measure`'s ratios and of `agreement`."""
    lines = ["| dtype/shape | ratio | median [min, max] |", "|---|---|---|"]
    for key, entry in timings.items():
        for name, r in entry["ratios"].items():
            lines.append(f"| {key} | {name} | {r['median']:.2f} [{r['min']:.2f}, "
                         f"{r['max']:.2f}] |")
    lines += ["", "| forms held to each other | largest difference (relative, `_gap`) |",
              "|---|---|"]
    return lines + [f"| {name} | {diff:.1e} |" for name, diff in agreement.items()]


def main(argv):
    del argv
    import keras
    backend = keras.backend.backend()
    if backend not in ("jax", "tensorflow"):
        raise app.UsageError(f"runs on JAX and TensorFlow; the backend is {backend}.")
    report = {"backend": backend, "machine": common.machine(), "width": FLAGS.width,
              "batch_size": FLAGS.batch_size, "rounds": FLAGS.rounds, "steps": FLAGS.steps,
              "jit_compile": FLAGS.jit_compile and backend == "tensorflow"}
    report["agreement"] = agreement(shapes(FLAGS.width, FLAGS.batch_size))
    report["timings"] = measure(FLAGS.width, FLAGS.batch_size, FLAGS.dtypes, FLAGS.rounds,
                                FLAGS.steps, report["jit_compile"])
    suffix = backend + ("_xla" if report["jit_compile"] else "")
    common.write(report, markdown(report), FLAGS.output_dir, f"gate_{suffix}.json",
                 f"GATE_{suffix.upper()}.md")


if __name__ == "__main__":
    define_flags()
    app.run(main)
