"""The AT step on TensorFlow against JAX: one machine, the same configuration, interleaved.

    python benchmarks/backends.py --output_dir=results/benchmarks/NAME

Keras picks its backend once per process, so two worker processes hold the compiled PGD-K
AT step of `adversarial.AdversarialModel` (ResNet-18, each activation, the same batch every
call, after a warm-up): on TensorFlow its `train_step` in one `tf.function`, on JAX its
stateless `train_step` under `jax.jit` (as sparta-train runs them). This process asks them
in turn to time `--steps` steps, configuration after configuration, round after round, so
that a slow spell of the machine falls on all of them. Each figure is the median over
rounds (with min and max); every ratio is taken within a round. Writes `backends.json` and
`BACKENDS.md`.

    python benchmarks/backends.py --before=PATH/TO/AN/OLDER/CHECKOUT --output_dir=...

also times the step of the sparta_tf of that checkout (`name@before`), in two more workers
interleaved with these, and gives each step's time after / before.
"""

import os
import subprocess
import sys
import time

from absl import app, flags

import common

flags.DEFINE_list("activations", ["relu", "sparta"], "Activations of the AT step.")
flags.DEFINE_float("width", 0.25, "ResNet-18 width multiplier.")
common.define_step_flags()
flags.DEFINE_string("output_dir", None, "Where to write backends.json and BACKENDS.md.")
flags.DEFINE_bool("worker", False, "Internal: serve timings on this process's backend.")
flags.DEFINE_string("before", None, "An older checkout whose sparta_tf's step is timed too.")
FLAGS = flags.FLAGS
BACKENDS = ("tensorflow", "jax")


def _steps():
    """{activation: a function running one AT step} on this process's backend."""
    import keras
    x, y = common.batch(FLAGS.batch_size)
    steps = {}
    for activation in FLAGS.activations:
        model = common.at_model(activation, FLAGS.width, FLAGS.pgd_steps)
        steps[activation] = (_jax_step if keras.backend.backend() == "jax" else _tf_step)(
            model, x, y)
    return steps


def _tf_step(model, x, y):
    import tensorflow as tf
    step, batch = common.compiled_step(model), (tf.constant(x), tf.constant(y))
    return lambda: float(step(batch)["loss"])


def _jax_step(model, x, y):
    import jax
    from sparta_tf.backend import jax_trainer
    model(x[:1])  # built, as training.run does
    if hasattr(jax_trainer, "train_state"):
        step, holder = jax_trainer.compiled_step(model), [jax_trainer.train_state(model)]
    else:  # a checkout of --before, whose jax_trainer kept the step's state privately
        step = jax.jit(model.train_step, donate_argnums=0)
        holder = [jax_trainer._state(model)]  # pylint: disable=protected-access

    def run():
        logs, holder[0] = step(holder[0], (x, y))
        return float(logs["loss"])
    return run


def _serve():
    """The worker: reads `ACTIVATION N` lines, answers with the seconds of N steps."""
    steps = _steps()
    for run in steps.values():  # warm-up: compile, and a step after it
        run()
        run()
    print("ready", flush=True)
    for line in sys.stdin:
        activation, n = line.split()
        start = time.perf_counter()
        for _ in range(int(n)):
            run = steps[activation]
            run()  # float(): waits for the step's result
        print(time.perf_counter() - start, flush=True)


def _start(backend, tree=None):
    """A worker on `backend`, with the sparta_tf of checkout `tree` (None: this one)."""
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="2")
    if tree:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (tree, env.get("PYTHONPATH")) if p)
    args = [a for a in sys.argv[1:] if not a.startswith(("--output_dir", "--before"))]
    proc = subprocess.Popen([sys.executable, __file__, "--worker", *args], env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    while proc.stdout.readline().strip() != "ready":
        if proc.poll() is not None:
            raise RuntimeError(f"the {backend} worker failed to start")
    return proc


def main(argv):
    del argv
    if FLAGS.worker:
        return _serve()
    workers = {backend: _start(backend) for backend in BACKENDS}
    if FLAGS.before:
        workers.update({f"{b}@before": _start(b, FLAGS.before) for b in BACKENDS})
    rounds = []
    for _ in range(FLAGS.rounds):
        timing = {}
        for activation in FLAGS.activations:
            for backend, proc in workers.items():
                proc.stdin.write(f"{activation} {FLAGS.steps}\n")
                proc.stdin.flush()
                timing[f"{backend}/{activation}"] = float(proc.stdout.readline()) / FLAGS.steps
        rounds.append(timing)
    for proc in workers.values():
        proc.stdin.close()
        proc.wait()
    seconds = {k: common.spread([r[k] for r in rounds]) for k in rounds[0]}
    ratios = {}
    for activation in FLAGS.activations:
        ratios[f"jax / tensorflow, {activation}"] = common.spread(
            [r[f"jax/{activation}"] / r[f"tensorflow/{activation}"] for r in rounds])
    for backend in BACKENDS if FLAGS.before else ():
        for activation in FLAGS.activations:
            ratios[f"after / before, {backend}, {activation}"] = common.spread(
                [r[f"{backend}/{activation}"] / r[f"{backend}@before/{activation}"]
                 for r in rounds])
    for backend in BACKENDS:
        for activation in FLAGS.activations[1:]:
            ratios[f"{activation} / {FLAGS.activations[0]}, {backend}"] = common.spread(
                [r[f"{backend}/{activation}"] / r[f"{backend}/{FLAGS.activations[0]}"]
                 for r in rounds])
    report = {"machine": common.machine(), "model": FLAGS.model, "batch_size": FLAGS.batch_size,
              "pgd_steps": FLAGS.pgd_steps, "width": FLAGS.width, "rounds": FLAGS.rounds,
              "steps": FLAGS.steps, "seconds_per_step": seconds, "ratios": ratios}
    common.write(report, _markdown(report), FLAGS.output_dir, "backends.json", "BACKENDS.md")


def _markdown(report):
    lines = [f"# The PGD-{report['pgd_steps']} AT step: TensorFlow against JAX", "",
             f"Machine: {report['machine']}. {report['model']} at width {report['width']}, batch "
             f"{report['batch_size']}, float32; {report['rounds']} interleaved rounds of "
             f"{report['steps']} steps each (`benchmarks/backends.py`).", "",
             "| step | img/s (median) | s/step median [min, max] |", "|---|---|---|"]
    for name, s in report["seconds_per_step"].items():
        lines.append(f"| {name} | {report['batch_size'] / s['median']:.0f} | "
                     f"{s['median']:.3f} [{s['min']:.3f}, {s['max']:.3f}] |")
    lines += ["", "| ratio of step times | median [min, max] |", "|---|---|"]
    for name, r in report["ratios"].items():
        lines.append(f"| {name} | {r['median']:.2f} [{r['min']:.2f}, {r['max']:.2f}] |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    app.run(main)
