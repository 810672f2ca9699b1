"""Print the ablation table of several comparisons of Sparta (their comparison.json).

    python tools/ablation_table.py results/compare_r18w025 results/ablation_r18w025/*

Each argument is the --model_dir of a `sparta-compare` run (or its comparison.json);
the first is the baseline, the others change settings of Sparta only (--sparta_kernel_size,
--sparta_beta0, --sparta_sharing, --sparta_weight_decay, --sparta_lr_multiplier,
--sparta_custom_gradient, --sparta_normalize_gate_input).
See `sparta_tf.experiments.ablation.ablation_table`.
"""

import json
import os
import sys

from sparta_tf.experiments import ablation


def main(paths):
    if not paths:
        sys.exit(__doc__)
    reports = []
    for path in paths:
        if os.path.isdir(path):
            path = os.path.join(path, "comparison.json")
        with open(path) as f:
            reports.append(json.load(f))
    try:
        print(ablation.ablation_table(reports), end="")
    except ValueError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main(sys.argv[1:])
