"""One cell of a grid, evaluated: its settings (`EvalSettings`), `evaluate`, and what it keeps.

`evaluate(model, x, y, settings)` measures one trained cell on the grid's test images:
clean and PGD accuracy under the project's one protocol (`EvalSettings.protocol`,
`sparta_tf.protocol`), optionally AutoAttack accuracy, a robust accuracy against eps
curve, and which images each attack left right (`per_image`, packed by `pack`), for the
paired comparisons of `stats.paired`. `stalled(config, num_classes)` says whether the
cell's network learned at all. Nothing here trains or writes files.
"""

import dataclasses
import json
import os


import keras

from sparta_tf import autoattack_keras, data, model_dir, protocol, training
from sparta_tf.evaluation import pack, unpack  # noqa: F401  (the grid's per-image results)

if keras.backend.backend() == "tensorflow":  # ART's AutoAttack runs on TensorFlow only
    from sparta_tf import autoattack as autoattack_art


# The attacks of ART's AutoAttack (`sparta_tf.autoattack.KNOWN`; that module loads TensorFlow).
ART_ATTACKS = ("apgd-ce", "apgd-t", "square", "apgd-dlr")
# Standard AutoAttack's white-box attacks (Square comes last), as each engine has them.
STANDARD = {"keras": autoattack_keras.ATTACKS[:-1], "art": ("apgd-ce", "apgd-t")}


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """How every cell is evaluated.

    Args:
        eps: the L-inf budget of PGD and AutoAttack, in pixels.
        pgd_steps: the steps of the PGD (`protocol()`: step size 2.5 * eps / steps,
            one random start).
        autoattack: also run AutoAttack: `autoattack_attacks`, then Square.
        autoattack_engine: whose: "keras" (`autoattack_keras`, on every backend) or "art"
            (ART's, `sparta_tf.autoattack`, on TensorFlow only). An evaluation stored
            before this setting existed ran ART's (`cache.match`).
        autoattack_iterations, square_queries: its sizes (100 and 5000 are
            standard AutoAttack's).
        square_examples: None: Square is the last attack of AutoAttack's chain,
            on every test image. A number N: AutoAttack is `autoattack_attacks`
            (the worst case per image) on every test image, and Square (black
            box, the costly one on a CPU) runs alone on a class-balanced N of
            them, for the masking check: it must not beat the white-box attacks
            (PGD, AutoAttack's chain) there.
        autoattack_attacks: the white-box attacks of AutoAttack, in order, but
            Square: with "keras", out of `autoattack_keras.ATTACKS` (standard:
            APGD-CE, APGD-T and FAB-T, the targeted ones once per target class, 9 of
            them); with "art", out of `ART_ATTACKS` (no FAB-T there; APGD-DLR is
            one untargeted run in APGD-T's place).
        eps_curve: the budgets of the robust accuracy against eps curve (PGD
            with `pgd_steps` steps at each); empty for none.
        batch_size: examples per batch.
        seed: the seed of the class-balanced test sample and of PGD's noise.
    """

    eps: float = 8 / 255
    pgd_steps: int = 20
    autoattack: bool = True
    autoattack_iterations: int = 100
    square_queries: int = 5000
    eps_curve: tuple = ()
    batch_size: int = 256
    seed: int = 0
    square_examples: int | None = None
    autoattack_attacks: tuple = ("apgd-ce", "apgd-t", "fab-t")
    autoattack_engine: str = "keras"

    def protocol(self):
        """The PGD protocol of the cells (`sparta_tf.protocol`): PGD-`pgd_steps` at `eps`,
        in batches of `batch_size`, seeded with `seed`; its other settings are the defaults."""
        return protocol.Protocol(eps=self.eps, steps=self.pgd_steps,
                                 batch_size=self.batch_size, seed=self.seed)


def evaluate(model, x, y, settings, verbose=False):
    """Accuracies of `model` on (x, y): clean, PGD, AutoAttack (or None), eps curve, and
    `per_image`: which test images each of clean, PGD and AutoAttack got right (`pack`), for
    the paired comparisons. Clean, PGD and the eps curve are `settings.protocol()` (at each
    eps of the curve), run by `protocol.correct`."""
    pgd = settings.protocol()

    def correct(run, label, clean=False):
        return protocol.correct(model, x, y, run, clean, label if verbose else None)

    hits = {"clean": correct(pgd, "clean", clean=True), "pgd": correct(pgd, pgd.name),
            "autoattack": None}

    def robust(x, y, chain):
        if settings.autoattack_engine == "art":
            return autoattack_art.robust_accuracy(
                model, x, y, settings.eps, settings.batch_size, chain,
                iterations=settings.autoattack_iterations, queries=settings.square_queries,
                verbose=verbose, seed=settings.seed)
        return autoattack_keras.robust_accuracy(
            model, x, y, settings.eps, settings.batch_size, chain,
            iterations=settings.autoattack_iterations, queries=settings.square_queries,
            seed=settings.seed, verbose=verbose)

    square = after = None
    if settings.autoattack:
        chain = tuple(settings.autoattack_attacks)
        if settings.square_examples is None:
            chain += ("square",)
        aa = robust(x, y, chain)
        hits["autoattack"], after = aa["robust"], aa["after"]
        if settings.square_examples is not None:
            subset = data.balanced_subset(y, settings.square_examples, settings.seed)
            square = {"examples": len(subset),
                      "square": float(robust(x[subset], y[subset], ("square",))["accuracy"]),
                      "pgd": float(hits["pgd"][subset].mean()),
                      "autoattack": float(hits["autoattack"][subset].mean())}
    results = {m: None if h is None else float(h.mean()) for m, h in hits.items()}
    if after is not None:  # the accuracy after each attack of the chain and those before it
        results["autoattack_after"] = after
    if square is not None:
        results["square_check"] = square
    results["eps_curve"] = [[eps, float(correct(dataclasses.replace(pgd, eps=eps),
                                                f"PGD at eps {eps:.4g}").mean())]
                            for eps in settings.eps_curve]
    results["per_image"] = {m: None if h is None else pack(h) for m, h in hits.items()}
    return results


def stalled(config, num_classes):
    """Whether the cell's training loss was still at chance at its last epoch
    (`training.stalled`, read from its metrics.jsonl): a network that did not learn."""
    path = os.path.join(config.model_dir, model_dir.METRICS_FILE)
    if not os.path.isfile(path):
        return False
    rows = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                row = json.loads(line)
                rows.append({"loss": float(row["loss"]), "epoch": int(row["epoch"])})
            except (ValueError, TypeError, KeyError):  # damaged (`callbacks.log_epoch` drops it)
                pass
    return bool(rows) and training.stalled(rows[-1]["loss"], num_classes, rows[-1]["epoch"],
                                           config.objective)
