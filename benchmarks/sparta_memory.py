"""What Sparta's custom gradient saves and costs against autodiff, on the current backend.

    KERAS_BACKEND=tensorflow python benchmarks/sparta_memory.py --output_dir=results/benchmarks/sparta_memory
    KERAS_BACKEND=jax python benchmarks/sparta_memory.py --output_dir=results/benchmarks/sparta_memory

Two configurations of ResNet-18 with Sparta (`--width`, batch `--batch_size`, 32x32 pixels):
`custom` (`use_custom_gradient=True`, `layers.sparta_exact`) and `autodiff` (`False`,
autodiff of `layers.sparta_forward`), with the same weights. Two workloads, each one
compiled function (`tf.function` on TensorFlow, `jax.jit` on JAX):

- `step`: the loss in training mode and its gradients to every trainable weight (one
  forward and backward);
- `at`: the adversarial-training step: PGD-K at 8/255 on the input (the model in inference
  mode, as `sparta_tf.attacks.PGD` runs it), then `step` on the adversarial batch.

Memory: on TensorFlow, the most that its CPU allocator held during one call above what it
held before (`tf.config.experimental.get_memory_info("CPU:0")`; where that is not
available, the peak resident memory of a fresh process per configuration); on JAX, the
compiled function's `memory_analysis().temp_size_in_bytes` (XLA's exact buffer plan, which
does not vary between runs). Time: the configurations take turns, round after round (`--rounds`
of `--steps` calls each, after a warm-up), so that a slow spell of the machine falls on both;
each figure is the median over rounds with its min and max, and each ratio custom /
autodiff is taken within a round. Writes `<backend>.json` and `<backend>.md` into
`--output_dir`.
"""

import json
import os
import resource
import subprocess
import sys
import time

# TensorFlow's CPU allocator keeps the statistics that get_memory_info reads only when it
# is the BFC allocator; this asks for it (before TensorFlow is imported).
os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")

from absl import app, flags  # pylint: disable=wrong-import-position

import common  # pylint: disable=wrong-import-position

flags.DEFINE_float("width", 0.25, "ResNet-18 width multiplier.")
common.define_step_flags(steps_help="Timed calls per configuration and round.")
flags.DEFINE_list("workloads", ["step", "at"], "Workloads: step, at.")
flags.DEFINE_string("output_dir", None, "Where to write <backend>.json and <backend>.md.")
flags.DEFINE_string("memory_of", None, "Internal: WORKLOAD/CONFIG, peak RSS in this process.")
FLAGS = flags.FLAGS

CONFIGS = ("custom", "autodiff")
EPS = 8 / 255
TARGETS = {"memory": 0.8, "time": 1.05}  # custom / autodiff, at most


def _backend():
    import keras
    return keras.backend.backend()


def _model(config):
    import keras
    from sparta_tf import models
    keras.utils.set_random_seed(0)
    return models.build(FLAGS.model, 10, "sparta", FLAGS.width,
                        activation_kwargs={"use_custom_gradient": config == "custom"})


def _tensorflow_workloads(model, x, y):
    """{workload: (run, memory)}: `run()` makes one call; `memory()` makes one and returns
    the allocator's peak above what it held before, in bytes (None where unavailable)."""
    import keras
    import tensorflow as tf
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    alpha = 2.5 * EPS / FLAGS.pgd_steps

    def step(x, y):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        return tape.gradient(loss, model.trainable_variables)

    def at(x, y):
        x_adv = x
        for _ in range(FLAGS.pgd_steps):
            with tf.GradientTape() as tape:
                tape.watch(x_adv)
                loss = loss_fn(y, model(x_adv, training=False))
            x_adv = x_adv + alpha * tf.sign(tape.gradient(loss, x_adv))
            x_adv = tf.clip_by_value(tf.clip_by_value(x_adv, x - EPS, x + EPS), 0.0, 1.0)
        return step(x_adv, y)

    x, y = tf.constant(x), tf.constant(y)
    out = {}
    for name, fn in (("step", step), ("at", at)):
        compiled = tf.function(fn)

        def run(compiled=compiled):
            return [g.numpy() for g in compiled(x, y)]

        def memory(run=run):
            try:
                tf.config.experimental.reset_memory_stats("CPU:0")
                before = tf.config.experimental.get_memory_info("CPU:0")["current"]
                run()
                return tf.config.experimental.get_memory_info("CPU:0")["peak"] - before
            except (ValueError, RuntimeError):
                return None
        out[name] = (run, memory)
    return out


def _jax_workloads(model, x, y):
    """As `_tensorflow_workloads`, each workload one `jax.jit` function compiled ahead."""
    import jax
    import jax.numpy as jnp
    import keras
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    alpha = 2.5 * EPS / FLAGS.pgd_steps
    trainable = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]

    def loss(trainable, non_trainable, x, y, training):
        logits, updated = model.stateless_call(trainable, non_trainable, x, training=training)
        return loss_fn(y, logits), updated

    def step(trainable, non_trainable, x, y):
        grad = jax.grad(lambda t: loss(t, non_trainable, x, y, True), has_aux=True)
        return grad(trainable)

    def at(trainable, non_trainable, x, y):
        x_adv = x
        for _ in range(FLAGS.pgd_steps):
            g = jax.grad(lambda v: loss(trainable, non_trainable, v, y, False)[0])(x_adv)
            x_adv = jnp.clip(jnp.clip(x_adv + alpha * jnp.sign(g), x - EPS, x + EPS), 0, 1)
        return step(trainable, non_trainable, x_adv, y)

    out = {}
    for name, fn in (("step", step), ("at", at)):
        compiled = jax.jit(fn).lower(trainable, non_trainable, x, y).compile()
        temp = compiled.memory_analysis().temp_size_in_bytes

        def run(compiled=compiled):
            return jax.block_until_ready(compiled(trainable, non_trainable, x, y))

        def memory(run=run, temp=temp):
            run()
            return temp
        out[name] = (run, memory)
    return out


def _workloads(config):
    x, y = common.batch(FLAGS.batch_size)
    model = _model(config)
    if _backend() == "jax":
        return _jax_workloads(model, x, y)
    if _backend() == "tensorflow":
        return _tensorflow_workloads(model, x, y)
    raise SystemExit(f"benchmarks/sparta_memory.py runs on TensorFlow and JAX; the backend "
                     f"is {_backend()}.")


def _peak_rss(name):
    """Peak resident memory (bytes) of a fresh process that runs `name` (WORKLOAD/CONFIG)."""
    out = subprocess.run(
        [sys.executable, __file__, f"--memory_of={name}", f"--width={FLAGS.width}",
         f"--batch_size={FLAGS.batch_size}", f"--pgd_steps={FLAGS.pgd_steps}"],
        capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_rss"]


def _ratios(a, b):
    """Custom / autodiff within each round; None where autodiff's figure is 0 (TensorFlow's
    allocator reports 0 for the small tensors of tiny sizes)."""
    return None if 0 in b else common.spread([x / y for x, y in zip(a, b)])


def _measure():
    workloads = {config: _workloads(config) for config in CONFIGS}
    names = [w for w in FLAGS.workloads if w in ("step", "at")]
    seconds = {(w, c): [] for w in names for c in CONFIGS}
    memory = {(w, c): [] for w in names for c in CONFIGS}
    for w in names:  # warm-up: trace, compile, first run
        for c in CONFIGS:
            workloads[c][w][0]()
    for _ in range(FLAGS.rounds):
        for w in names:
            for c in CONFIGS:
                run, mem = workloads[c][w]
                memory[w, c].append(mem())
                start = time.perf_counter()
                for _ in range(FLAGS.steps):
                    run()
                seconds[w, c].append((time.perf_counter() - start) / FLAGS.steps)
    report = {}
    for w in names:
        entry = {}
        if any(m is None for c in CONFIGS for m in memory[w, c]):
            kind = "peak resident memory of a fresh process (resource.getrusage)"
            for c in CONFIGS:
                memory[w, c] = [_peak_rss(f"{w}/{c}")]
        else:
            kind = ("XLA memory_analysis().temp_size_in_bytes" if _backend() == "jax" else
                    "tf.config.experimental.get_memory_info('CPU:0'): peak during one call "
                    "above what was held before")
        for c in CONFIGS:
            entry[c] = {"memory_mib": common.spread([m / 2 ** 20 for m in memory[w, c]]),
                        "seconds": common.spread(seconds[w, c])}
        entry["memory_measure"] = kind
        entry["memory_ratio"] = _ratios(memory[w, "custom"], memory[w, "autodiff"])
        entry["time_ratio"] = _ratios(seconds[w, "custom"], seconds[w, "autodiff"])
        report[w] = entry
    return report


def _markdown(report):
    titles = {"step": "forward and backward",
              "at": f"AT step (PGD-{report['pgd_steps']} + forward and backward)"}
    lines = [f"# Sparta: custom gradient against autodiff ({report['backend']})", "",
             f"`{report['command']}`", "",
             f"Machine: {report['machine']}. Keras {report['keras']}, {report['backend']} "
             f"{report['backend_version']}. {report['model']} with Sparta at width "
             f"{report['width']}, batch {report['batch_size']}, 32x32, float32; {report['rounds']} rounds of "
             f"{report['steps']} calls per configuration, taking turns. Figures: median "
             f"(min to max) over rounds; ratios custom / autodiff taken within a round. "
             f"Targets: memory at most {TARGETS['memory']}, time at most {TARGETS['time']}.",
             "",
             "| workload | memory custom / autodiff (MiB) | memory ratio | time custom / "
             "autodiff (s) | time ratio |",
             "| --- | --- | --- | --- | --- |"]

    def fmt(s, digits=2):
        if s is None:
            return "n/a"
        if s["min"] == s["max"]:
            return f"{s['median']:.{digits}f}"
        return f"{s['median']:.{digits}f} ({s['min']:.{digits}f} to {s['max']:.{digits}f})"
    for w, e in report["workloads"].items():
        met = {k: "n/a" if e[f"{k}_ratio"] is None else
               "met" if e[f"{k}_ratio"]["median"] <= TARGETS[k] else "missed"
               for k in TARGETS}
        lines.append(
            f"| {titles[w]} | {e['custom']['memory_mib']['median']:.0f} / "
            f"{e['autodiff']['memory_mib']['median']:.0f} | {fmt(e['memory_ratio'])} "
            f"({met['memory']}) | {e['custom']['seconds']['median']:.3f} / "
            f"{e['autodiff']['seconds']['median']:.3f} | {fmt(e['time_ratio'])} "
            f"({met['time']}) |")
    kinds = {e["memory_measure"] for e in report["workloads"].values()}
    lines += ["", "Memory: " + "; ".join(sorted(kinds)) + ".", ""]
    return "\n".join(lines)


def main(argv):
    del argv
    import keras
    if FLAGS.memory_of:
        workload, config = FLAGS.memory_of.split("/")
        run, _ = _workloads(config)[workload]
        run()
        run()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
        print(json.dumps({"peak_rss": peak}))
        return
    backend = _backend()
    version = __import__({"tensorflow": "tensorflow", "jax": "jax"}.get(backend, backend))
    report = {
        "backend": backend, "backend_version": getattr(version, "__version__", "?"),
        "keras": keras.__version__, "machine": common.machine(),
        "command": f"KERAS_BACKEND={backend} python benchmarks/sparta_memory.py "
                   + " ".join(a for a in sys.argv[1:]),
        "model": FLAGS.model, "width": FLAGS.width, "batch_size": FLAGS.batch_size, "pgd_steps": FLAGS.pgd_steps,
        "rounds": FLAGS.rounds, "steps": FLAGS.steps, "targets": TARGETS,
    }
    report["workloads"] = _measure()
    common.write(report, _markdown(report), FLAGS.output_dir, f"{backend}.json",
                 f"{backend}.md")


if __name__ == "__main__":
    app.run(main)
