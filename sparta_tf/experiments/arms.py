"""The arms of a grid and the config of each of its cells.

An arm is a network variant: an activation name (`relu`, `sparta`, ...),
`{activation}_{denoise}` for a network with feature-denoising blocks
(`relu_nonlocal`, `relu_mean`), `sparta_transfer`, Sparta copied from
`base.sparta_from` and frozen (`sparta_tf.transfer`), or one of the gates-only probe's
`GATE_ARMS`: the network of `base.gates_from` (`{seed}` standing for the cell's seed) kept
frozen, and only a Sparta trained in place of its activations, with a k x k gate
(`sparta_gates`, k = 3) or a 1 x 1 one (`sparta_k1_gates`: a Swish with a learned slope and
offset per channel, the control without the spatial part). `arm_overrides` gives the
`TrainConfig` fields an arm sets; `cell_config` the whole config of one cell
(objective x arm x seed) of a grid rooted at `root`.
"""

import dataclasses
import os

from sparta_tf import activations as activations_lib
from sparta_tf import models

TRANSFER_ARM = "sparta_transfer"
GATE_ARMS = {"sparta_gates": 3, "sparta_k1_gates": 1}  # arm: Sparta's kernel size
EXTRA_ARMS = (TRANSFER_ARM, *GATE_ARMS) + tuple(
    f"{a}_{d}" for a in activations_lib.NAMES for d in models.DENOISE if d != "none")


def arm_overrides(arm, base):
    """The `TrainConfig` fields that arm `arm` sets (see the module docstring).

    Raises:
        ValueError: an unknown arm, `sparta_transfer` without `base.sparta_from`, or a
            gate arm without `base.gates_from`.
    """
    fields = {"activation": arm, "denoise": "none", "sparta_from": None,
              "sparta_from_sha256": None, "gates_from": None, "gates_from_sha256": None}
    if arm in GATE_ARMS:
        if not base.gates_from:
            raise ValueError(f"Arm {arm!r} needs a trained network to keep: set gates_from.")
        return {**fields, "activation": "sparta", "sparta_kernel_size": GATE_ARMS[arm],
                "gates_from": base.gates_from}
    if arm == TRANSFER_ARM:
        if not base.sparta_from:
            raise ValueError(f"Arm {arm!r} needs a trained Sparta to copy: set sparta_from.")
        return {**fields, "activation": "sparta", "sparta_from": base.sparta_from,
                "sparta_from_sha256": base.sparta_from_sha256}
    activation, _, denoise = arm.rpartition("_")
    if denoise in models.DENOISE and denoise != "none" and activation in activations_lib.NAMES:
        return {**fields, "activation": activation, "denoise": denoise}
    if arm not in activations_lib.NAMES:
        raise ValueError(f"Unknown arm {arm!r}: an activation out of "
                         f"{', '.join(activations_lib.NAMES)}, or one of {', '.join(EXTRA_ARMS)}.")
    return fields


def cell_config(base, root, objective, arm, seed):
    """The `TrainConfig` of one cell: `base` with its model_dir, arm, seed, objective.

    Activations other than sparta get `sparta_sharing="layer"` (the only kind
    `models.build` allows them).
    """
    fields = arm_overrides(arm, base)
    sharing = base.sparta_sharing if fields["activation"] == "sparta" else "layer"
    # eval_pgd_steps=0: training.run evaluates clean accuracy only; the grid does the rest.
    return dataclasses.replace(
        base, model_dir=os.path.join(root, objective, arm, f"seed{seed}"), seed=seed,
        objective=objective, sparta_sharing=sharing, eval_pgd_steps=0, **fields)
