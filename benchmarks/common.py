"""What the benchmarks share: the flags of the timed step, the model, its compiled step and
the batch they time, the interleaved timing, the machine they ran on, and writing the report
out. TensorFlow, Keras and sparta_tf are imported inside the functions, after the flags are
parsed (a benchmark may set the dtype policy or the backend first)."""

import json
import os
import platform
import statistics
import time

from absl import flags

# TensorFlow's CPU allocator keeps the statistics that the memory figures read
# (tf.config.experimental.get_memory_info) only as the BFC allocator; every benchmark imports
# this module before TensorFlow, so it asks for it here.
os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")


def define_step_flags(rounds=True, steps_help="Timed steps per configuration and round."):
    """The flags of every benchmark that times (`rounds`) or traces the compiled AT step."""
    flags.DEFINE_string("model", "resnet18", "The network (`sparta_tf.models.NAMES`); the "
                        "figures of docs/BENCHMARKS.md are ResNet-18's (the tests time "
                        "resnet10).")
    flags.DEFINE_integer("batch_size", 128, "Batch size.")
    flags.DEFINE_integer("pgd_steps", 3, "K, the PGD steps of the AT step.")
    flags.DEFINE_integer("steps", 3, steps_help)
    if rounds:  # the configurations take turns, round after round
        flags.DEFINE_integer("rounds", 5, "Rounds; each configuration runs `steps` steps a round.")


def batch(batch_size):
    """The batch every step is timed on: uniform random pixels [batch_size, 32, 32, 3]
    (seed 0) and the labels 0, 1, ..., 9 in turn, as NumPy arrays."""
    import numpy as np
    rng = np.random.default_rng(0)
    return (rng.uniform(size=(batch_size, 32, 32, 3)).astype("float32"),
            (np.arange(batch_size) % 10).astype("int32"))


def tf_batch(batch_size):
    """`batch` as TensorFlow constants, so that a step does not convert it at every call."""
    import tensorflow as tf
    return tuple(tf.constant(a) for a in batch(batch_size))


def at_model(activation, width, pgd_steps, objective="pgd", jit=False):
    """The `AdversarialModel` of `--model` (10 classes, 32x32 input) with `activation` at
    `width`, trained with `objective` (PGD-`pgd_steps` at 8/255 for `pgd`), compiled with SGD
    (lr 0.1, momentum 0.9), its optimizer built. `sparta_autodiff` is Sparta differentiated
    by autodiff, not through its exact custom gradient; `sparta_depthwise` and
    `sparta_shifted` are Sparta with that form of DW_k (`sparta_tf.gate`)."""
    import keras
    from sparta_tf import adversarial, attacks, models
    kwargs = {}
    if activation == "sparta_autodiff":
        activation, kwargs = "sparta", {"use_custom_gradient": False}
    elif activation in ("sparta_depthwise", "sparta_shifted"):  # a form of the gate's DW_k
        activation, kwargs = "sparta", {"gate_form": activation.split("_")[1]}
    net = models.build(flags.FLAGS.model, 10, activation, width, activation_kwargs=kwargs)
    attack = attacks.PGD(8 / 255, pgd_steps) if objective == "pgd" else None
    model = adversarial.AdversarialModel(net, objective, attack)
    model.compile(keras.optimizers.SGD(0.1, momentum=0.9), jit_compile=jit)
    model.optimizer.build(net.trainable_variables)
    return model


def compiled_step(model, jit=False):
    """`model.train_step` in one `tf.function` (XLA with `jit`), as Keras compiles it."""
    import tensorflow as tf
    return tf.function(model.train_step, jit_compile=jit)


def interleaved_seconds(steps, data, rounds, steps_per_round):
    """{name: [seconds per step, one per round]} of `steps` ({name: a step function of one
    batch}), each warmed up on `data` first (traced, compiled, run once). The steps take
    turns, round after round, so that a slow spell of the machine falls on all of them."""
    import keras
    for step in steps.values():
        keras.ops.convert_to_numpy(step(data)["loss"])
    seconds = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            for _ in range(steps_per_round):
                keras.ops.convert_to_numpy(step(data)["loss"])
            seconds[name].append((time.perf_counter() - start) / steps_per_round)
    return seconds


def spread(values):
    """{"median", "min", "max"} of `values`."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def machine():
    """The machine: its GPU (or other accelerator), else its CPU and core count. Asks the
    Keras backend's own library (TensorFlow or JAX)."""
    import keras
    if keras.backend.backend() == "jax":
        import jax
        device = jax.devices()[0]
        if device.platform != "cpu":
            return device.device_kind
    elif keras.backend.backend() == "tensorflow":
        import tensorflow as tf
        gpus = tf.config.list_physical_devices("GPU")
        if gpus:
            return tf.config.experimental.get_device_details(gpus[0]).get("device_name", "GPU")
    try:
        with open("/proc/cpuinfo") as f:
            name = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        name = platform.processor() or "unknown CPU"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{name}, {cores} core{'s' if cores != 1 else ''}" + (
        f" (pinned, of {os.cpu_count()})" if cores != os.cpu_count() else "") + ", no GPU"


def write(report, markdown, output_dir, json_name, markdown_name):
    """Prints the Markdown, and writes it and the JSON report into output_dir (if given)."""
    print(markdown)
    if output_dir:
        os.makedirs(output_dir, exist_ok=True)
        with open(os.path.join(output_dir, json_name), "w") as f:
            json.dump(report, f, indent=2)
        with open(os.path.join(output_dir, markdown_name), "w") as f:
            f.write(markdown)
