"""AutoAttack in keras.ops (`sparta_tf.autoattack_keras`) against ART's (`sparta_tf.autoattack`):
time and strength on the same models, images and CPU, on TensorFlow.

    python benchmarks/autoattack_time.py --dataset=PATH/TO/cifar10.tar.gz --num_examples=100 \
        --model_paths=results/autoattack_r18w025/pgd/relu/seed0,results/autoattack_r18w025/pgd/sparta/seed0 \
        --output_dir=results/benchmarks/NAME

(`bash tools/fetch_models.sh` puts those models back first.) For each model, three runs take
turns, round after round, so that a slow spell of the machine falls on all of them: ART's
APGD-CE, APGD-T and Square (all that ART has of standard AutoAttack); the same three in
keras.ops; and the keras.ops standard AutoAttack with FAB-T. A run's time is the median over
rounds (min and max beside it); its ratio to ART's is taken within a round, one ratio per
model and round. Strength, per model and over all models' images together: the robust
accuracy of each, and the images that ART breaks and the keras.ops attacks do not. Writes
`autoattack_time.json` and `AUTOATTACK_TIME.md`.
"""

import time

import numpy as np
from absl import app, flags

import common

flags.DEFINE_list("model_paths", ["results/autoattack_r18w025/pgd/relu/seed0"],
                  "model_dirs or .keras files, comma-separated.")
flags.DEFINE_string("dataset", "bundled", "The test images: 'bundled' or an image folder or "
                    ".tar.gz (see sparta_tf.data.load).")
flags.DEFINE_integer("num_examples", 64, "Test images (a class-balanced sample, seed 0).")
flags.DEFINE_integer("iterations", 100, "APGD and FAB iterations (100 is standard).")
flags.DEFINE_integer("queries", 5000, "Square queries (5000 is standard).")
flags.DEFINE_integer("batch_size", 256, "Images per batch.")
flags.DEFINE_integer("rounds", 1, "Rounds; each run once a round.")
flags.DEFINE_string("output_dir", None, "Where to write the reports.")
FLAGS = flags.FLAGS
EPS = 8 / 255
THREE = ("apgd-ce", "apgd-t", "square")
RUNS = ("art", "keras_three", "keras_standard")
LABELS = {"art": "ART: APGD-CE, APGD-T, Square",
          "keras_three": "keras.ops: APGD-CE, APGD-T, Square",
          "keras_standard": "keras.ops: standard (with FAB-T)"}


def main(_):
    from sparta_tf import autoattack, autoattack_keras, data, transfer

    ds = data.load(FLAGS.dataset, max_test=FLAGS.num_examples, splits=("test",))
    x, y = data.pixels(ds.x_test), ds.y_test
    sizes = dict(iterations=FLAGS.iterations, queries=FLAGS.queries,
                 batch_size=FLAGS.batch_size, verbose=False)
    models = []
    for path in FLAGS.model_paths:
        model = transfer.load(path)
        runs = {
            "art": lambda m=model: autoattack.robust_accuracy(m, x, y, EPS, attacks=THREE,
                                                              seed=0, **sizes),
            "keras_three": lambda m=model: autoattack_keras.robust_accuracy(
                m, x, y, EPS, attacks_run=THREE, **sizes),
            "keras_standard": lambda m=model: autoattack_keras.robust_accuracy(
                m, x, y, EPS, **sizes),
        }
        seconds, results = {name: [] for name in runs}, {}
        for _ in range(FLAGS.rounds):
            for name, run in runs.items():
                start = time.perf_counter()
                results[name] = run()
                seconds[name].append(time.perf_counter() - start)
                print(f"{path} {name}: {seconds[name][-1]:.0f} s, robust "
                      f"{results[name]['accuracy']:.1%}", flush=True)
        art = results["art"]["robust"]
        models.append({
            "model_path": path, "seconds": seconds,
            "robust_accuracy": {name: r["accuracy"] for name, r in results.items()},
            "after": {name: r["after"] for name, r in results.items()},
            "art_breaks_it_does_not": {name: int(np.sum(r["robust"] & ~art))
                                       for name, r in results.items() if name != "art"},
        })
    images = len(y) * len(models)
    report = {
        "machine": common.machine(), "dataset_examples": len(y), "eps": EPS,
        "iterations": FLAGS.iterations, "queries": FLAGS.queries, "rounds": FLAGS.rounds,
        "models": models,
        "seconds": {name: common.spread([s for m in models for s in m["seconds"][name]])
                    for name in RUNS},
        "ratio_to_art": {name: common.spread([a / b for m in models for a, b in
                                              zip(m["seconds"][name], m["seconds"]["art"])])
                         for name in RUNS[1:]},
        "pooled": {
            "images": images,
            "robust_accuracy": {name: float(np.mean([m["robust_accuracy"][name]
                                                     for m in models])) for name in RUNS},
            "art_breaks_it_does_not": {name: sum(m["art_breaks_it_does_not"][name]
                                                 for m in models) for name in RUNS[1:]},
        },
    }
    common.write(report, _markdown(report), FLAGS.output_dir, "autoattack_time.json",
                 "AUTOATTACK_TIME.md")


def _markdown(r):
    def spread(s, unit=" s", digits=0):
        return (f"{s['median']:.{digits}f}{unit} ({s['min']:.{digits}f} to "
                f"{s['max']:.{digits}f})")

    pooled = r["pooled"]
    lines = [f"# AutoAttack: keras.ops against ART ({r['machine']})", "",
             f"{len(r['models'])} model(s), {r['dataset_examples']} test images each, eps "
             f"8/255, {r['iterations']} iterations, {r['queries']} Square queries, "
             f"{r['rounds']} round(s). Times: median (min to max) over models and rounds; "
             f"ratios to ART's within a model and round.", "",
             "| run | time | / ART's | robust accuracy, mean over models | images ART "
             f"breaks and it does not (of {pooled['images']}) |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for name in RUNS:
        ratio = r["ratio_to_art"].get(name)
        lines.append(f"| {LABELS[name]} | {spread(r['seconds'][name])} | "
                     + (spread(ratio, "", 2) if ratio else "1")
                     + f" | {100 * pooled['robust_accuracy'][name]:.2f}% | "
                     + f"{pooled['art_breaks_it_does_not'].get(name, '')} |")
    lines += ["", "Per model (robust accuracy; in brackets, the images ART breaks and it "
              "does not):", "", "| model | ART | keras.ops, three | keras.ops, standard |",
              "| --- | ---: | ---: | ---: |"]
    for m in r["models"]:
        acc, worse = m["robust_accuracy"], m["art_breaks_it_does_not"]
        lines.append(f"| {m['model_path']} | {100 * acc['art']:.1f}% | "
                     f"{100 * acc['keras_three']:.1f}% ({worse['keras_three']}) | "
                     f"{100 * acc['keras_standard']:.1f}% ({worse['keras_standard']}) |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    app.run(main)
