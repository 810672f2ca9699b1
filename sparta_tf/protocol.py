"""The one PGD evaluation protocol: what a "PGD-20" accuracy of this project means.

`Protocol` holds every setting of the evaluation in one place: eps, steps, step size,
random start, restarts, loss, batch size and seed, and names itself (`name`,
`describe`, `to_json`). `correct(model, x, y, protocol)` runs it: which examples the
model still classifies correctly under the protocol's PGD (`attacks.PGD`), or clean with
`clean=True`. The PGD's random start is seeded with [seed, 0] in every batch, so an
evaluation repeats exactly, whatever ran before it.

Every PGD accuracy that a report gives comes from here, and the report names the
protocol: the trainer's final evaluation (results.json, `training.finish`, on TensorFlow
and on JAX), the cells of sparta-compare (`experiments.cells.evaluate`, comparison.json
and .md) and sparta-evaluate (`evaluation.robustness_report`, eval.json and .md, which
varies steps, loss and restarts row by row and names each row's protocol).

The loop over batches is the backend's (`correct_fn` in `sparta_tf/backend/`: a
`tf.function` on TensorFlow, a `jax.jit` over `stateless_call` on JAX). This module
imports no TensorFlow.
"""

import dataclasses
import importlib

import keras
import numpy as np
from tqdm.auto import tqdm

from sparta_tf import attacks, data


def eps_text(eps):
    """`8/255` for whole numbers of 1/255, else the float."""
    n = eps * 255
    return f"{round(n)}/255" if abs(n - round(n)) < 1e-6 else f"{eps:.4g}"


@dataclasses.dataclass(frozen=True)
class Protocol:
    """How a PGD accuracy is measured.

    Args:
        eps: the L-inf budget, in pixels.
        steps: PGD's steps.
        step_size: one step's size; None: 2.5 * eps / steps (`attacks.PGD`'s default).
        random_start: start from a uniform random point of the eps ball.
        restarts: runs per example; an example counts as broken if any run breaks it.
        loss: "ce" (cross-entropy) or "cw" (the Carlini-Wagner margin).
        batch_size: examples per batch; each batch's random start is drawn from `seed`,
            so the batch size is part of the protocol.
        seed: the seed of the random starts ([seed, 0] in every batch).
    """

    eps: float = 8 / 255
    steps: int = 20
    step_size: float | None = None
    random_start: bool = True
    restarts: int = 1
    loss: str = "ce"
    batch_size: int = 256
    seed: int = 0

    @property
    def name(self):
        """`PGD-20`, or with the loss and restarts where they are not CE and 1: `PGD-20 CW x3`."""
        name = f"PGD-{self.steps}"
        if self.loss != "ce" or self.restarts != 1:
            name += f" {self.loss.upper()} x{self.restarts}"
        return name

    def describe(self):
        """Every setting in words, e.g. `PGD-20 at eps 8/255, CE loss, 20 steps of
        2.5 eps / 20, 1 random start, batches of 256 seeded with [0, 0]`."""
        step = (f"2.5 eps / {self.steps}" if self.step_size is None
                else eps_text(self.step_size))
        runs = f"{self.restarts} {'random start' if self.random_start else 'run'}" + (
            "s" * (self.restarts != 1)) + ("" if self.random_start else " from the image")
        return (f"{self.name} at eps {eps_text(self.eps)}, {self.loss.upper()} loss, "
                f"{self.steps} step{'s' * (self.steps != 1)} of {step}, {runs}, batches of "
                f"{self.batch_size} seeded with [{self.seed}, 0]")

    def to_json(self):
        """The settings and the name, as a report keeps them."""
        return {"name": self.name, **dataclasses.asdict(self)}

    @classmethod
    def from_json(cls, stored):
        """The protocol of `to_json`."""
        return cls(**{k: v for k, v in stored.items() if k != "name"})

    def attack(self):
        """The protocol's PGD, seeded: a callable `attack(model, x, y) -> x_adv`."""
        pgd = attacks.PGD(self.eps, self.steps, self.step_size, self.random_start,
                          self.restarts, self.loss)
        seed = np.array([self.seed, 0], np.int64)
        return lambda model, x, y: pgd(model, x, y, seed=seed)


def _backend():
    return importlib.import_module(f"sparta_tf.backend.{keras.backend.backend()}")


def hits(model, x, y, attack=None, batch_size=256, progress=None):
    """Which examples `model` classifies correctly, after `attack` if one is given.

    Args:
        model: a callable `model(x, training=False)` from pixels in [0, 1] to logits:
            a Keras model (on JAX, only that), or an exported model on TensorFlow.
        x: uint8 images (scaled by 1/255) or floats in [0, 1], NHWC.
        y: int labels.
        attack: None, or a callable `attack(model, x, y) -> x_adv`, such as
            `Protocol.attack()`.
        batch_size: examples per batch.
        progress: None, or the label of a progress bar to show.

    Returns: a bool array, one entry per example.
    """
    batch = _backend().correct_fn(model, attack)
    x, y = data.pixels(x), np.asarray(y, np.int32)
    out = []
    with tqdm(total=len(x), desc=progress, unit="img", disable=progress is None) as bar:
        for i in range(0, len(x), batch_size):
            out.append(batch(x[i:i + batch_size], y[i:i + batch_size]))
            bar.update(len(out[-1]))
    return np.concatenate(out)


def correct(model, x, y, protocol, clean=False, progress=None):
    """Which examples `model` classifies correctly under `protocol` (clean: without the
    attack, in the protocol's batches): a bool array, one entry per example."""
    attack = None if clean else protocol.attack()
    return hits(model, x, y, attack, protocol.batch_size, progress)
