"""AutoAttack (Croce & Hein, ICML 2020) with the attacks of the Adversarial Robustness
Toolbox (ART): `robust_accuracy(model, x, y, eps)`.

ART differentiates a `TensorFlowV2Classifier`; `_compiled` is the adapter that hands it a
sparta-tf model (a Keras model or a loaded SavedModel) as one compiled graph call. This is
the evaluation's strongest attack; the training step's own PGD is `sparta_tf.attacks`.
This module imports no absl.
"""

import contextlib

import numpy as np
import tensorflow as tf

from sparta_tf import data

# The attacks of standard AutoAttack that ART has, in the standard order.
ATTACKS = ("apgd-ce", "apgd-t", "square")
# All that `robust_accuracy` runs: those, and untargeted APGD on the DLR loss (AutoAttack's
# cheaper second attack, one run where APGD-T makes one for each of 9 target classes).
KNOWN = ATTACKS + ("apgd-dlr",)


def _compiled(model):
    """`model` as one graph call whose input gradient is computed in a graph too.

    ART differentiates the model eagerly, on ever smaller subsets of the examples.
    Compiled, the forward and backward passes are faster, and they avoid a crash:
    run eagerly at a new batch size, the backward pass of a ResNet (a Keras model
    or a loaded SavedModel) corrupts the heap of TF 2.21's oneDNN CPU kernels in
    about half the runs (not with TF_ENABLE_ONEDNN_OPTS=0).
    """
    forward = tf.function(lambda x: model(x, training=False), reduce_retracing=True)

    @tf.function(reduce_retracing=True)
    def input_gradient(x, upstream):
        with tf.GradientTape() as tape:
            tape.watch(x)
            logits = model(x, training=False)
        return tape.gradient(logits, x, output_gradients=upstream)

    @tf.custom_gradient
    def call(x):
        def gradient(upstream, variables=()):
            return input_gradient(x, upstream), [None] * len(variables)  # none for weights

        return forward(x), gradient

    return lambda x, training=False: call(x)


def robust_accuracy(model, x, y, eps, batch_size=256, attacks=ATTACKS, iterations=100,
                    queries=5000, verbose=True, seed=None):
    """Robust accuracy under AutoAttack at L-inf `eps`, with ART's attacks.

    Standard AutoAttack (Croce & Hein 2020, `version="standard"`) runs APGD-CE,
    APGD-T, FAB-T and Square, each on the examples that the ones before did not
    break, with one restart each, 100 iterations, 9 target classes and 5000
    Square queries. This follows it with ART's `AutoProjectedGradientDescent`
    and `SquareAttack`, chained by ART's own AutoAttack step
    (`art.attacks.evasion.auto_attack.run_attack`):

    - `apgd-ce`: untargeted APGD on the cross-entropy, step 2 * eps at first.
    - `apgd-t`: APGD on ART's targeted DLR loss, once for each of the (up to) 9
      classes with the highest clean logits after the top one.
    - `square`: Square (p_init 0.8), `queries` iterations.
    - `apgd-dlr` (not in standard AutoAttack; on request): untargeted APGD on
      the DLR loss, one run instead of APGD-T's nine.

    Deviations, because of what ART 1.20 offers: ART has no FAB, so FAB-T is
    left out (it can only lower the accuracy, so this is an upper bound on
    standard AutoAttack's). ART's `AutoAttack` class is not used as a whole: by
    default it runs another list (APGD-CE and APGD-DLR with 5 restarts,
    DeepFool, Square with 5 restarts), its `targeted=True` makes every attack
    of the list targeted after running it untargeted, and its `generate`
    imports `multiprocess`, which ART does not install.

    Args:
        model: a callable `model(x, training=False)` -> logits.
        x: uint8 images or floats in [0, 1], NHWC.
        y: int labels.
        eps: the L-inf budget in pixels (> 0).
        batch_size: examples per batch.
        attacks: names out of `KNOWN`, run in this order. The order does
            not change the result (an example counts as robust only if every
            attack fails on it), only the cost.
        iterations: APGD iterations (100 in standard AutoAttack).
        queries: Square iterations (queries; 5000 in standard AutoAttack).
        verbose: show ART's progress bars.
        seed: seeds ART's random starts and squares (they draw from NumPy's global
            generator, whose state is restored afterwards), so that a model's
            AutoAttack accuracy can be checked again exactly; None: not seeded.

    Returns: `{"accuracy": robust accuracy, "after": {name: the accuracy
        after that attack and the ones before it}, "robust": a bool array, the
        examples that every attack failed on}`.
    """
    unknown = set(attacks) - set(KNOWN)
    if unknown:
        raise ValueError(f"Unknown attacks {sorted(unknown)}; valid: {KNOWN}.")
    if not eps > 0:
        raise ValueError(f"eps must be > 0; got {eps!r}.")
    with _numpy_seeded(seed):
        return _chain(model, x, y, eps, batch_size, attacks, iterations, queries, verbose)


@contextlib.contextmanager
def _numpy_seeded(seed):
    """NumPy's global generator seeded with `seed` inside, as it was outside (None: as is)."""
    if seed is None:
        yield
        return
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


def _chain(model, x, y, eps, batch_size, attacks, iterations, queries, verbose):
    """`robust_accuracy` once its arguments are checked."""
    from art.attacks.evasion import AutoProjectedGradientDescent, SquareAttack
    from art.attacks.evasion.auto_attack import run_attack
    from art.estimators.classification import TensorFlowV2Classifier

    x, y = data.pixels(x), np.asarray(y)
    logits = np.concatenate([np.asarray(model(tf.constant(x[i:i + batch_size]), training=False))
                             for i in range(0, len(x), batch_size)])
    classes = logits.shape[-1]
    classifier = TensorFlowV2Classifier(_compiled(model), nb_classes=classes, input_shape=x.shape[1:],
                                        clip_values=(0.0, 1.0))
    onehot = np.eye(classes, dtype=np.float32)
    robust = logits.argmax(axis=1) == y
    x_adv = x.copy()
    after = {}
    for name in attacks:
        if name == "square":
            attack = SquareAttack(classifier, norm=np.inf, eps=eps, max_iter=queries,
                                  p_init=0.8, nb_restarts=1, batch_size=batch_size,
                                  verbose=verbose)
            labels = [y]
        else:
            attack = AutoProjectedGradientDescent(
                classifier, norm=np.inf, eps=eps, eps_step=2 * eps, max_iter=iterations,
                targeted=name == "apgd-t", nb_random_init=1, batch_size=batch_size,
                loss_type="cross_entropy" if name == "apgd-ce" else "difference_logits_ratio",
                verbose=verbose)
            # Targets: the classes of the 2nd to 10th highest clean logit.
            ranked = np.argsort(-logits, axis=1)
            labels = [y] if name != "apgd-t" else [ranked[:, k] for k in
                                                   range(1, min(10, classes))]
        for target in labels:
            if robust.any():
                x_adv, robust = run_attack(x_adv, onehot[target], robust, attack, classifier,
                                           norm=np.inf, eps=eps)
        after[name] = float(robust.mean())
    return {"accuracy": float(robust.mean()), "after": after, "robust": robust}
