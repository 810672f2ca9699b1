"""Checks of sparta_tf.attacks (PGD) and of AutoAttack's attacks (`sparta_tf.apgd`, `.fab`
and `.square`) on the JAX backend, run as one script (the import paid once).

`tests/test_attacks.py::test_pgd_on_jax` runs it with KERAS_BACKEND=jax and TensorFlow made
unimportable, after it has written, on TensorFlow, the tiny model's weights and PGD's result
on a batch into a folder (see `tiny_model` and `reference`). It prints one line `RESULT
{json}` of measurements; the test holds them to its bounds.

    KERAS_BACKEND=jax python tests/jax_checks_attacks.py FOLDER

Importable on either backend (no JAX at import), for `tiny_model` and `reference`.
"""

import json
import os
import sys

import keras
import numpy as np

SHAPE = (8, 8, 3)
EPS = 8 / 255
WEIGHTS = "tiny.weights.h5"
BATCH = "batch.npz"
CROSS_CHECKS = {  # name: PGD arguments, all without a random start
    "pgd_ce": dict(eps=EPS, steps=5, random_start=False),
    "pgd_cw": dict(eps=EPS, steps=5, random_start=False, loss="cw"),
    "fgsm": dict(eps=EPS, steps=1, step_size=EPS, random_start=False),
}
SQUARE_QUERIES = 100
AUTOATTACK_SIZES = dict(iterations=5, queries=20, verbose=False)
APGD_CHECKS = {  # name: APGD arguments (sparta_tf.apgd), all without a random start
    "apgd_ce": dict(eps=EPS, iterations=10, random_start=False),
    "apgd_t": dict(eps=EPS, iterations=10, loss="dlr-targeted", target_rank=3,
                   random_start=False),
}


def tiny_model(seed=0):
    """Conv2D -> ReLU -> global average pooling -> Dense logits, seeded weights."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input(SHAPE)
    h = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(inputs)
    h = keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="relu")(h)
    logits = keras.layers.Dense(10)(keras.layers.GlobalAveragePooling2D()(h))
    return keras.Model(inputs, logits)


def batch(n=64, seed=0):
    """Pixels in [0, 1] (some exactly 0 or 1)."""
    x = np.random.default_rng(seed).uniform(-0.1, 1.1, size=(n,) + SHAPE)
    return np.clip(x, 0, 1).astype(np.float32)


def reference(folder):
    """On TensorFlow: write the tiny model's weights, a batch, its labels (the model's own
    predictions), and for each of `CROSS_CHECKS` the adversarial batch and its per-example
    CE loss, into `folder`."""
    from sparta_tf.attacks import PGD  # pylint: disable=import-outside-toplevel

    model = tiny_model()
    x = batch()
    y = np.argmax(np.asarray(model(x)), axis=-1).astype(np.int32)
    model.save_weights(os.path.join(folder, WEIGHTS))
    arrays = {"x": x, "y": y}
    for name, kwargs in CROSS_CHECKS.items():
        x_adv = np.asarray(PGD(**kwargs)(model, x, y))
        arrays[name] = x_adv
        arrays[name + "_loss"] = _ce(model(x_adv), y)
    from sparta_tf.apgd import APGD  # pylint: disable=import-outside-toplevel
    for name, kwargs in APGD_CHECKS.items():
        arrays[name] = np.asarray(APGD(**kwargs)(model, x, y))
    from sparta_tf.fab import FAB  # pylint: disable=import-outside-toplevel
    arrays["fab_t"] = np.asarray(FAB(EPS, iterations=10)(model, x, y))
    from sparta_tf.square import Square  # pylint: disable=import-outside-toplevel
    arrays["square"] = np.asarray(Square(EPS, queries=SQUARE_QUERIES)(model, x, y, seed=[1, 2]))
    from sparta_tf import autoattack_keras  # pylint: disable=import-outside-toplevel
    arrays["autoattack_robust"] = autoattack_keras.robust_accuracy(
        model, x, y, EPS, batch_size=48, **AUTOATTACK_SIZES)["robust"]
    np.savez(os.path.join(folder, BATCH), **arrays)


def _ce(logits, y):
    return np.asarray(keras.ops.sparse_categorical_crossentropy(y, logits, from_logits=True))


def _accuracy(logits, y):
    return float(np.mean(np.argmax(np.asarray(logits), axis=-1) == y))


def main(folder):
    import jax  # pylint: disable=import-outside-toplevel
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

    from sparta_tf import attacks  # pylint: disable=import-outside-toplevel
    from sparta_tf.attacks import PGD  # pylint: disable=import-outside-toplevel

    result = {"backend": keras.backend.backend(),
              "tensorflow_imported": "tensorflow" in sys.modules}
    model = tiny_model(seed=1)  # other weights until the reference's are loaded
    model.load_weights(os.path.join(folder, WEIGHTS))
    ref = np.load(os.path.join(folder, BATCH))
    x, y = ref["x"], ref["y"]
    result["clean_accuracy"] = _accuracy(model(x), y)

    # Within eps and [0, 1], dtype and shape kept; it raises the loss.
    seed = np.array([1, 2], np.int64)
    x_adv = PGD(EPS, steps=10)(model, x, y, seed=seed)
    diff = np.asarray(x_adv, np.float64) - x
    result.update(
        type_is_jax=isinstance(x_adv, jax.Array), dtype=str(x_adv.dtype),
        shape_kept=tuple(x_adv.shape) == x.shape, linf=float(np.abs(diff).max()),
        low=float(np.min(x_adv)), high=float(np.max(x_adv)),
        moved=float(np.abs(diff).mean()),
        loss_rose_fraction=float(np.mean(_ce(model(x_adv), y) > _ce(model(x), y))),
        adv_accuracy=_accuracy(model(x_adv), y),
        eps_zero_is_x=bool(np.array_equal(PGD(0.0)(model, x, y), x)))

    # Deterministic for a seed: the same [2] seed (int64, int32 or a JAX array) or key gives
    # the same result, another seed another start.
    again = PGD(EPS, steps=10)(model, x, y, seed=jnp.array([1, 2], jnp.int32))
    other = PGD(EPS, steps=10)(model, x, y, seed=np.array([1, 3]))
    key = jax.random.key(7)
    keyed = [PGD(EPS, steps=2)(model, x, y, seed=key) for _ in range(2)]
    result.update(same_seed_equal=bool(np.array_equal(x_adv, again)),
                  other_seed_differs=float(np.abs(np.asarray(x_adv - other)).max()),
                  key_equal=bool(np.array_equal(*keyed)))

    # Under jax.jit with a pure logits_fn over stateless_call: the eager result.
    trainable = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]
    attack = PGD(EPS, steps=10)

    @jax.jit
    def jitted(trainable, non_trainable, x, y, seed):
        def logits_fn(v):
            logits, _ = model.stateless_call(trainable, non_trainable, v, training=False)
            return logits
        return attack(logits_fn, x, y, seed=seed)

    in_jit = jitted(trainable, non_trainable, x, y, jnp.asarray(seed, jnp.int32))
    result["jit_equal_fraction"] = float(np.mean(np.abs(np.asarray(in_jit - x_adv)) <= 1e-6))
    result["jit_linf"] = float(np.abs(np.asarray(in_jit) - x).max())

    # Restarts: per example the first run that fools the model, else the last run. One short
    # step, so that the random start decides which examples fall.
    short = dict(eps=EPS, steps=1, step_size=EPS / 4)
    three = PGD(**short, restarts=3)
    seed = np.array([5, 6])
    chosen = np.asarray(three(model, x, y, seed=seed))
    # pylint: disable=protected-access
    backend = attacks.backend_module()
    base, forward = backend.seed(seed), attacks.forward_of(model, False)
    runs = [np.asarray(three._run(backend, forward, jnp.asarray(x), jnp.asarray(y),
                                  backend.fold_in(base, r))) for r in range(3)]
    fooled = [np.argmax(np.asarray(model(run)), axis=-1) != y for run in runs]
    expected = runs[2].copy()
    for r in (1, 0):  # the earliest run that fools wins
        expected[fooled[r]] = runs[r][fooled[r]]
    single = np.asarray(PGD(**short)(model, x, y, seed=seed))
    result.update(
        restart_fooled=[int(f.sum()) for f in fooled],
        restart_any_fooled=int(np.any(fooled, axis=0).sum()),
        restart_chosen_fooled=int((np.argmax(np.asarray(model(chosen)), -1) != y).sum()),
        restart_is_first_fooling=bool(np.array_equal(chosen, expected)),
        restart0_is_single_run=bool(np.array_equal(runs[0], single)))

    # The losses on JAX: float32 for float16 logits, the CE and CW values.
    logits = jnp.asarray([[1.0, 2.0, -1.0], [0.5, 0.0, 3.0]], jnp.float16)
    labels = jnp.asarray([1, 0])
    result["loss_dtypes"] = [str(attacks._loss(logits, labels, k).dtype) for k in attacks.LOSSES]
    result["cw_values"] = np.asarray(attacks._loss(logits, labels, "cw")).tolist()
    result["ce_values"] = np.asarray(attacks._loss(logits, labels, "ce")).tolist()

    # The cross-check: the same weights and batch, no random start: TensorFlow's points.
    for name, kwargs in CROSS_CHECKS.items():
        ours = np.asarray(PGD(**kwargs)(model, x, y))
        result[name] = {
            "equal_fraction": float(np.mean(np.abs(ours - ref[name]) <= 1e-5)),
            "max_abs_diff": float(np.abs(ours - ref[name]).max()),
            "loss_max_rel_diff": float(np.max(np.abs(_ce(model(ours), y) - ref[name + "_loss"])
                                              / np.maximum(ref[name + "_loss"], 1e-6))),
        }
    # APGD: TensorFlow's points, eagerly and inside jax.jit over stateless_call.
    from sparta_tf.apgd import APGD  # pylint: disable=import-outside-toplevel
    for name, kwargs in APGD_CHECKS.items():
        attack = APGD(**kwargs)

        @jax.jit
        def apgd_jitted(trainable, non_trainable, x, y, attack=attack):
            def logits_fn(v):
                return model.stateless_call(trainable, non_trainable, v, training=False)[0]
            return attack(logits_fn, x, y)

        for how, ours in (("eager", attack(model, x, y)),
                          ("jit", apgd_jitted(trainable, non_trainable, x, y))):
            ours = np.asarray(ours)
            result[f"{name}_{how}"] = {
                "equal_fraction": float(np.mean(np.all(np.abs(ours - ref[name]) <= 1e-5,
                                                       axis=(1, 2, 3)))),
                "linf": float(np.abs(ours - x).max()),
                "accuracy": _accuracy(model(ours), y),
                "tf_accuracy": _accuracy(model(ref[name]), y)}
    # FAB-T: TensorFlow's points, eagerly and inside jax.jit.
    from sparta_tf.fab import FAB  # pylint: disable=import-outside-toplevel
    fab_attack = FAB(EPS, iterations=10)

    @jax.jit
    def fab_jitted(trainable, non_trainable, x, y):
        def logits_fn(v):
            return model.stateless_call(trainable, non_trainable, v, training=False)[0]
        return fab_attack(logits_fn, x, y)

    for how, ours in (("eager", fab_attack(model, x, y)),
                      ("jit", fab_jitted(trainable, non_trainable, x, y))):
        ours = np.asarray(ours)
        result[f"fab_t_{how}"] = {
            "equal_fraction": float(np.mean(np.all(np.abs(ours - ref["fab_t"]) <= 1e-4,
                                                   axis=(1, 2, 3)))),
            "linf": float(np.abs(ours - x).max()), "accuracy": _accuracy(model(ours), y),
            "tf_accuracy": _accuracy(model(ref["fab_t"]), y)}

    # Square: JAX draws other squares than TensorFlow from the same seed, so not the same
    # points; seeded, the same under jax.jit, in the ball, about as strong.
    from sparta_tf.square import Square  # pylint: disable=import-outside-toplevel
    square = Square(EPS, queries=SQUARE_QUERIES)

    @jax.jit
    def square_jitted(trainable, non_trainable, x, y):
        def logits_fn(v):
            return model.stateless_call(trainable, non_trainable, v, training=False)[0]
        return square(logits_fn, x, y, seed=jnp.asarray([1, 2], jnp.int32))

    eager = np.asarray(square(model, x, y, seed=[1, 2]))
    jitted_square = np.asarray(square_jitted(trainable, non_trainable, x, y))
    result["square"] = {
        "jit_equal_fraction": float(np.mean(np.abs(jitted_square - eager) <= 1e-6)),
        "same_seed_equal": bool(np.array_equal(eager, square(model, x, y, seed=[1, 2]))),
        "linf": float(np.abs(eager - x).max()), "accuracy": _accuracy(model(eager), y),
        "tf_accuracy": _accuracy(model(ref["square"]), y)}
    # The AutoAttack driver, its last batch padded: TensorFlow's robust images, give or take
    # what Square's other random squares find.
    from sparta_tf import autoattack_keras  # pylint: disable=import-outside-toplevel
    robust = autoattack_keras.robust_accuracy(model, x, y, EPS, batch_size=48,
                                              **AUTOATTACK_SIZES)["robust"]
    result["autoattack"] = {"robust": int(robust.sum()),
                            "tf_robust": int(ref["autoattack_robust"].sum()),
                            "differ": int(np.sum(robust != ref["autoattack_robust"]))}
    print("RESULT" + json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1])
