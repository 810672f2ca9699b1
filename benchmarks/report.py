"""What every benchmark report shares: the machine it ran on, and writing it out."""

import json
import os
import platform


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
