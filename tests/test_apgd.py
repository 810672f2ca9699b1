"""Tests of sparta_tf.apgd (APGD of AutoAttack in keras.ops), on TensorFlow.

The steps are held to a NumPy computation of the paper's algorithm on a two-layer tanh
network (whose input gradient is written out by hand), with checkpoints where step sizes are
halved; the attack's strength to ART's APGD on a small network. The JAX side runs in
`tests/jax_checks_attacks.py` (`test_attacks.py::test_pgd_on_jax`).
"""

import math

import keras
import numpy as np
import pytest

from conftest import small_trained_net
from sparta_tf import apgd

EPS = 8 / 255


def test_checkpoints_follow_the_papers_formula():
    # p_0 = 0, p_1 = 0.22, p_(j+1) = p_j + max(p_j - p_(j-1) - 0.03, 0.06); w_j = ceil(p_j N).
    assert apgd.checkpoints(100) == [0, 22, 41, 57, 70, 80, 87, 93, 99]
    assert apgd.checkpoints(10) == [0, 3, 5, 6, 7, 8, 9, 10]
    assert apgd.checkpoints(1) == [0, 1]


def _linear(weights):
    """A Keras model whose logits are flatten(x) @ weights."""
    inputs = keras.Input((4, 4, 3))
    dense = keras.layers.Dense(weights.shape[1], use_bias=False)
    model = keras.Model(inputs, dense(keras.layers.Flatten()(inputs)))
    dense.set_weights([weights])
    return model


def _two_layers(w1, w2):
    """A Keras model whose logits are tanh(flatten(x) @ w1) @ w2."""
    inputs = keras.Input((4, 4, 3))
    hidden = keras.layers.Dense(w1.shape[1], activation="tanh", use_bias=False)
    out = keras.layers.Dense(w2.shape[1], use_bias=False)
    model = keras.Model(inputs, out(hidden(keras.layers.Flatten()(inputs))))
    hidden.set_weights([w1])
    out.set_weights([w2])
    return model


def _numpy_apgd(w1, w2, x, y, eps, iterations, loss, target=None):
    """APGD as the paper writes it, in NumPy (float32, as the attack), on the logits
    tanh(flatten(x) @ w1) @ w2.

    Returns the attack's result and how many step sizes were halved in all."""
    n, shape = len(x), x.shape
    lower, upper = np.maximum(x - eps, 0), np.minimum(x + eps, 1)
    rows = np.arange(n)

    def f_and_grad(v):
        h = np.tanh(v.reshape(n, -1) @ w1)
        z = h @ w2
        if loss == "ce":
            p = np.exp(z - z.max(1, keepdims=True))
            p /= p.sum(1, keepdims=True)
            value = -np.log(p[rows, y])
            dz = p.copy()
            dz[rows, y] -= 1
        else:  # targeted DLR: -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2)
            order = np.argsort(-z, axis=1)
            num = -(z[rows, y] - z[rows, target])
            den = z[rows, order[:, 0]] - (z[rows, order[:, 2]] + z[rows, order[:, 3]]) / 2
            value = num / den
            dz = np.zeros_like(z)
            dz[rows, y] -= 1 / den
            dz[rows, target] += 1 / den
            for col, coef in ((0, -1.0), (2, 0.5), (3, 0.5)):
                dz[rows, order[:, col]] += coef * num / den ** 2
        dx = ((dz @ w2.T) * (1 - h ** 2)) @ w1.T
        return value, dx.reshape(shape), z.argmax(1) != y

    checks = apgd.checkpoints(iterations)
    eta = np.full(n, 2 * eps, x.dtype)
    x_prev = x_cur = x.copy()
    f_cur, g, wrong = f_and_grad(x_cur)
    x_max, f_max, g_max = x_cur.copy(), f_cur.copy(), g.copy()
    x_found, found = x_cur.copy(), wrong.copy()
    rises, f_max_then, halved_then, halvings = np.zeros(n), f_max.copy(), np.zeros(n, bool), 0
    for t in range(1, iterations + 1):
        alpha = 1.0 if t == 1 else 0.75
        e = eta[:, None, None, None]
        z = np.clip(x_cur + e * np.sign(g), lower, upper)
        x_new = np.clip(x_cur + alpha * (z - x_cur) + (1 - alpha) * (x_cur - x_prev), lower,
                        upper)
        f_new, g_new, wrong = f_and_grad(x_new)
        x_found[wrong], found = x_new[wrong], found | wrong
        rises += f_new > f_cur
        better = f_new > f_max
        x_max[better], f_max[better], g_max[better] = x_new[better], f_new[better], g_new[better]
        x_prev, x_cur, f_cur, g = x_cur, x_new, f_new, g_new
        if t in checks[1:]:
            since = t - checks[checks.index(t) - 1]
            halve = (rises < 0.75 * since) | (~halved_then & (f_max <= f_max_then))
            eta[halve] /= 2
            x_cur, g, f_cur = x_cur.copy(), g.copy(), f_cur.copy()
            x_cur[halve], g[halve], f_cur[halve] = x_max[halve], g_max[halve], f_max[halve]
            rises[:], f_max_then, halved_then = 0, f_max.copy(), halve
            halvings += int(halve.sum())
    return np.where(found[:, None, None, None], x_found, x_max), halvings


@pytest.mark.parametrize("loss", ["ce", "dlr-targeted"])
def test_steps_match_a_numpy_computation_of_the_paper(loss):
    rng = np.random.default_rng(0)
    w1 = rng.normal(0, 1, (48, 64)).astype(np.float32)
    w2 = rng.normal(0, 1, (64, 10)).astype(np.float32)
    # A large ball, so that the gradient's signs turn along the path and momentum and the
    # step-size rule change where it goes (each of them, changed, moves most of the points).
    eps = 32 / 255
    x = rng.uniform(0, 1, (32, 4, 4, 3)).astype(np.float32)
    logits = np.tanh(x.reshape(32, -1) @ w1) @ w2
    y = logits.argmax(1).astype(np.int32)
    target = np.argsort(-logits, axis=1)[:, 2]  # the third highest logit: target_rank 3
    ours = np.asarray(apgd.APGD(eps, iterations=30, loss=loss, target_rank=3,
                                random_start=False)(_two_layers(w1, w2), x, y))
    expected, halvings = _numpy_apgd(w1, w2, x, y, np.float32(eps), 30, loss, target)
    # The rule was exercised: some step sizes halved, not every one at each of the 8 checks.
    assert 10 < halvings < 32 * 8
    # The same points, but where a gradient component near 0 flips its sign (the order of
    # float32 sums differs), and the path goes on from there.
    same = np.all(np.abs(ours - expected) <= 1e-6, axis=(1, 2, 3))
    assert same.mean() >= 0.9, same.mean()
    assert np.abs(ours - x).max() <= eps + 1e-6 and ours.min() >= 0 and ours.max() <= 1


def test_a_random_start_is_seeded_and_in_the_ball():
    rng = np.random.default_rng(1)
    weights = rng.normal(0, 1, (48, 10)).astype(np.float32)
    model = _linear(weights)
    x = rng.uniform(0, 1, (8, 4, 4, 3)).astype(np.float32)
    y = np.zeros(8, np.int32)
    attack = apgd.APGD(EPS, iterations=3)
    a, b = (np.asarray(attack(model, x, y, seed=np.array([3, 4]))) for _ in range(2))
    c = np.asarray(attack(model, x, y, seed=np.array([3, 5])))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert np.abs(a - x).max() <= EPS + 1e-6 and a.min() >= 0 and a.max() <= 1


def test_bad_arguments_are_refused():
    for kwargs in (dict(eps=0), dict(eps=math.nan), dict(eps=EPS, iterations=0),
                   dict(eps=EPS, loss="cw"), dict(eps=EPS, target_rank=1)):
        with pytest.raises(ValueError):
            apgd.APGD(**kwargs)
    with pytest.raises(ValueError, match="at least 4 classes"):
        model = _linear(np.ones((48, 3), np.float32))
        apgd.APGD(EPS, loss="dlr-targeted")(model, np.zeros((2, 4, 4, 3), np.float32),
                                            np.zeros(2, np.int32))


def test_at_least_as_strong_as_arts_apgd():
    """On a small trained network, APGD-CE leaves no more examples robust than ART's APGD-CE
    with the same budget (both 50 iterations, one run), give or take 2 of 128."""
    from art.attacks.evasion import AutoProjectedGradientDescent
    from art.estimators.classification import TensorFlowV2Classifier

    model, x, y = small_trained_net((4, 4, 3))
    eps = 4 / 255
    ours = np.asarray(apgd.APGD(eps, iterations=50)(model, x, y, seed=np.array([0, 1])))
    ours_robust = np.argmax(model.predict(ours, verbose=0), -1) == y
    classifier = TensorFlowV2Classifier(model, nb_classes=4, input_shape=(4, 4, 3),
                                        clip_values=(0.0, 1.0),
                                        loss_object=keras.losses.SparseCategoricalCrossentropy(
                                            from_logits=True))
    np.random.seed(0)
    art = AutoProjectedGradientDescent(classifier, norm=np.inf, eps=eps, eps_step=2 * eps,
                                       max_iter=50, nb_random_init=1, batch_size=128,
                                       loss_type="cross_entropy", verbose=False)
    theirs = art.generate(x, np.eye(4)[y])
    art_robust = np.argmax(model.predict(theirs, verbose=0), -1) == y
    clean = np.argmax(model.predict(x, verbose=0), -1) == y
    assert clean.mean() > 0.6  # it learned something to attack
    assert ours_robust.sum() <= art_robust.sum() + 2, (ours_robust.sum(), art_robust.sum())
    assert ours_robust.sum() < clean.sum()  # it breaks some
