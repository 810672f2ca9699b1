"""Standard AutoAttack (Croce & Hein, ICML 2020), L-inf, with attacks written in `keras.ops`:
`robust_accuracy(model, x, y, eps)`, on TensorFlow and on JAX.

The driver of `sparta_tf.apgd` (APGD-CE, APGD-T), `sparta_tf.fab` (FAB-T) and
`sparta_tf.square` (Square), run as standard AutoAttack runs them: in that order, each on
the images that the ones before did not break, one run each, 100 iterations, the targeted
attacks once for each of the classes of the 2nd to 10th highest clean logit, Square with
5,000 queries and p_init 0.8. An image counts as robust only if every attack failed on it.

Each attack is compiled for a few batch shapes only (`sparta_tf/backend/<name>.py`,
`attack_fn`): a pass over the images still robust uses batches of `batch_size`, or of the
smallest power of two (at least 8) that holds them all, the last batch padded with copies of
its first image (whose results are dropped). So the later attacks, which see only the few
images that the first one did not break, do not pay for a full batch of padding. The target
classes are data, not part of the compiled function, so the nine target ranks share one
compilation. Seeded: the same
model, images and seed give the same result. The attacks run in float32.

The other AutoAttack of the project, `sparta_tf.autoattack`, runs ART's attacks on
TensorFlow (no FAB there); it is this one's cross-check.
"""

import time

import numpy as np

from sparta_tf import apgd, attacks, data, fab, square

ATTACKS = ("apgd-ce", "apgd-t", "fab-t", "square")
TARGETS = 9  # target classes of APGD-T and FAB-T: the 2nd to 10th highest clean logit


def _attack(name, eps, iterations, queries):
    """The attack object of `name`."""
    if name == "apgd-ce":
        return apgd.APGD(eps, iterations)
    if name == "apgd-t":
        return apgd.APGD(eps, iterations, loss="dlr-targeted")
    if name == "fab-t":
        return fab.FAB(eps, iterations)
    return square.Square(eps, queries)


def robust_accuracy(model, x, y, eps, batch_size=256, attacks_run=ATTACKS, iterations=100,
                    queries=5000, seed=0, verbose=True):
    """Robust accuracy under standard AutoAttack at L-inf `eps` (see the module docstring).

    Args:
        model: a Keras model from pixels in [0, 1] to logits (on TensorFlow also any
            callable `model(x, training=False)`, e.g. a loaded SavedModel's).
        x: uint8 images or floats in [0, 1], NHWC.
        y: int labels.
        eps: the L-inf budget in pixels (> 0).
        batch_size: images per batch of an attack.
        attacks_run: names out of `ATTACKS`, run in this order. The order does not change
            which images count as robust under a deterministic attack, only the cost.
        iterations: APGD and FAB iterations (100 in standard AutoAttack).
        queries: Square's queries (5,000 in standard AutoAttack).
        seed: an int; seeds APGD's random starts and Square's squares.
        verbose: print one line per attack.

    Returns: `{"accuracy": robust accuracy, "after": {name: the accuracy after that attack
        and the ones before it}, "robust": a bool array, the images that every attack
        failed on}`.

    Raises:
        ValueError: an unknown attack, or `eps`, `iterations` or `queries` out of range.
    """
    unknown = set(attacks_run) - set(ATTACKS)
    if unknown:
        raise ValueError(f"Unknown attacks {sorted(unknown)}; valid: {ATTACKS}.")
    backend = attacks.backend_module()
    x, y = data.pixels(x), np.asarray(y).astype(np.int32)
    size = max(1, min(batch_size, len(x)))
    forward = attacks.forward_of(model, training=False)
    logits = np.concatenate([np.asarray(forward(x[i:i + size]), np.float32)
                             for i in range(0, len(x), size)])
    ranked = np.argsort(-logits, axis=1, kind="stable")
    classes = logits.shape[1]
    robust = logits.argmax(axis=1) == y
    after, calls = {}, 0
    for name in attacks_run:
        start = time.perf_counter()
        attack = _attack(name, eps, iterations, queries)
        if name == "apgd-t" and classes < 4:
            ranks = []  # the targeted DLR loss needs 4 classes
        elif name in ("apgd-t", "fab-t"):
            ranks = range(1, min(TARGETS + 1, classes))
        else:
            ranks = [1]
        run = backend.attack_fn(model, attack)
        for rank in ranks:
            left = np.flatnonzero(robust)
            padded = min(size, _bucket(len(left)))
            for batch in _batches(left, padded):
                calls += 1
                index = np.concatenate([batch, np.repeat(batch[:1], padded - len(batch))])
                _, right = run(x[index], y[index], [seed, calls], ranked[index, rank])
                robust[batch[~right[:len(batch)]]] = False
        after[name] = float(robust.mean())
        if verbose:
            print(f"AutoAttack {name}: {after[name]:.1%} robust "
                  f"({time.perf_counter() - start:.0f} s)")
    return {"accuracy": float(robust.mean()), "after": after, "robust": robust}


def _bucket(count):
    """The batch shape for `count` images: the smallest power of two >= count, at least 8."""
    return max(8, 1 << max(0, count - 1).bit_length())


def _batches(index, size):
    """`index` in consecutive pieces of at most `size`."""
    return [index[i:i + size] for i in range(0, len(index), size)]
