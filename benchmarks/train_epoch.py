"""sparta-train end to end, epoch by epoch, on TensorFlow and JAX: this checkout against an
older one (`--before`), interleaved on one machine.

    python benchmarks/train_epoch.py --before=PATH/TO/AN/OLDER/CHECKOUT \
        --output_dir=results/benchmarks/NAME

(`--after` names another checkout to be the newer one.)
Each round runs sparta-train (`python -m trainers.train`, from each checkout's own folder)
once per backend and checkout, in turn, so that a slow spell of the machine falls on all:
`--epochs` epochs of PGD-`--pgd_steps` AT of ResNet-18 at `--width` on `--max_train` bundled
images, no checkpoint within an epoch. A run's figure is the img/s of its epochs after the
first (which compiles), as its metrics.jsonl gives them: what a user sees, the step and
the trainer's own work around it (Keras's `fit` in this checkout; in an older one, whatever
loop it had). Medians over rounds (min and max); the ratio after / before is taken within a
round. Writes `train_epoch.json` and `TRAIN_EPOCH.md`.
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile

from absl import app, flags

import common

flags.DEFINE_string("before", None, "The older checkout (required).")
flags.DEFINE_string("after", None, "The newer checkout (default: this one).")
flags.DEFINE_float("width", 0.25, "ResNet-18 width multiplier.")
flags.DEFINE_integer("batch_size", 128, "Batch size.")
flags.DEFINE_integer("pgd_steps", 3, "K, the PGD steps of AT.")
flags.DEFINE_integer("max_train", 1024, "Training images (bundled).")
flags.DEFINE_integer("epochs", 3, "Epochs per run; the first is not counted.")
flags.DEFINE_integer("rounds", 2, "Rounds; each backend and checkout runs once a round.")
flags.DEFINE_string("output_dir", None, "Where to write the reports.")
FLAGS = flags.FLAGS
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BACKENDS = ("tensorflow", "jax")


def _epochs_img_s(tree, backend):
    """The img/s of each epoch after the first of one sparta-train run from `tree`."""
    with tempfile.TemporaryDirectory() as folder:
        env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="2",
                   PYTHONPATH=tree)
        out = subprocess.run(
            [sys.executable, "-m", "trainers.train", f"--model_dir={folder}/run",
             f"--max_train={FLAGS.max_train}", "--max_test=16",
             f"--width_multiplier={FLAGS.width}", f"--epochs={FLAGS.epochs}",
             f"--batch_size={FLAGS.batch_size}", f"--pgd_steps={FLAGS.pgd_steps}",
             "--eval_pgd_steps=0", "--checkpoint_every=0"],
            cwd=tree, env=env, capture_output=True, text=True)
        if out.returncode:
            raise RuntimeError(f"{tree} on {backend}: {out.stderr[-2000:]}")
        with open(os.path.join(folder, "run", "metrics.jsonl")) as f:
            return [json.loads(line)["img/s"] for line in f][1:]


def main(argv):
    del argv
    if not FLAGS.before:
        raise app.UsageError("--before is required.")
    trees = {"after": os.path.abspath(FLAGS.after or ROOT),
             "before": os.path.abspath(FLAGS.before)}
    rounds = []
    for _ in range(FLAGS.rounds):
        figures = {}
        for backend in BACKENDS:
            for name, tree in trees.items():
                figures[f"{backend}/{name}"] = statistics.median(_epochs_img_s(tree, backend))
                print(f"{backend}/{name}: {figures[f'{backend}/{name}']:.1f} img/s", flush=True)
        rounds.append(figures)
    report = {
        "machine": common.machine(), "width": FLAGS.width, "batch_size": FLAGS.batch_size,
        "pgd_steps": FLAGS.pgd_steps, "max_train": FLAGS.max_train, "epochs": FLAGS.epochs,
        "rounds": FLAGS.rounds,
        "img_s": {k: common.spread([r[k] for r in rounds]) for k in rounds[0]},
        "after_over_before": {b: common.spread([r[f"{b}/after"] / r[f"{b}/before"]
                                                for r in rounds]) for b in BACKENDS},
    }
    common.write(report, _markdown(report), FLAGS.output_dir, "train_epoch.json",
                 "TRAIN_EPOCH.md")


def _markdown(r):
    lines = [f"# sparta-train, epoch by epoch: this checkout against an older one "
             f"({r['machine']})", "",
             f"ResNet-18 at width {r['width']}, PGD-{r['pgd_steps']} AT, batch "
             f"{r['batch_size']}, {r['max_train']} bundled images, {r['epochs']} epochs a "
             f"run (the first not counted), {r['rounds']} interleaved rounds.", "",
             "| run | img/s median [min, max] |", "|---|---|"]
    for name, s in r["img_s"].items():
        lines.append(f"| {name} | {s['median']:.1f} [{s['min']:.1f}, {s['max']:.1f}] |")
    lines += ["", "| img/s after / before | median [min, max] |", "|---|---|"]
    for name, s in r["after_over_before"].items():
        lines.append(f"| {name} | {s['median']:.3f} [{s['min']:.3f}, {s['max']:.3f}] |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    app.run(main)
