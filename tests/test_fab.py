"""Tests of sparta_tf.fab (FAB-T of AutoAttack in keras.ops), on TensorFlow.

Its projection is held to hand computations; on a linear model, whose boundary the
linearisation gives exactly, FAB must come within a few percent of the smallest L-inf
perturbation, which is known in closed form. ART has no FAB to compare with; the JAX side
runs in `tests/jax_checks_attacks.py`.
"""

import math

import keras
import numpy as np
import pytest

from sparta_tf import fab


def _project(p, w, c):
    return np.asarray(fab.project(np.asarray(p, np.float32), np.asarray(w, np.float32),
                                  np.asarray(c, np.float32)))


def test_projection_by_hand():
    # Room everywhere: the same step t on each coordinate, w . d = c.
    np.testing.assert_allclose(_project([[0.5, 0.5]], [[1, 1]], [0.4]), [[0.2, 0.2]], atol=1e-6)
    # The first coordinate has room 0.05 upwards only: it stops there, the other goes on.
    np.testing.assert_allclose(_project([[0.95, 0.5]], [[1, 1]], [0.4]), [[0.05, 0.35]],
                               atol=1e-6)
    # Signs: a negative weight steps down, a negative c reverses both; a zero weight stays.
    np.testing.assert_allclose(_project([[0.5, 0.5, 0.5]], [[2, -1, 0]], [0.3]),
                               [[0.1, -0.1, 0.0]], atol=1e-6)
    np.testing.assert_allclose(_project([[0.5, 0.5]], [[2, -1]], [-0.3]), [[-0.1, 0.1]],
                               atol=1e-6)
    # Out of reach inside the box: the largest step there is.
    np.testing.assert_allclose(_project([[0.25, 0.5]], [[1, -1]], [10.0]), [[0.75, -0.5]],
                               atol=1e-6)


def test_the_projection_is_the_smallest_step():
    rng = np.random.default_rng(0)
    p = rng.uniform(0, 1, (200, 12)).astype(np.float32)
    w = rng.normal(0, 1, (200, 12)).astype(np.float32)
    c = rng.normal(0, 0.5, 200).astype(np.float32)
    d = _project(p, w, c)
    assert np.all(p + d >= -1e-6) and np.all(p + d <= 1 + 1e-6)
    reached = np.abs((w * d).sum(1) - c) <= 1e-4 * np.maximum(1, np.abs(c))
    assert reached.mean() > 0.5
    # Any step at least 1e-3 smaller in L-inf falls short of c (the most it reaches).
    t = np.abs(d).max(1)[reached] - 1e-3
    room = np.where(np.sign(w) * np.sign(c)[:, None] > 0, 1 - p, p)[reached]
    best = (np.abs(w[reached]) * np.minimum(t[:, None], room)).sum(1)
    assert np.all(best < np.abs(c[reached]))


def _step(x_k, best, best_norm, flat=(0.3, 0.3)):
    """One `fab.step` on 2 pixels of a linear 2-class model, z = (0, v_1 + v_2 - 1), label 0
    (target 1), so g = v_1 + v_2 - 1 and grad g = (1, 1)."""
    def difference(v):
        g = keras.ops.sum(v, axis=-1) - 1.0
        return g, keras.ops.stack([keras.ops.zeros_like(g), g], axis=-1)

    state = [keras.ops.convert_to_tensor(np.asarray(v, np.float32))
             for v in ([x_k], [best], [best_norm])]
    out = fab.step(difference, keras.ops.convert_to_tensor(np.asarray([flat], np.float32)),
                   keras.ops.convert_to_tensor([0]), state)
    return [np.asarray(v)[0] for v in out]


def test_a_step_by_hand():
    # From x = (0.3, 0.3), g = -0.4: d_k = d_0 = (0.2, 0.2), alpha = min(0.5, 0.1), so
    # x + 1.05 d = (0.51, 0.51), misclassified at L-inf distance 0.21: the closest so far,
    # then 0.9 of the way back to x: 0.03 + 0.9 * 0.51 = 0.489.
    x_next, best, norm = _step([0.3, 0.3], [0.3, 0.3], np.inf)
    np.testing.assert_allclose(best, [0.51, 0.51], atol=1e-5)
    np.testing.assert_allclose(norm, 0.21, atol=1e-5)
    np.testing.assert_allclose(x_next, [0.489, 0.489], atol=1e-5)
    # A closer point was found before: it stays the closest.
    x_next, best, norm = _step([0.3, 0.3], [0.4, 0.45], 0.15)
    np.testing.assert_allclose(best, [0.4, 0.45], atol=1e-6)
    np.testing.assert_allclose(norm, 0.15, atol=1e-6)
    np.testing.assert_allclose(x_next, [0.489, 0.489], atol=1e-5)
    # From x_k = (0.3, 0.5) away from x: d_k = (0.1, 0.1), d_0 = (0.2, 0.2), alpha = 0.1:
    # 0.9 (x_k + 0.105) + 0.1 (x + 0.21) = (0.4155, 0.5955), wrong at distance 0.2955.
    x_next, best, norm = _step([0.3, 0.5], [0.3, 0.3], np.inf)
    np.testing.assert_allclose(best, [0.4155, 0.5955], atol=1e-5)
    np.testing.assert_allclose(norm, 0.2955, atol=1e-5)
    np.testing.assert_allclose(x_next, [0.40395, 0.56595], atol=1e-5)


def test_near_the_smallest_perturbation_of_a_linear_model():
    rng = np.random.default_rng(1)
    weights = rng.normal(0, 1, (27, 4)).astype(np.float32)
    inputs = keras.Input((3, 3, 3))
    dense = keras.layers.Dense(4, use_bias=False)
    model = keras.Model(inputs, dense(keras.layers.Flatten()(inputs)))
    dense.set_weights([weights])
    x = rng.uniform(0.2, 0.8, (32, 3, 3, 3)).astype(np.float32)
    z = x.reshape(32, -1) @ weights
    y = z.argmax(1).astype(np.int32)
    t = np.argsort(-z, axis=1)[:, 1]
    # The smallest L-inf step onto z_t = z_y: the projection of x itself (the model is linear).
    w = (weights[:, t] - weights[:, y]).T
    exact = np.abs(_project(x.reshape(32, -1), w, -(z[np.arange(32), t] - z[np.arange(32), y]))
                   ).max(1)
    # Two steps by hand, where the box is not in the way: x(1) = x + eta d (d: the exact
    # step) is misclassified, kept, and stepped back to x + s d, s = beta eta; from there
    # d_k = (1 - s) d and d_0 = d, so a = (1 - s) / (2 - s), and
    # x(2) = x + d ((1 - a) (s + eta (1 - s)) + a eta), closer than x(1) and still broken.
    s = fab.BETA * fab.ETA
    a = (1 - s) / (2 - s)
    ratio = (1 - a) * (s + fab.ETA * (1 - s)) + a * fab.ETA
    assert 1 < ratio < fab.ETA
    two = np.asarray(fab.FAB(eps=1.0, iterations=2)(model, x, y))
    free = exact * fab.ETA < 0.2  # no pixel leaves [0, 1]
    assert free.sum() >= 8
    np.testing.assert_allclose(np.abs(two - x).reshape(32, -1).max(1)[free] / exact[free],
                               ratio, rtol=1e-3)
    # More steps stay there, for every image: broken, and within 1% of the smallest step.
    x_adv = np.asarray(fab.FAB(eps=1.0, iterations=20)(model, x, y))
    norm = np.abs(x_adv - x).reshape(32, -1).max(1)
    assert np.all((x_adv.reshape(32, -1) @ weights).argmax(1) != y)
    assert np.all(norm >= exact * (1 - 1e-3)) and np.all(norm <= exact * 1.01), norm / exact
    # With a budget below what an image needs, it comes back unchanged.
    small = float(np.median(exact))
    kept = np.asarray(fab.FAB(eps=small, iterations=20)(model, x, y))
    unchanged = np.all(kept == x, axis=(1, 2, 3))
    assert np.array_equal(unchanged, norm > small)


def test_bad_arguments_are_refused():
    for kwargs in (dict(eps=0), dict(eps=math.nan), dict(eps=0.1, iterations=0),
                   dict(eps=0.1, target_rank=1)):
        with pytest.raises(ValueError):
            fab.FAB(**kwargs)
