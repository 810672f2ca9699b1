"""What the benchmarks share: the flags of the timed step, the machine they ran on, and
writing the report out."""

import json
import os
import platform

from absl import flags


def define_step_flags(rounds=True, steps_help="Timed steps per configuration and round."):
    """The flags of every benchmark that times (`rounds`) or traces the compiled AT step."""
    flags.DEFINE_integer("batch_size", 128, "Batch size.")
    flags.DEFINE_integer("pgd_steps", 3, "K, the PGD steps of the AT step.")
    flags.DEFINE_integer("steps", 3, steps_help)
    if rounds:  # the configurations take turns, round after round
        flags.DEFINE_integer("rounds", 5, "Rounds; each configuration runs `steps` steps a round.")


def machine():
    """The machine: its GPU, else its CPU and core count."""
    import tensorflow as tf
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        return tf.config.experimental.get_device_details(gpus[0]).get("device_name", "GPU")
    try:
        with open("/proc/cpuinfo") as f:
            name = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        name = platform.processor() or "unknown CPU"
    return f"{name}, {os.cpu_count()} cores, no GPU"


def write(report, markdown, output_dir, json_name, markdown_name):
    """Prints the Markdown, and writes it and the JSON report into output_dir (if given)."""
    print(markdown)
    if output_dir:
        os.makedirs(output_dir, exist_ok=True)
        with open(os.path.join(output_dir, json_name), "w") as f:
            json.dump(report, f, indent=2)
        with open(os.path.join(output_dir, markdown_name), "w") as f:
            f.write(markdown)
