"""Parameters and AT step time of the grid's arms, relative to ReLU.

    python benchmarks/arm_overhead.py --arms=relu,sparta,relu_nonlocal,relu_mean \
        --output=results/compare_r18w025/arm_overhead.json

Builds each arm's network as `sparta-compare` does (ResNet-18, CIFAR-sized input), and times
its compiled PGD-AT step (`AdversarialModel.train_step` in one `tf.function`, the same batch
each call) after a warm-up. The arms take turns, round after round, so that a slow spell of
the machine hits them all; the result per arm is the median over rounds of its time per
step, and its ratio to ReLU's in the same round (median, min and max over rounds). Prints and
writes JSON; report the device with every number.
"""

import json
import os

from absl import app, flags

import common

flags.DEFINE_list("arms", ["relu", "sparta", "relu_nonlocal", "relu_mean"],
                  "Arms of sparta_tf.experiments.arms to time; the first is the reference.")
flags.DEFINE_float("width_multiplier", 0.25, "ResNet-18 width.")
common.define_step_flags()
flags.DEFINE_string("output", None, "Where to write the JSON (default: print only).")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    import numpy as np
    from sparta_tf import adversarial, training
    from sparta_tf.experiments import arms

    base = training.TrainConfig(model=FLAGS.model, width_multiplier=FLAGS.width_multiplier,
                                pgd_steps=FLAGS.pgd_steps, batch_size=FLAGS.batch_size)
    steps, params = {}, {}
    for arm in FLAGS.arms:  # each arm's network as sparta-compare builds it
        config = arms.cell_config(base, "unused", "pgd", arm, 0)
        model = adversarial.build(config, 10, (32, 32, 3), steps_per_epoch=100)
        params[arm] = int(model.model.count_params())
        steps[arm] = common.compiled_step(model)
    seconds = common.interleaved_seconds(steps, common.tf_batch(FLAGS.batch_size),
                                         FLAGS.rounds, FLAGS.steps)
    ref = FLAGS.arms[0]
    rows = {}
    for arm in FLAGS.arms:
        ratios = np.array(seconds[arm]) / np.array(seconds[ref])
        rows[arm] = {"params": params[arm], "params_vs_ref": params[arm] / params[ref],
                     "s_per_step_median": float(np.median(seconds[arm])),
                     "time_vs_ref_median": float(np.median(ratios)),
                     "time_vs_ref_min": float(ratios.min()),
                     "time_vs_ref_max": float(ratios.max())}
    result = {"device": common.machine(),
              "reference": ref, "model": FLAGS.model, "width_multiplier": FLAGS.width_multiplier,
              "batch_size": FLAGS.batch_size, "pgd_steps": FLAGS.pgd_steps,
              "rounds": FLAGS.rounds, "steps_per_round": FLAGS.steps, "arms": rows}
    text = json.dumps(result, indent=2)
    print(text)
    if FLAGS.output:
        os.makedirs(os.path.dirname(FLAGS.output) or ".", exist_ok=True)
        with open(FLAGS.output, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    app.run(main)
