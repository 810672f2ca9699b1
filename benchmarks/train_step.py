"""Throughput and peak memory of the adversarial train step.

    python benchmarks/train_step.py --activations=relu,sparta,sparta_autodiff

`sparta_autodiff` is Sparta with `use_custom_gradient=False`: the same numbers,
differentiated by autodiff instead of the hand-written exact gradient. Each
activation runs in a fresh process, so one's memory does not count for another: peak
GPU memory on a GPU, and the process's peak resident memory (which includes the TF
runtime, the same for every activation) everywhere. Prints one JSON line per
activation; report the device with every number.
"""

import json
import resource
import subprocess
import sys
import time

from absl import app, flags

flags.DEFINE_list("activations", ["relu", "sparta", "sparta_autodiff"], "What to time.")
flags.DEFINE_float("width_multiplier", 0.25, "ResNet-18 width.")
flags.DEFINE_integer("batch_size", 128, "Batch size.")
flags.DEFINE_integer("pgd_steps", 3, "PGD steps of the train step.")
flags.DEFINE_integer("steps", 10, "Timed steps (after 2 warm-up steps).")
flags.DEFINE_bool("jit_compile", False, "XLA.")
flags.DEFINE_string("one", None, "Internal: time this one activation in this process.")
FLAGS = flags.FLAGS


def _time_one(name):
    import keras
    import numpy as np
    import tensorflow as tf
    from sparta_tf import attacks, models, training

    activation, kwargs = name, {}
    if name == "sparta_autodiff":
        activation, kwargs = "sparta", {"use_custom_gradient": False}
    net = models.build("resnet18", 10, activation, FLAGS.width_multiplier,
                       activation_kwargs=kwargs)
    model = training.AdversarialModel(net, "pgd", attacks.PGD(8 / 255, FLAGS.pgd_steps))
    model.compile(keras.optimizers.SGD(0.1, momentum=0.9), jit_compile=FLAGS.jit_compile)
    n = FLAGS.batch_size
    x = np.random.default_rng(0).uniform(size=(n * (FLAGS.steps + 2), 32, 32, 3))
    y = np.arange(len(x)) % 10
    model.fit(x[:2 * n].astype("float32"), y[:2 * n], batch_size=n, verbose=0)  # warm-up
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        tf.config.experimental.reset_memory_stats("GPU:0")
    start = time.perf_counter()
    model.fit(x[2 * n:].astype("float32"), y[2 * n:], batch_size=n, verbose=0)
    seconds = time.perf_counter() - start
    result = {"activation": name, "img_per_s": round(FLAGS.steps * n / seconds, 1),
              "device": gpus[0].name if gpus else "CPU", "batch_size": n,
              "width_multiplier": FLAGS.width_multiplier, "pgd_steps": FLAGS.pgd_steps}
    result["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    if gpus:
        result["peak_gpu_mib"] = round(
            tf.config.experimental.get_memory_info("GPU:0")["peak"] / 2 ** 20)
    print(json.dumps(result))


def main(argv):
    del argv
    if FLAGS.one:
        return _time_one(FLAGS.one)
    passed = [a for a in sys.argv[1:] if not a.startswith("--activations")]
    for name in FLAGS.activations:
        out = subprocess.run([sys.executable, __file__, f"--one={name}", *passed],
                             capture_output=True, text=True, check=True)
        print(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    app.run(main)
