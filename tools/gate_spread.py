"""Print, per Sparta layer of a model, how far its gate is from 1/2 on test images.

    python tools/gate_spread.py MODEL [DATASET [NUM_EXAMPLES [DATA_DIR]]]

MODEL is a model_dir or a `.keras` file (not a SavedModel: it has no layers). DATASET is as the trainers' --dataset (default: bundled); the images are a
class-balanced sample of its test split (default 200). See
`sparta_tf.plots.gate_spread`.
"""

import sys

import numpy as np

from sparta_tf import data, evaluation, plots


def main(args):
    if not 1 <= len(args) <= 4:
        sys.exit(__doc__)
    path, dataset, n, data_dir = args + [None, "bundled", "200", None][len(args):]
    model = evaluation.load_model(path)
    ds = data.load(dataset, data_dir=data_dir, max_test=int(n), splits=("test",))
    try:
        spread = plots.gate_spread(model, ds.x_test / np.float32(255))
    except ValueError as e:
        sys.exit(f"error: {e}")
    print("| layer | input RMS | mean abs(gate - 1/2) |\n| --- | ---: | ---: |")
    for name, s in spread.items():
        print(f"| {name} | {s['input_rms']:.2f} | {s['gate_from_half']:.3f} |")


if __name__ == "__main__":
    main(sys.argv[1:])
