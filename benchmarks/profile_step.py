"""Where the time of the compiled AT step goes, by TensorFlow op type, per activation.

    python benchmarks/profile_step.py --output_dir=results/benchmarks/NAME

Traces `steps` calls of the compiled `AdversarialModel.train_step` (after a warm-up) with
`tf.profiler` for each activation, reads the trace (the XSpace protobuf that the profiler
writes) and sums the time of the ops that ran on TensorFlow's inter-op threads, by op
type. Ops of the two inter-op threads can overlap, so a column sums to more than the wall
time of a step; the columns compare with one another. Writes `profile.json` and
`PROFILE.md`.
"""

import collections
import glob
import os
import sys
import tempfile

from absl import app, flags

import common

flags.DEFINE_list("activations", ["relu", "sparta"],
                  "Activations to profile (sparta_autodiff: Sparta without its custom gradient).")
flags.DEFINE_float("width_multiplier", 0.25, "ResNet-18 width multiplier.")
common.define_step_flags(rounds=False, steps_help="Traced steps per activation.")
flags.DEFINE_integer("top", 14, "Op types shown in the table.")
flags.DEFINE_string("output_dir", None, "Where to write profile.json and PROFILE.md.")
FLAGS = flags.FLAGS
# Events that enclose the ops of a function call rather than being ops of their own.
ENCLOSING = ("Process",)


def _ms_by_op_type(logdir):
    """{op type: milliseconds} summed over the ops of the inter-op threads of the trace."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2
    space = xplane_pb2.XSpace()
    with open(glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True)[-1],
              "rb") as f:
        space.ParseFromString(f.read())
    host = next(p for p in space.planes if p.name == "/host:CPU")
    totals = collections.Counter()
    for line in host.lines:
        if not line.name.startswith("tf_Compute"):
            continue
        for event in line.events:
            name = host.event_metadata[event.metadata_id].name
            op_type = name.rsplit(":", 1)[1] if ":" in name else None  # "scope/op:OpType"
            if op_type not in (None, *ENCLOSING):
                totals[op_type] += event.duration_ps / 1e9
    return totals


def _profile(activation):
    import keras
    import tensorflow as tf
    model = common.at_model(activation, FLAGS.width_multiplier, FLAGS.pgd_steps)
    step, batch = common.compiled_step(model), common.tf_batch(FLAGS.batch_size)
    for _ in range(2):
        keras.ops.convert_to_numpy(step(batch)["loss"])
    with tempfile.TemporaryDirectory() as logdir:
        tf.profiler.experimental.start(logdir)
        for _ in range(FLAGS.steps):
            keras.ops.convert_to_numpy(step(batch)["loss"])
        tf.profiler.experimental.stop()
        totals = _ms_by_op_type(logdir)
    return {op: ms / FLAGS.steps for op, ms in totals.items()}


def _markdown(report):
    names = list(report["ms_per_step"])
    per = {n: {op: ms for op, ms in p.items() if op not in ENCLOSING}
           for n, p in report["ms_per_step"].items()}
    ops = sorted({op for p in per.values() for op in p},
                 key=lambda op: -max(p.get(op, 0) for p in per.values()))
    lines = [f"# Where the AT step's time goes, by op type: {report['machine']}", "",
             f"Command: `{report['command']}`. {report['model']} x{report['width']}, batch "
             f"{report['batch_size']}, PGD-{report['pgd_steps']} AT, milliseconds per step "
             f"summed over the ops of TensorFlow's inter-op threads (`tf.profiler`, "
             f"{report['steps']} steps).", "",
             "| op type | " + " | ".join(names) + " |",
             "| --- | " + " | ".join("---:" for _ in names) + " |"]
    for op in ops[:report["top"]]:
        lines.append(f"| {op} | " + " | ".join(f"{per[n].get(op, 0):.1f}" for n in names)
                     + " |")
    rest = {n: sum(v for op, v in per[n].items() if op not in ops[:report["top"]])
            for n in names}
    lines.append("| (other) | " + " | ".join(f"{rest[n]:.1f}" for n in names) + " |")
    lines.append("| **all ops** | " + " | ".join(f"**{sum(per[n].values()):.1f}**"
                                                  for n in names) + " |")
    return "\n".join(lines) + "\n"


def main(argv):
    del argv
    report = {"machine": common.machine(), "model": FLAGS.model,
              "command": " ".join(["python", *sys.argv]),
              "width": FLAGS.width_multiplier, "batch_size": FLAGS.batch_size,
              "pgd_steps": FLAGS.pgd_steps, "steps": FLAGS.steps, "top": FLAGS.top,
              "ms_per_step": {a: _profile(a) for a in FLAGS.activations}}
    common.write(report, _markdown(report), FLAGS.output_dir, "profile.json", "PROFILE.md")


if __name__ == "__main__":
    app.run(main)
