"""Evidence on real data: PGD adversarial training beats standard training under PGD.

Uses the real CIFAR-10 archive that sits beside the checkout (../shared/data), as the
developers' machines and CI have it; a user's machine does not, and the test is skipped there.
"""

import os

import pytest

from sparta_tf import training

ARCHIVE = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data",
                       "cifar10-jpeg.tar.gz")


@pytest.mark.skipif(not os.path.exists(ARCHIVE), reason="no ../shared/data/cifar10-jpeg.tar.gz")
def test_pgd_at_beats_standard_training_under_pgd(tmp_path):
    results = {}
    for objective in ("standard", "pgd"):
        config = training.TrainConfig(
            model_dir=str(tmp_path / objective), dataset=os.path.abspath(ARCHIVE),
            data_dir=str(tmp_path / "cache"), max_train=2000, max_test=500,
            model="resnet10", activation="sparta", width_multiplier=0.125, epochs=4,
            batch_size=64, lr=0.05, lr_schedule="cosine", objective=objective,
            eps=8 / 255, pgd_steps=2, eval_pgd_steps=10, checkpoint_every=0)
        results[objective] = training.run(config, verbose=0)
    std, at = results["standard"], results["pgd"]
    message = f"standard {std}, PGD-AT {at}"
    assert std["clean_acc"] > 0.25, message  # both models learned something
    assert at["clean_acc"] > 0.15, message  # (chance is 0.1)
    assert std["pgd10_acc"] < 0.08, message  # a standard model is not robust
    assert at["pgd10_acc"] > std["pgd10_acc"] + 0.08, message
