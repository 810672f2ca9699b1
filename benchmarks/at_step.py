"""What the adversarial-training step costs: one command, one machine, interleaved rounds.

    python benchmarks/at_step.py --output_dir=results/benchmarks/NAME

Times the compiled train step of `adversarial.AdversarialModel` (its `train_step` in one
`tf.function`, the same batch every call, after a warm-up) for each configuration below. The
configurations take turns, round after round, so that a slow spell of the machine falls on
all of them; each figure is the median over rounds, with the min and max, and every ratio is
taken within a round. Writes `benchmark.json` and `BENCHMARKS.md` (the machine named).

- `at/<activation>/w<width>`: the PGD-K AT step for relu, silu and sparta at each width,
  and `sparta_autodiff` (the same Sparta differentiated by autodiff, not its exact custom
  gradient);
- `standard/<activation>/w<width>`: the standard step, for the AT efficiency
  `(K + 1) t(standard) / t(PGD-K AT)`: 1 if an attack step cost as much as a training
  step; an attack step needs no weight gradients, so about 1.33 is the ideal at K = 3;
- `jit/<activation>/w<first width>`: the AT step compiled with XLA (`--nojit`: not), for
  relu, sparta (under XLA its "auto" gate is the shifted form) and `sparta_depthwise` (the
  depthwise form forced, as "auto" was under XLA before issue 41);
- `eager_cleverhans/<activation>/w<first width>`: an eager loop that attacks each batch with
  cleverhans's `projected_gradient_descent` and then takes an eager gradient step: what the
  compiled step replaces;
- end to end: `sparta-train`'s own img/s (`training.run`, 3 epochs of 16 batches of the
  bundled sample, the median of epochs 2 and 3, so no tracing) against its compiled
  step's, timed right after it, in a fresh process;
- memory: each of sparta and sparta_autodiff at the first width in a fresh process, the
  most that TensorFlow's allocator held during one step (GPU or CPU), and the peak
  resident memory.

`benchmarks/profile_step.py` says where a step's time goes, op type by op type.
"""

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app, flags

import common

flags.DEFINE_list("activations", ["relu", "silu", "sparta"], "Activations of the AT step.")
flags.DEFINE_list("widths", ["0.25", "1.0"], "ResNet-18 width multipliers.")
common.define_step_flags()
flags.DEFINE_string("mixed_precision", "float32", "Keras dtype policy.")
flags.DEFINE_bool("end_to_end", True, "Also time sparta-train's own loop.")
flags.DEFINE_bool("jit", True, "Also time the step compiled with XLA (`jit/...`).")
flags.DEFINE_string("output_dir", None, "Where to write benchmark.json and BENCHMARKS.md.")
flags.DEFINE_string("memory_of", None, "Internal: measure this configuration's memory.")
flags.DEFINE_bool("end_to_end_only", False, "Internal: measure the end-to-end figures.")
FLAGS = flags.FLAGS


def _model(activation, width, objective="pgd", jit=False):
    return common.at_model(activation, width, FLAGS.pgd_steps, objective, jit)


def _eager_cleverhans_step(model):
    """Attack with cleverhans's PGD, eagerly, then one eager SGD step: the slow way."""
    import numpy as np
    import tensorflow as tf
    from cleverhans.tf2.attacks.projected_gradient_descent import projected_gradient_descent
    eps = 8 / 255

    def step(batch):
        x, y = batch
        x_adv = projected_gradient_descent(
            lambda v: model.model(v, training=False), x, eps, 2.5 * eps / FLAGS.pgd_steps,
            FLAGS.pgd_steps, np.inf, clip_min=0.0, clip_max=1.0, y=y, rand_init=True,
            sanity_checks=False)
        with tf.GradientTape() as tape:
            logits = model.model(x_adv, training=True)
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits))
        variables = model.model.trainable_variables
        model.optimizer.apply(tape.gradient(loss, variables), variables)
        return {"loss": loss}

    return step


def _configurations():
    """{name: a step function of one batch}."""
    configs = {}
    for width in map(float, FLAGS.widths):
        for activation in [*FLAGS.activations, "sparta_autodiff"]:
            configs[f"at/{activation}/w{width:g}"] = common.compiled_step(_model(activation, width))
        for activation in ("relu", "sparta"):
            configs[f"standard/{activation}/w{width:g}"] = common.compiled_step(
                _model(activation, width, "standard"))
    width = float(FLAGS.widths[0])
    for activation in ("relu", "sparta", "sparta_depthwise") if FLAGS.jit else ():
        configs[f"jit/{activation}/w{width:g}"] = common.compiled_step(
            _model(activation, width, jit=True), jit=True)
    for activation in ("relu", "sparta"):
        configs[f"eager_cleverhans/{activation}/w{width:g}"] = _eager_cleverhans_step(
            _model(activation, width))
    return configs


def _time(configs):
    """{name: [seconds per step, one per round]}, interleaved."""
    return common.interleaved_seconds(configs, common.tf_batch(FLAGS.batch_size), FLAGS.rounds,
                                      FLAGS.steps)


def _ratios(seconds, a, b, scale=1.0):
    """scale * t(a) / t(b), round by round."""
    return common.spread([scale * x / y for x, y in zip(seconds[a], seconds[b])])


def _end_to_end():
    """`_measure_end_to_end` in a fresh process, as `sparta-train` runs."""
    out = subprocess.run([sys.executable, __file__, "--end_to_end_only",
                          *[a for a in sys.argv[1:] if not a.startswith("--output_dir")]],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _measure_end_to_end(width, batches=16):
    """sparta-train's own img/s (`training.run`: sparta, the bundled sample, epochs 2 and 3,
    so no tracing) and, right after it in the same process, its compiled step's img/s over
    as many steps in a row: the cost of the input pipeline and the callbacks."""
    import keras
    from sparta_tf import training
    with tempfile.TemporaryDirectory() as model_dir:
        config = training.TrainConfig(
            model_dir=model_dir, model=FLAGS.model, width_multiplier=width,
            batch_size=FLAGS.batch_size,
            max_train=min(FLAGS.batch_size * batches, 5000),  # the bundled sample's 5,000
            max_test=10, epochs=3, eval_pgd_steps=0,
            pgd_steps=FLAGS.pgd_steps, checkpoint_every=0, mixed_precision=FLAGS.mixed_precision)
        training.run(config, verbose=0)
        with open(os.path.join(model_dir, "metrics.jsonl")) as f:
            train = statistics.median(json.loads(line)["img/s"] for line in list(f)[1:])
    step, batch = common.compiled_step(_model("sparta", width)), common.tf_batch(FLAGS.batch_size)
    for _ in range(2):
        keras.ops.convert_to_numpy(step(batch)["loss"])
    start = time.perf_counter()
    for _ in range(batches):
        keras.ops.convert_to_numpy(step(batch)["loss"])
    step_img_s = batches * FLAGS.batch_size / (time.perf_counter() - start)
    print(json.dumps({"train_img_s": train, "step_img_s": step_img_s,
                      "fraction": train / step_img_s}))


def _memory(name):
    """Peak memory of `name` (e.g. at/sparta/w0.25) after a few steps, in a fresh process."""
    out = subprocess.run([sys.executable, __file__, f"--memory_of={name}",
                          *[a for a in sys.argv[1:] if not a.startswith("--output_dir")]],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _measure_memory(name):
    """The most memory that TensorFlow's allocator held during one step, above what it held
    before it (weights, optimizer slots and the batch): mostly what the forward passes keep
    for the backward. On the CPU too (`tf.config.experimental.get_memory_info`)."""
    import keras
    import tensorflow as tf
    _, activation, width = name.split("/")
    step = common.compiled_step(_model(activation, float(width[1:])))
    device = "GPU:0" if tf.config.list_physical_devices("GPU") else "CPU:0"
    batch = common.tf_batch(FLAGS.batch_size)
    for _ in range(2):
        keras.ops.convert_to_numpy(step(batch)["loss"])
    tf.config.experimental.reset_memory_stats(device)
    before = tf.config.experimental.get_memory_info(device)["current"]
    keras.ops.convert_to_numpy(step(batch)["loss"])
    peak = tf.config.experimental.get_memory_info(device)["peak"]
    print(json.dumps({"device": device, "step_peak_mib": (peak - before) / 2**20,
                      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def _markdown(report):
    lines = [f"# The adversarial-training step: {report['machine']}", "",
             f"Command: `{report['command']}`. {report['model']}, batch {report['batch_size']}, "
             f"PGD-{report['pgd_steps']} AT, {report['mixed_precision']}; {report['rounds']} "
             f"interleaved rounds of {report['steps']} steps; median (min to max) over rounds.",
             "", "| configuration | s/step | img/s |", "| --- | ---: | ---: |"]
    for name, s in report["seconds_per_step"].items():
        lines.append(f"| {name} | {s['median']:.3f} ({s['min']:.3f} to {s['max']:.3f}) | "
                     f"{report['batch_size'] / s['median']:.1f} |")
    lines += ["", "| ratio | median | min | max |", "| --- | ---: | ---: | ---: |"]
    for name, r in report["ratios"].items():
        lines.append(f"| {name} | {r['median']:.2f} | {r['min']:.2f} | {r['max']:.2f} |")
    if report.get("end_to_end"):
        e = report["end_to_end"]
        lines += ["", f"End to end: `sparta-train` ran at {e['train_img_s']:.1f} img/s "
                      f"(epochs 2 and 3), its compiled step alone, right after, at "
                      f"{e['step_img_s']:.1f} img/s: {e['fraction']:.2f} of the step."]
    if report.get("memory"):
        lines += ["", "Memory, each in a fresh process: the most that TensorFlow's allocator "
                      "held during one step above what it held before it (mostly what the "
                      "forward passes keep for the backward), and the process's peak "
                      "resident memory.", "",
                  "| memory | device | step peak (MiB) | peak resident (MiB) |",
                  "| --- | --- | ---: | ---: |"]
        for name, m in report["memory"].items():
            lines.append(f"| {name} | {m['device']} | {m['step_peak_mib']:.1f} | "
                         f"{m['peak_rss_mib']:.0f} |")
        first = list(report["memory"].values())
        if len(first) == 2 and first[1]["step_peak_mib"] > 0:
            lines.append(f"\nCustom gradient / autodiff, step peak: "
                         f"{first[0]['step_peak_mib'] / first[1]['step_peak_mib']:.2f}.")
    return "\n".join(lines) + "\n"


def main(argv):
    del argv
    import keras
    keras.config.set_dtype_policy(FLAGS.mixed_precision)
    if FLAGS.memory_of:
        return _measure_memory(FLAGS.memory_of)
    if FLAGS.end_to_end_only:
        return _measure_end_to_end(float(FLAGS.widths[0]))
    seconds = _time(_configurations())
    k, first = FLAGS.pgd_steps, f"w{float(FLAGS.widths[0]):g}"
    ratios = {}
    for width in (f"w{float(w):g}" for w in FLAGS.widths):
        ratios[f"sparta / relu, AT, {width}"] = _ratios(seconds, f"at/sparta/{width}",
                                                        f"at/relu/{width}")
        ratios[f"custom gradient / autodiff, AT, {width}"] = _ratios(
            seconds, f"at/sparta/{width}", f"at/sparta_autodiff/{width}")
        for activation in ("relu", "sparta"):
            ratios[f"AT efficiency (K+1) t(standard) / t(AT), {activation}, {width}"] = _ratios(
                seconds, f"standard/{activation}/{width}", f"at/{activation}/{width}", k + 1)
    for activation in ("relu", "sparta"):
        ratios[f"eager cleverhans loop / compiled, {activation}, {first}"] = _ratios(
            seconds, f"eager_cleverhans/{activation}/{first}", f"at/{activation}/{first}")
        if FLAGS.jit:
            ratios[f"XLA / no XLA, {activation}, {first}"] = _ratios(
                seconds, f"jit/{activation}/{first}", f"at/{activation}/{first}")
    if FLAGS.jit:
        ratios[f"XLA: sparta / relu, {first}"] = _ratios(
            seconds, f"jit/sparta/{first}", f"jit/relu/{first}")
        ratios[f"XLA: sparta (shifted) / sparta_depthwise, {first}"] = _ratios(
            seconds, f"jit/sparta/{first}", f"jit/sparta_depthwise/{first}")
    report = {"machine": common.machine(), "model": FLAGS.model,
              "command": " ".join(["python", *sys.argv]),
              "batch_size": FLAGS.batch_size, "pgd_steps": k, "rounds": FLAGS.rounds,
              "steps": FLAGS.steps, "mixed_precision": FLAGS.mixed_precision,
              "seconds_per_step": {n: common.spread(s) for n, s in seconds.items()},
              "ratios": ratios,
              "memory": {n: _memory(n) for n in (f"at/sparta/{first}",
                                                 f"at/sparta_autodiff/{first}")}}
    if FLAGS.end_to_end:
        report["end_to_end"] = _end_to_end()
    common.write(report, _markdown(report), FLAGS.output_dir, "benchmark.json", "BENCHMARKS.md")


if __name__ == "__main__":
    app.run(main)
