"""Tests of sparta_tf.autoattack_keras (standard AutoAttack with the keras.ops attacks), on
TensorFlow: against ART's AutoAttack on the same network and images, padding and seeding.
The JAX side runs in `tests/jax_checks_attacks.py`."""

import numpy as np
import pytest

from conftest import small_trained_net
from sparta_tf import autoattack, autoattack_keras

EPS = 4 / 255


@pytest.fixture(scope="module")
def net():
    return small_trained_net((6, 6, 3))


def test_at_least_as_strong_as_arts_autoattack(net):
    """As issue 38 asks of it on real models: no more than 0.3 points above ART's robust
    accuracy (APGD-CE, APGD-T and Square), and at most 0.5% of the images broken by ART and
    not by it (here: 0 of 128 on both counts)."""
    model, x, y = net
    ours = autoattack_keras.robust_accuracy(model, x, y, EPS, iterations=20, queries=200,
                                            verbose=False)
    art = autoattack.robust_accuracy(model, x, y, EPS, iterations=20, queries=200,
                                     verbose=False, seed=0)
    clean = np.argmax(np.asarray(model(x)), -1) == y
    assert 0 < ours["robust"].sum() < clean.sum()  # something to break, and broken
    assert not np.any(ours["robust"] & ~clean)
    print(f"robust: ours {ours['robust'].sum()}, ART's {art['robust'].sum()}, clean "
          f"{clean.sum()} of {len(y)}")
    assert ours["accuracy"] <= art["accuracy"] + 0.003, (ours, art)
    assert np.sum(ours["robust"] & ~art["robust"]) == 0
    # Each attack only lowers it; the last is the result.
    accs = [ours["after"][name] for name in autoattack_keras.ATTACKS]
    assert accs == sorted(accs, reverse=True) and accs[-1] == ours["accuracy"]


def test_a_padded_last_batch_counts_only_its_images(net):
    model, x, y = net
    # FAB-T is deterministic: any batching gives the same images broken.
    whole = autoattack_keras.robust_accuracy(model, x[:20], y[:20], EPS, batch_size=20,
                                             attacks_run=("fab-t",), iterations=10,
                                             verbose=False)
    padded = autoattack_keras.robust_accuracy(model, x[:20], y[:20], EPS, batch_size=7,
                                              attacks_run=("fab-t",), iterations=10,
                                              verbose=False)
    assert len(padded["robust"]) == 20
    assert np.array_equal(whole["robust"], padded["robust"])
    assert 0 < whole["robust"].sum() < 20


def test_seeded(net):
    model, x, y = net
    kwargs = dict(attacks_run=("apgd-ce", "square"), iterations=5, queries=30, verbose=False)
    a = autoattack_keras.robust_accuracy(model, x, y, 12 / 255, seed=1, **kwargs)
    b = autoattack_keras.robust_accuracy(model, x, y, 12 / 255, seed=1, **kwargs)
    assert np.array_equal(a["robust"], b["robust"])


def test_unknown_attacks_are_refused():
    with pytest.raises(ValueError, match="Unknown attacks"):
        autoattack_keras.robust_accuracy(None, np.zeros((1, 2, 2, 3)), [0], EPS,
                                         attacks_run=("deepfool",))
