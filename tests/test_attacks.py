"""Tests of sparta_tf.attacks: the in-graph L-inf PGD and FGSM.

Tiny models (a few conv layers on 8x8x3 images: conftest.conv_model) keep this file
fast on 2 CPU cores. Labels are the model's own clean predictions, so clean
accuracy is 100% and any drop is the attack's doing.
"""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import conv_model, jax_without_tensorflow, needs_jax
from sparta_tf import layers
from sparta_tf.attacks import PGD, fgsm

SHAPE = (8, 8, 3)
EPS = 8 / 255


def _linear_model(classes, seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input(SHAPE)
    logits = keras.layers.Dense(classes)(keras.layers.Flatten()(inputs))
    return keras.Model(inputs, logits)


def _data(model, n=16, seed=0):
    """Pixels in [0, 1] (some exactly 0 or 1) and the model's own labels."""
    x = np.random.default_rng(seed).uniform(-0.1, 1.1, size=(n,) + SHAPE)
    x = tf.constant(np.clip(x, 0, 1), tf.float32)
    y = tf.argmax(model(x), axis=-1)
    return x, y


def _accuracy(model, x, y):
    pred = tf.argmax(model(x), axis=-1)
    return float(tf.reduce_mean(tf.cast(pred == tf.cast(y, pred.dtype), tf.float32)))


def _ce(model, x, y):
    return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=model(x)).numpy()


def _margin(model, x, y):
    z = model(x).numpy()
    y = np.asarray(y)
    true = z[np.arange(len(y)), y]
    z[np.arange(len(y)), y] = -np.inf
    return z.max(axis=1) - true


def _assert_valid(x_adv, x, eps):
    assert x_adv.dtype == x.dtype
    assert x_adv.shape == x.shape
    x_adv, x = np.asarray(x_adv, np.float64), np.asarray(x, np.float64)
    assert np.abs(x_adv - x).max() <= eps + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1


# --- arguments ---------------------------------------------------------------

@pytest.mark.parametrize("kwargs,name", [
    (dict(eps=-0.1), "eps"),
    (dict(eps=0.1, steps=0), "steps"),
    (dict(eps=0.1, steps=2.0), "steps"),
    (dict(eps=0.1, steps=True), "steps"),
    (dict(eps=0.1, restarts=0), "restarts"),
    (dict(eps=0.1, step_size=0.0), "step_size"),
    (dict(eps=0.1, step_size=-0.01), "step_size"),
    (dict(eps=0.1, loss="l2"), "loss"),
])
def test_bad_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        PGD(**kwargs)


def test_defaults_and_fgsm():
    attack = PGD(EPS, steps=10)
    assert attack.step_size == pytest.approx(2.5 * EPS / 10)
    assert attack.random_start and attack.restarts == 1 and attack.loss == "ce"
    assert attack.training is False
    assert PGD(EPS, steps=np.int64(3), restarts=np.int32(2)).steps == 3
    one = fgsm(EPS, loss="cw")
    assert (one.steps, one.step_size, one.random_start, one.loss) == (1, EPS, False, "cw")


# --- the output --------------------------------------------------------------

@pytest.mark.parametrize("dtype", [tf.float32, tf.float64])
def test_output_in_ball_and_range_dtype_and_shape_kept(dtype):
    model = conv_model()
    x, y = _data(model)
    x = tf.cast(x, dtype)
    eps = 0.1
    x_adv = PGD(eps, steps=3, restarts=2)(model, x, y)
    _assert_valid(x_adv, x, eps)
    # It moved: most pixels sit on the sphere or at a clip bound.
    assert np.abs(np.asarray(x_adv - x)).mean() > eps / 2


def test_eps_zero_returns_x():
    model = conv_model()
    x, y = _data(model)
    for attack in (PGD(0.0), PGD(0, steps=5, step_size=0.01), fgsm(0)):
        np.testing.assert_array_equal(attack(model, x, y), x)


def test_output_is_stop_gradiented():
    model = conv_model()
    x, y = _data(model, n=4)
    with tf.GradientTape() as tape:
        tape.watch(x)
        x_adv = PGD(EPS, steps=2)(model, x, y)
        total = tf.reduce_sum(x_adv)
    assert tape.gradient(total, x) is None


# --- it attacks --------------------------------------------------------------

def test_pgd_lowers_accuracy_and_raises_loss():
    model = conv_model(activation="sparta")
    x, y = _data(model)
    seed = tf.constant([3, 4], tf.int64)
    x_few = PGD(EPS, steps=3)(model, x, y, seed=seed)
    x_many = PGD(EPS, steps=12)(model, x, y, seed=seed)
    clean, few, many = (_ce(model, v, y) for v in (x, x_few, x_many))
    assert _accuracy(model, x, y) == 1.0
    assert _accuracy(model, x_many, y) <= 0.5
    assert np.all(few > clean) and few.mean() > clean.mean() + 0.03
    # More steps (same start) never do much worse than fewer.
    assert many.mean() >= few.mean() - 1e-3
    assert _accuracy(model, x_many, y) <= _accuracy(model, x_few, y) + 1 / len(y)


def test_restarts_keep_the_first_misclassified():
    model = conv_model()
    x, y = _data(model, n=16, seed=1)
    seed = tf.constant([5, 6], tf.int32)
    eps = 2 / 255   # small: some but not all examples fall
    one = PGD(eps, steps=3)(model, x, y, seed=seed)
    three = PGD(eps, steps=3, restarts=3)(model, x, y, seed=seed)
    _assert_valid(three, x, eps)
    wrong_one = (tf.argmax(model(one), -1) != y).numpy()
    wrong_three = (tf.argmax(model(three), -1) != y).numpy()
    assert 0 < wrong_one.sum() < len(y)
    # Restart 0 of the 3 is the single run (same seed), and a success is kept.
    assert np.all(wrong_three[wrong_one])
    np.testing.assert_array_equal(np.asarray(three)[wrong_one], np.asarray(one)[wrong_one])
    assert wrong_three.sum() >= wrong_one.sum()


def test_fgsm_closed_form_two_class_linear():
    # Two classes, logits z = W^T x + b: d CE / dx = p_other * (w_other - w_y),
    # so sign(grad) = sign(w_other - w_y) whatever the probabilities.
    model = _linear_model(classes=2)
    x, y = _data(model)
    y = tf.constant(np.arange(16) % 2)          # both labels, right and wrong
    w = model.layers[-1].kernel.numpy()        # [D, 2]
    yv = y.numpy()
    direction = np.sign(w[:, 1 - yv] - w[:, yv]).T.reshape((-1,) + SHAPE)
    eps = 0.1
    expected = np.clip(x.numpy() + eps * direction, 0, 1)
    np.testing.assert_allclose(fgsm(eps)(model, x, y), expected, atol=1e-7)


def test_fgsm_closed_form_cw_linear():
    # CW margin z_j* - z_y with j* the best other class: grad = w_j* - w_y.
    model = _linear_model(classes=5, seed=1)
    x, _ = _data(model)
    y = tf.constant(np.arange(16) % 5)
    z = model(x).numpy()
    yv = y.numpy()
    z[np.arange(16), yv] = -np.inf
    other = z.argmax(axis=1)
    w = model.layers[-1].kernel.numpy()
    direction = np.sign(w[:, other] - w[:, yv]).T.reshape((-1,) + SHAPE)
    eps = 0.05
    expected = np.clip(x.numpy() + eps * direction, 0, 1)
    np.testing.assert_allclose(fgsm(eps, loss="cw")(model, x, y), expected, atol=1e-7)


def test_fgsm_is_one_manual_gradient_sign_step():
    model = conv_model(activation="sparta")
    x, y = _data(model)
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(
            labels=y, logits=model(x, training=False)))
    expected = tf.clip_by_value(x + EPS * tf.sign(tape.gradient(loss, x)), 0, 1)
    np.testing.assert_allclose(fgsm(EPS)(model, x, y), expected, atol=1e-7)


def test_cw_loss_raises_the_margin():
    model = conv_model()
    x, y = _data(model)
    before = _margin(model, x, y)
    x_adv = PGD(EPS, steps=10, loss="cw", random_start=False)(model, x, y)
    _assert_valid(x_adv, x, EPS)
    after = _margin(model, x_adv, y)
    assert np.all(after >= before - 1e-5)
    assert np.mean(after > before + 1e-3) > 0.9 and after.mean() > before.mean() + 0.05
    assert _accuracy(model, x_adv, y) < 1.0


def test_mixed_float16_model():
    model = conv_model(dtype="mixed_float16")
    x, y = _data(model)
    assert model(x).dtype == tf.float16
    x_adv = PGD(EPS, steps=3)(model, x, y, seed=tf.constant([0, 1], tf.int64))
    _assert_valid(x_adv, x, EPS)
    assert _ce(model, x_adv, y).mean() > _ce(model, x, y).mean()


# --- seeds, graphs, strategies ------------------------------------------------

def test_seed_tensor_is_deterministic():
    model = conv_model()
    x, y = _data(model, n=8)
    attack = PGD(EPS, steps=2)
    a = attack(model, x, y, seed=tf.constant([1, 2], tf.int64))
    b = attack(model, x, y, seed=tf.constant([1, 2], tf.int64))
    c = attack(model, x, y, seed=tf.constant([1, 2], tf.int32))
    d = attack(model, x, y, seed=tf.constant([1, 3], tf.int64))
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)
    assert np.abs(np.asarray(a - d)).max() > 0
    # The start itself differs: one step is too short to cover the ball.
    start = PGD(EPS, steps=1, step_size=1e-4)
    s1 = start(model, x, y, seed=tf.constant([1, 2], tf.int64)) - x
    s2 = start(model, x, y, seed=tf.constant([1, 3], tf.int64)) - x
    assert np.mean(np.abs(np.asarray(s1 - s2)) > 1e-3) > 0.5


def test_inside_tf_function_matches_eager():
    model = conv_model(activation="sparta")
    x, y = _data(model, n=8)
    attack = PGD(EPS, steps=4)
    graph = tf.function(attack.__call__)
    seed = tf.constant([7, 8], tf.int64)
    eager = attack(model, x, y, seed=seed)
    g1 = graph(model, x, y, seed=seed)
    g2 = graph(model, x, y, seed=tf.constant([7, 8], tf.int64))
    _assert_valid(g1, x, EPS)
    np.testing.assert_array_equal(g1, g2)
    # The same computation; graph rewrites may flip a rare near-zero sign.
    assert np.mean(np.abs(np.asarray(g1 - eager)) > 1e-6) < 0.01
    # seed=None inside a graph works too.
    _assert_valid(tf.function(lambda x, y: attack(model, x, y))(x, y), x, EPS)


class AdvModel(keras.Model):
    """A model whose compiled train_step trains on PGD examples (Madry AT)."""

    def __init__(self):
        super().__init__(name="adv_model")
        self.conv = keras.layers.Conv2D(4, 3, padding="same", activation="relu")
        self.flat = keras.layers.Flatten()
        self.dense = keras.layers.Dense(10)
        self.attack = PGD(EPS, steps=3)

    def call(self, x, training=False):
        return self.dense(self.flat(self.conv(x)))

    def train_step(self, data):
        x, y = data
        seed = tf.stack([tf.constant(11, tf.int64), tf.cast(self.optimizer.iterations, tf.int64)])
        x_adv = self.attack(self, x, y, seed=seed)
        with tf.GradientTape() as tape:
            loss = self.compute_loss(x=x_adv, y=y, y_pred=self(x_adv, training=True))
        grads = tape.gradient(loss, self.trainable_variables)
        self.optimizer.apply(grads, self.trainable_variables)
        return {"loss": loss,
                "linf": tf.reduce_max(tf.abs(x_adv - x)),
                "lo": tf.reduce_min(x_adv), "hi": tf.reduce_max(x_adv)}


def test_inside_compiled_keras_train_step():
    keras.utils.set_random_seed(0)
    model = AdvModel()
    model.compile(optimizer="sgd",
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  jit_compile=False)
    x = np.random.default_rng(0).uniform(size=(16,) + SHAPE).astype("float32")
    y = np.arange(16) % 10
    logs = model.fit(x, y, batch_size=8, epochs=1, verbose=0).history
    assert np.isfinite(logs["loss"][-1])
    assert EPS / 2 < logs["linf"][-1] <= EPS + 1e-6
    assert logs["lo"][-1] >= 0 and logs["hi"][-1] <= 1
    assert int(model.optimizer.iterations) == 2


_MIRRORED = textwrap.dedent("""
    import json
    import numpy as np
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras
    from sparta_tf import layers
    from sparta_tf.attacks import PGD

    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        keras.utils.set_random_seed(0)
        inputs = keras.Input((8, 8, 3))
        h = layers.Sparta()(keras.layers.Conv2D(4, 3, padding="same")(inputs))
        model = keras.Model(inputs, keras.layers.Dense(10)(keras.layers.Flatten()(h)))
    x = np.random.default_rng(0).uniform(size=(8, 8, 8, 3)).astype("float32")
    y = np.argmax(model(x).numpy(), axis=1)
    attack = PGD(8 / 255, steps=3)
    seed = tf.constant([1, 2], tf.int64)
    dist = iter(strategy.experimental_distribute_dataset(
        tf.data.Dataset.from_tensor_slices((x, y)).batch(8)))

    @tf.function
    def step(batch):
        def replica(x, y):
            return x, attack(model, x, y, seed=seed)
        return strategy.run(replica, args=batch)

    xs, advs = step(next(dist))
    xs = [t.numpy() for t in strategy.experimental_local_results(xs)]
    advs = [t.numpy() for t in strategy.experimental_local_results(advs)]
    # Each replica's result against the same attack run eagerly on its half.
    mismatch = [float(np.mean(np.abs(a - attack(model, xi, np.argmax(model(xi).numpy(), 1),
                                                 seed=seed).numpy()) > 1e-6))
                for xi, a in zip(xs, advs)]
    x_all, adv_all = np.concatenate(xs), np.concatenate(advs)
    print("RESULT" + json.dumps({
        "replicas": strategy.num_replicas_in_sync,
        "sizes": [len(v) for v in xs],
        "linf": float(np.abs(adv_all - x_all).max()),
        "lo": float(adv_all.min()), "hi": float(adv_all.max()),
        "mismatch": mismatch,
    }))
""")


def test_under_mirrored_strategy_two_cpus():
    # Logical devices must be set before TF initialises: do it in a subprocess.
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    out = subprocess.run([sys.executable, "-c", _MIRRORED], capture_output=True, text=True,
                         env=env, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    line = [l for l in out.stdout.splitlines() if l.startswith("RESULT")][-1]
    result = json.loads(line[len("RESULT"):])
    assert result["replicas"] == 2 and result["sizes"] == [4, 4]
    assert EPS / 2 < result["linf"] <= EPS + 1e-6
    assert result["lo"] >= 0 and result["hi"] <= 1
    assert max(result["mismatch"]) < 0.01


# --- the training flag --------------------------------------------------------

_SEEN = []


class _RecordTraining(keras.layers.Layer):
    """Identity that records the `training` flag it is called with."""

    def call(self, x, training=None):
        _SEEN.append(training)
        return x


@pytest.mark.parametrize("training", [False, True])
def test_training_flag_is_passed_to_the_model(training):
    keras.utils.set_random_seed(0)
    inputs = keras.Input(SHAPE)
    h = keras.layers.Dropout(0.5)(_RecordTraining()(inputs))
    model = keras.Model(inputs, keras.layers.Dense(10)(keras.layers.Flatten()(h)))
    x, y = _data(model, n=8)
    _SEEN.clear()
    attack = PGD(EPS, steps=2, random_start=False, training=training)
    x_adv = attack(model, x, y)
    assert _SEEN and set(_SEEN) == {training}
    # With dropout active the gradient (and so x_adv) is that of a thinned net.
    differs = np.abs(np.asarray(x_adv - PGD(EPS, steps=2, random_start=False)(model, x, y)))
    assert (differs.max() > 0) == training


# --- cross-checks -------------------------------------------------------------

def _cleverhans_pgd(model, x, y, eps, steps, step_size, rand_init):
    from cleverhans.tf2.attacks.projected_gradient_descent import projected_gradient_descent
    return projected_gradient_descent(
        lambda v: model(v, training=False), x, eps, step_size, steps, np.inf,
        clip_min=0.0, clip_max=1.0, y=y, rand_init=rand_init)


def test_cross_check_with_cleverhans():
    model = conv_model(activation="sparta", seed=3)
    x, y = _data(model, n=128, seed=3)
    eps, steps = 4 / 255, 10
    step_size = 2.5 * eps / steps
    ours = PGD(eps, steps=steps, random_start=False)(model, x, y)
    theirs = _cleverhans_pgd(model, x, y, eps, steps, step_size, rand_init=False)
    acc_ours, acc_theirs = _accuracy(model, ours, y), _accuracy(model, theirs, y)
    pixels = np.mean(np.abs(np.asarray(ours - theirs)) > 1e-6)
    tf.random.set_seed(0)
    ours_r = PGD(eps, steps=steps)(model, x, y, seed=tf.constant([0, 0], tf.int64))
    theirs_r = _cleverhans_pgd(model, x, y, eps, steps, step_size, rand_init=True)
    acc_ours_r, acc_theirs_r = _accuracy(model, ours_r, y), _accuracy(model, theirs_r, y)
    print(f"cleverhans cross-check: no random start: ours {acc_ours:.4f} cleverhans "
          f"{acc_theirs:.4f} pixels differing {pixels:.5f}; random start: ours "
          f"{acc_ours_r:.4f} cleverhans {acc_theirs_r:.4f}")
    # Not trivially robust or broken, so the comparison means something.
    assert 0.2 < acc_ours < 0.8
    # Same start: the same algorithm, so (nearly) the same points.
    assert pixels < 0.001
    assert abs(acc_ours - acc_theirs) <= 1 / 128
    # Random starts differ; the robust accuracies agree within a few examples.
    assert abs(acc_ours_r - acc_theirs_r) <= 0.05


def test_custom_gradient_and_autodiff_give_the_same_attack():
    exact = conv_model(activation="sparta", seed=4, use_custom_gradient=True)
    auto = conv_model(activation="sparta", seed=5, use_custom_gradient=False)
    auto.set_weights(exact.get_weights())
    x, y = _data(exact, n=16, seed=4)
    attack = PGD(EPS, steps=5, random_start=False)
    np.testing.assert_allclose(attack(exact, x, y), attack(auto, x, y), atol=1e-6)


@pytest.mark.parametrize("loss", ["ce", "cw"])
def test_loss_is_float32_for_float16_logits(loss):
    from sparta_tf.attacks import _loss
    logits = tf.constant([[1.0, 2.0, -1.0], [0.5, 0.0, 3.0]], tf.float16)
    values = _loss(logits, tf.constant([1, 0], tf.int64), loss)
    assert values.dtype == tf.float32
    expected = ([-np.log(np.exp(2) / np.exp([1, 2, -1]).sum()),
                 -np.log(np.exp(0.5) / np.exp([0.5, 0, 3]).sum())] if loss == "ce"
                else [1.0 - 2.0, 3.0 - 0.5])
    np.testing.assert_allclose(values, expected, rtol=1e-3)


# --- JAX ----------------------------------------------------------------------

_JAX_CHECKS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "jax_checks_attacks.py")


@needs_jax
def test_pgd_on_jax(tmp_path):
    # The reference on TensorFlow (on the CPU, as the JAX side: no TF32 on a GPU).
    spec = importlib.util.spec_from_file_location("jax_checks_attacks", _JAX_CHECKS)
    checks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(checks)
    with tf.device("/cpu:0"):
        checks.reference(str(tmp_path))
    # The checks on JAX, with TensorFlow unimportable, in one subprocess.
    env = jax_without_tensorflow(tmp_path / "blocked")
    out = subprocess.run([sys.executable, _JAX_CHECKS, str(tmp_path)], capture_output=True,
                         text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    line = [l for l in out.stdout.splitlines() if l.startswith("RESULT")][-1]
    r = json.loads(line[len("RESULT"):])
    print(json.dumps(r, indent=1))
    assert r["backend"] == "jax" and not r["tensorflow_imported"]
    # In the ball and the pixel range, dtype and shape kept, and it attacks.
    assert r["type_is_jax"] and r["dtype"] == "float32" and r["shape_kept"]
    assert EPS / 2 < r["linf"] <= EPS + 1e-6 and r["low"] >= 0 and r["high"] <= 1
    assert r["moved"] > EPS / 2 and r["eps_zero_is_x"]
    assert r["clean_accuracy"] == 1.0 and r["adv_accuracy"] < 0.9
    assert r["loss_rose_fraction"] > 0.9
    # Deterministic for a seed, in every form; another seed, another start.
    assert r["same_seed_equal"] and r["key_equal"] and r["other_seed_differs"] > 1e-3
    # Inside jax.jit over stateless_call: the eager result.
    assert r["jit_equal_fraction"] >= 0.999 and r["jit_linf"] <= EPS + 1e-6
    # Restarts keep each example's first fooling run, else the last run.
    assert 0 < r["restart_fooled"][0] < r["restart_any_fooled"]  # the runs differ
    assert r["restart_is_first_fooling"] and r["restart0_is_single_run"]
    assert r["restart_chosen_fooled"] == r["restart_any_fooled"] >= max(r["restart_fooled"])
    # The losses: float32 for float16 logits, and their values.
    assert r["loss_dtypes"] == ["float32", "float32"]
    np.testing.assert_allclose(r["cw_values"], [1.0 - 2.0, 3.0 - 0.5], rtol=1e-3)
    np.testing.assert_allclose(r["ce_values"], [-np.log(np.exp(2) / np.exp([1, 2, -1]).sum()),
                                                -np.log(np.exp(0.5) / np.exp([0.5, 0, 3]).sum())],
                               rtol=1e-3)
    # The same weights and batch without a random start: TensorFlow's points, but for a
    # rare sign flip of a gradient component near 0; and the same losses.
    for name in ("pgd_ce", "pgd_cw", "fgsm"):
        assert r[name]["equal_fraction"] >= 0.999, (name, r[name])
        assert r[name]["loss_max_rel_diff"] < 1e-3, (name, r[name])
    # APGD (CE and targeted DLR) and FAB-T, eagerly and under jax.jit: TensorFlow's points,
    # but where a gradient's sign flips near 0 and the path goes on from there; as strong.
    for name in ("apgd_ce_eager", "apgd_ce_jit", "apgd_t_eager", "apgd_t_jit", "fab_t_eager",
                 "fab_t_jit"):
        assert r[name]["equal_fraction"] >= 0.9, (name, r[name])
        assert r[name]["linf"] <= EPS + 1e-6, (name, r[name])
        assert abs(r[name]["accuracy"] - r[name]["tf_accuracy"]) <= 0.05, (name, r[name])
    # Square: seeded, the same under jax.jit, in the ball, about as strong as on TensorFlow
    # (other random squares: within 10 of the 64 images).
    sq = r["square"]
    assert sq["jit_equal_fraction"] >= 0.999 and sq["same_seed_equal"], sq
    assert sq["linf"] <= EPS + 1e-6 and sq["accuracy"] < 1.0, sq
    assert abs(sq["accuracy"] - sq["tf_accuracy"]) <= 10 / 64, sq
    # The AutoAttack driver (sparta_tf.autoattack_keras): TensorFlow's robust images, but
    # for a few that Square's other squares decide.
    aa = r["autoattack"]
    assert 0 < aa["robust"] < 64 and aa["differ"] <= 4, aa
