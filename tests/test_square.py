"""Tests of sparta_tf.square (Square of AutoAttack in keras.ops), on TensorFlow.

Its schedule is held to the paper's, a step to what one step may change (one square of the
given side, per channel at x - eps or x + eps, kept only if the margin fell), and its
strength to ART's Square on a small trained network. The JAX side runs in
`tests/jax_checks_attacks.py`.
"""

import math

import keras
import numpy as np
import pytest

from conftest import small_trained_net
from sparta_tf import square

EPS = 8 / 255


def test_square_sizes_follow_the_schedule():
    sizes = square.square_sizes(10000, 0.8, 32, 32)
    assert len(sizes) == 9999
    assert sizes[0] == round(math.sqrt(0.8 * 1024)) == 29  # query 1
    assert sizes[9] == 29 and sizes[10] == round(math.sqrt(0.4 * 1024))  # halved after 10
    assert sizes[-1] == round(math.sqrt(0.8 / 512 * 1024))  # p_init / 2**9 at the end
    # Scaled to 5,000 queries: the halvings come at half the query.
    assert square.square_sizes(5000, 0.8, 32, 32)[:6] == [29] * 5 + [round(math.sqrt(409.6))]
    assert min(square.square_sizes(5000, 0.8, 4, 4)) >= 1


def _linear(weights):
    inputs = keras.Input((6, 6, 3))
    dense = keras.layers.Dense(weights.shape[1], use_bias=False)
    model = keras.Model(inputs, dense(keras.layers.Flatten()(inputs)))
    dense.set_weights([weights])
    return model


def test_one_step_changes_one_square_and_only_if_the_margin_falls():
    rng = np.random.default_rng(0)
    weights = rng.normal(0, 1, (108, 5)).astype(np.float32)
    model = _linear(weights)
    x = rng.uniform(0.1, 0.9, (64, 6, 6, 3)).astype(np.float32)  # no pixel clipped
    y = np.argmax(x.reshape(64, -1) @ weights, axis=1).astype(np.int32)
    stripes = np.asarray(square.Square(EPS, queries=1)(model, x, y, seed=[1, 2]))
    after = np.asarray(square.Square(EPS, queries=2)(model, x, y, seed=[1, 2]))
    # The stripes: every pixel at x +- eps, one sign per column and channel.
    delta = np.round((stripes - x) / EPS).astype(int)
    assert np.all(np.abs(delta) == 1) and np.all(delta == delta[:, :1])

    def m(v):
        z = v.reshape(len(v), -1) @ weights
        top_other = np.max(np.where(np.eye(5)[y] > 0, -np.inf, z), axis=1)
        return z[np.arange(len(v)), y] - top_other

    side = square.square_sizes(2, 0.8, 6, 6)[0]
    changed = np.any(after != stripes, axis=3)
    moved = changed.any(axis=(1, 2))
    assert 0 < moved.sum() < 64
    for i in np.flatnonzero(moved):
        rows, cols = np.flatnonzero(changed[i].any(1)), np.flatnonzero(changed[i].any(0))
        assert len(rows) <= side and len(cols) <= side  # within one square of that side
        assert np.allclose(np.abs(after[i] - x[i]), EPS, atol=1e-6)  # still at a corner
    # A change is kept only where it lowered the margin of an unbroken image.
    assert np.all(m(after)[moved] < m(stripes)[moved])
    assert np.all(m(stripes)[moved] > 0)


def test_seeded_and_in_the_ball():
    rng = np.random.default_rng(1)
    model = _linear(rng.normal(0, 1, (108, 5)).astype(np.float32))
    x = rng.uniform(0, 1, (8, 6, 6, 3)).astype(np.float32)
    y = np.zeros(8, np.int32)
    attack = square.Square(EPS, queries=20)
    a, b = (np.asarray(attack(model, x, y, seed=[3, 4])) for _ in range(2))
    c = np.asarray(attack(model, x, y, seed=[3, 5]))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert np.abs(a - x).max() <= EPS + 1e-6 and a.min() >= 0 and a.max() <= 1


def test_bad_arguments_are_refused():
    for kwargs in (dict(eps=-1), dict(eps=math.inf), dict(eps=EPS, queries=0),
                   dict(eps=EPS, p_init=0), dict(eps=EPS, p_init=1.5)):
        with pytest.raises(ValueError):
            square.Square(**kwargs)


def test_about_as_strong_as_arts_square():
    """On a small trained network, Square leaves about as many examples robust as ART's
    Square with the same queries (random search: within 6 of 128)."""
    from art.attacks.evasion import SquareAttack
    from art.estimators.classification import TensorFlowV2Classifier

    model, x, y = small_trained_net((6, 6, 3))
    eps = 4 / 255
    ours = np.asarray(square.Square(eps, queries=300)(model, x, y, seed=[0, 1]))
    ours_robust = np.argmax(model.predict(ours, verbose=0), -1) == y
    classifier = TensorFlowV2Classifier(model, nb_classes=4, input_shape=(6, 6, 3),
                                        clip_values=(0.0, 1.0))
    np.random.seed(0)
    art = SquareAttack(classifier, norm=np.inf, eps=eps, max_iter=300, p_init=0.8,
                       nb_restarts=1, batch_size=128, verbose=False)
    art_robust = np.argmax(model.predict(art.generate(x, np.eye(4)[y]), verbose=0), -1) == y
    clean = np.argmax(model.predict(x, verbose=0), -1) == y
    assert clean.mean() > 0.6
    assert ours_robust.sum() <= art_robust.sum() + 6, (ours_robust.sum(), art_robust.sum())
    assert ours_robust.sum() < clean.sum()
