"""AutoAttack in keras.ops (`sparta_tf.autoattack_keras`) against ART's (`sparta_tf.autoattack`):
time and strength on the same model, images and CPU, on TensorFlow.

    python benchmarks/autoattack_time.py --model_path=results/autoattack_r18w025/pgd/relu/seed0 \
        --output_dir=results/benchmarks/NAME

(`bash tools/fetch_models.sh` puts that model back first.) Three runs take turns, round after
round, so that a slow spell of the machine falls on all of them: ART's APGD-CE, APGD-T and
Square (all that ART has of standard AutoAttack); the same three in keras.ops; and the
keras.ops standard AutoAttack with FAB-T. Each run's time is the median over rounds (min
and max beside it), and the ratio to ART's is taken within a round. Strength: the robust
accuracy of each, and the images that ART breaks and the keras.ops attacks do not. Writes
`autoattack_time.json` and `AUTOATTACK_TIME.md`.
"""

import time

import numpy as np
from absl import app, flags

import common

flags.DEFINE_string("model_path", "results/autoattack_r18w025/pgd/relu/seed0",
                    "A model_dir or .keras file.")
flags.DEFINE_string("dataset", "bundled", "The test images: 'bundled' or an image folder or "
                    ".tar.gz (see sparta_tf.data.load).")
flags.DEFINE_integer("num_examples", 64, "Test images (a class-balanced sample, seed 0).")
flags.DEFINE_integer("iterations", 100, "APGD and FAB iterations (100 is standard).")
flags.DEFINE_integer("queries", 5000, "Square queries (5000 is standard).")
flags.DEFINE_integer("batch_size", 256, "Images per batch.")
flags.DEFINE_integer("rounds", 2, "Rounds; each run once a round.")
flags.DEFINE_string("output_dir", None, "Where to write the reports.")
FLAGS = flags.FLAGS
EPS = 8 / 255
THREE = ("apgd-ce", "apgd-t", "square")


def main(_):
    from sparta_tf import autoattack, autoattack_keras, data, transfer

    model = transfer.load(FLAGS.model_path)
    ds = data.load(FLAGS.dataset, max_test=FLAGS.num_examples, splits=("test",))
    x, y = data.pixels(ds.x_test), ds.y_test
    sizes = dict(iterations=FLAGS.iterations, queries=FLAGS.queries,
                 batch_size=FLAGS.batch_size, verbose=False)
    runs = {
        "art": lambda: autoattack.robust_accuracy(model, x, y, EPS, attacks=THREE, seed=0,
                                                  **sizes),
        "keras_three": lambda: autoattack_keras.robust_accuracy(model, x, y, EPS,
                                                               attacks_run=THREE, **sizes),
        "keras_standard": lambda: autoattack_keras.robust_accuracy(model, x, y, EPS, **sizes),
    }
    seconds = {name: [] for name in runs}
    results = {}
    for _ in range(FLAGS.rounds):
        for name, run in runs.items():
            start = time.perf_counter()
            results[name] = run()
            seconds[name].append(time.perf_counter() - start)
            print(f"{name}: {seconds[name][-1]:.0f} s, robust {results[name]['accuracy']:.1%}")
    art = results["art"]["robust"]
    report = {
        "machine": common.machine(), "model_path": FLAGS.model_path,
        "examples": len(y), "eps": EPS, "iterations": FLAGS.iterations,
        "queries": FLAGS.queries, "rounds": FLAGS.rounds,
        "seconds": {name: common.spread(s) for name, s in seconds.items()},
        "ratio_to_art": {name: common.spread([a / b for a, b in zip(s, seconds["art"])])
                         for name, s in seconds.items() if name != "art"},
        "robust_accuracy": {name: r["accuracy"] for name, r in results.items()},
        "after": {name: r["after"] for name, r in results.items()},
        "art_breaks_it_does_not": {name: int(np.sum(r["robust"] & ~art))
                                   for name, r in results.items() if name != "art"},
    }
    common.write(report, _markdown(report), FLAGS.output_dir, "autoattack_time.json",
                 "AUTOATTACK_TIME.md")


def _markdown(r):
    def spread(s):
        return f"{s['median']:.0f} s ({s['min']:.0f} to {s['max']:.0f})"

    lines = [f"# AutoAttack: keras.ops against ART ({r['machine']})", "",
             f"{r['model_path']}, {r['examples']} test images, eps 8/255, "
             f"{r['iterations']} iterations, {r['queries']} Square queries, {r['rounds']} "
             "rounds.", "",
             "| run | time | / ART's | robust accuracy | ART breaks, it does not |",
             "| --- | ---: | ---: | ---: | ---: |"]
    names = {"art": "ART: APGD-CE, APGD-T, Square",
             "keras_three": "keras.ops: APGD-CE, APGD-T, Square",
             "keras_standard": "keras.ops: standard (with FAB-T)"}
    for name, label in names.items():
        ratio = r["ratio_to_art"].get(name)
        lines.append(
            f"| {label} | {spread(r['seconds'][name])} | "
            + (f"{ratio['median']:.2f} ({ratio['min']:.2f} to {ratio['max']:.2f})"
               if ratio else "1") + f" | {100 * r['robust_accuracy'][name]:.1f}% | "
            + f"{r['art_breaks_it_does_not'].get(name, '')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    app.run(main)
