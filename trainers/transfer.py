"""Does a trained Sparta carry over? ReLU, a fresh Sparta and the transferred one, compared.

    sparta-transfer --sparta_from=runs/r18 --model=resnet34 --model_dir=runs/transfer_r34
    sparta-transfer --sparta_from=runs/r18 --dataset=svhn_cropped --model_dir=runs/to_svhn

For the target network and dataset that the training flags describe, trains, with one
recipe and the same seeds (PGD-AT by default): `relu`, `sparta` (a fresh, trainable Sparta
with --sparta_sharing) and `sparta_transfer` (the Sparta of --sparta_from, a model_dir of
sparta-train or a .keras file, copied in and frozen; the rest trains from scratch). Then
evaluates them as sparta-compare does (clean, PGD, eps curve, seed by seed) and writes
comparison.md, comparison.json and the PNGs to --model_dir. Every flag of sparta-compare
works here; only the defaults differ. Rerunning the same command resumes.
"""

import sys

from flags import compare as compare_flags
from trainers import compare


def run():
    compare.run(compare_flags.define_transfer, sys.modules[__name__])


if __name__ == "__main__":
    run()
