"""The one L-inf PGD of the project (FGSM is its 1-step case).

Projected gradient descent of Madry et al., "Towards Deep Learning Models
Resistant to Adversarial Attacks" (ICLR 2018), in the shape of MadryLab's
`cifar10_challenge/pgd_attack.py`: start at a random point of the eps ball,
take `steps` signed-gradient steps up the loss, and after each step project
back onto the eps ball around `x` and onto the pixel range [0, 1].

Written by hand on purpose: adversarial training calls it inside a compiled
Keras `train_step`, under `tf.distribute` (`strategy.run`), so the whole
attack must be in-graph TensorFlow (a `tf.while_loop`, stateless random
numbers from a seed tensor). cleverhans and ART run eagerly, outside the
training graph; they are used only to cross-check this attack
(`tests/test_attacks.py`) and for AutoAttack, never copied here.

Training, evaluation and the benchmarks all call this module. It imports
nothing else of the project (and no absl).

Usage::

    attack = PGD(eps=8 / 255, steps=10)          # step_size 2.5 * eps / steps
    x_adv = attack(model, x, y)                  # model(x) returns logits
    x_adv = attack(model, x, y, seed=tf.constant([1, step], tf.int64))
    x_adv = fgsm(8 / 255)(model, x, y)
"""

import numbers

import tensorflow as tf

LOSSES = ("ce", "cw")


def _is_int(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _loss(logits, y, kind):
    """Per-example attack loss, in float32 (so mixed_float16 models work).

    "ce": sparse softmax cross-entropy.
    "cw": Carlini-Wagner margin, max_{j != y} z_j - z_y.
    Both are maximised by the attack.
    """
    logits = tf.cast(logits, tf.float32)
    if kind == "ce":
        return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits)
    is_true = tf.one_hot(y, tf.shape(logits)[-1], on_value=True, off_value=False)
    true_logit = tf.reduce_max(tf.where(is_true, logits, -float("inf")), axis=-1)
    other_logit = tf.reduce_max(tf.where(is_true, -float("inf"), logits), axis=-1)
    return other_logit - true_logit


class PGD:
    """L-inf PGD (Madry et al. 2018) on pixels in [0, 1]; models return logits.

    Args:
        eps: the L-inf budget, in pixels (e.g. 8 / 255). 0 returns `x`.
        steps: the number of gradient steps (>= 1).
        step_size: the size of one signed step; default `2.5 * eps / steps`
            (Madry et al.), so that the attack can cross the whole ball.
        random_start: start from `x + U(-eps, eps)` (clipped to [0, 1])
            instead of from `x`.
        restarts: the number of runs, each from its own random start. Per
            example the result is the first run's `x_adv` that the model
            misclassifies; where no run succeeds, the last run's `x_adv`.
        loss: "ce" (cross-entropy), "cw" (margin max_{j != y} z_j - z_y), or
            a callable `loss(logits, y) -> per-example loss` (float32 logits;
            `y` is passed as given, e.g. soft targets for TRADES).
        training: the `training` flag passed to the model during the attack
            (False: inference mode; True attacks the model in training mode
            and, with BatchNormalization, updates its moving statistics).
    """

    def __init__(self, eps, steps=10, step_size=None, random_start=True,
                 restarts=1, loss="ce", training=False):
        eps = float(eps)
        if not eps >= 0:
            raise ValueError(f"eps must be >= 0; got {eps!r}.")
        if not _is_int(steps) or steps < 1:
            raise ValueError(f"steps must be an int >= 1; got {steps!r}.")
        if not _is_int(restarts) or restarts < 1:
            raise ValueError(f"restarts must be an int >= 1; got {restarts!r}.")
        if step_size is None:
            step_size = 2.5 * eps / steps
        step_size = float(step_size)
        # eps = 0 returns x without stepping, so its (default) step size may be 0.
        if not (step_size > 0 or (eps == 0 and step_size == 0)):
            raise ValueError(f"step_size must be > 0; got {step_size!r}.")
        if not (callable(loss) or loss in LOSSES):
            raise ValueError(f"loss must be one of {LOSSES} or a callable; got {loss!r}.")
        if callable(loss) and restarts > 1:
            raise ValueError("restarts > 1 needs int labels: use loss 'ce' or 'cw'.")
        self.eps = eps
        self.steps = int(steps)
        self.step_size = step_size
        self.random_start = bool(random_start)
        self.restarts = int(restarts)
        self.loss = loss
        self.training = bool(training)

    def __repr__(self):
        return (f"PGD(eps={self.eps}, steps={self.steps}, step_size={self.step_size}, "
                f"random_start={self.random_start}, restarts={self.restarts}, "
                f"loss={self.loss!r}, training={self.training})")

    def __call__(self, model, x, y, seed=None):
        """Returns x_adv (same dtype as x, tf.stop_gradient'ed), with
        |x_adv - x| <= eps and 0 <= x_adv <= 1.

        Works eagerly, inside `tf.function`, inside a compiled Keras
        `train_step` and in a `strategy.run` replica function. Call it
        outside the `GradientTape` that trains the model.

        Args:
            model: a callable `model(x, training=...)` returning logits [N, K].
            x: float pixels in [0, 1], shape [N, ...].
            y: int labels, shape [N].
            seed: None (noise from `tf.random.uniform`) or an int32/int64
                tensor of shape [2] for `tf.random.stateless_uniform`: the
                same seed gives the same x_adv, so a training step can derive
                its noise from (seed, step) and repeat it after a resume.
                Restart r uses `stateless_fold_in(seed, r)`. Under a
                distribution strategy every replica gets the same noise
                pattern for the same seed; fold in the replica id to avoid it.
        """
        x = tf.convert_to_tensor(x)
        if self.eps == 0:
            return tf.stop_gradient(x)
        if not callable(self.loss):
            y = tf.cast(y, tf.int64)
        if seed is not None:
            seed = tf.convert_to_tensor(seed)

        x_adv, found = None, None
        for r in range(self.restarts):
            run_seed = None
            if seed is not None:
                run_seed = tf.random.experimental.stateless_fold_in(seed, r)
            candidate = self._run(model, x, y, run_seed)
            if self.restarts == 1:
                return candidate
            logits = model(candidate, training=self.training)
            wrong = tf.not_equal(tf.argmax(logits, axis=-1), y)
            if x_adv is None:
                x_adv, found = candidate, wrong
            else:
                keep = tf.reshape(found, [-1] + [1] * (x.shape.rank - 1))
                x_adv = tf.where(keep, x_adv, candidate)
                found = tf.logical_or(found, wrong)
        return x_adv

    def _run(self, model, x, y, seed):
        """One run of PGD from one start point."""
        eps = tf.cast(self.eps, x.dtype)
        step_size = tf.cast(self.step_size, x.dtype)
        lower = tf.maximum(x - eps, 0)
        upper = tf.minimum(x + eps, 1)

        x_adv = x
        if self.random_start:
            if seed is None:
                noise = tf.random.uniform(tf.shape(x), -eps, eps, dtype=x.dtype)
            else:
                noise = tf.random.stateless_uniform(
                    tf.shape(x), seed, -eps, eps, dtype=x.dtype)
            x_adv = tf.clip_by_value(x + noise, lower, upper)

        def step(i, x_adv):
            with tf.GradientTape() as tape:
                tape.watch(x_adv)
                logits = model(x_adv, training=self.training)
                if callable(self.loss):
                    loss = tf.reduce_sum(self.loss(tf.cast(logits, tf.float32), y))
                else:
                    loss = tf.reduce_sum(_loss(logits, y, self.loss))
            grad = tape.gradient(loss, x_adv)
            x_adv = x_adv + step_size * tf.sign(grad)
            # Project onto the eps ball around x intersected with [0, 1].
            x_adv = tf.clip_by_value(x_adv, lower, upper)
            return i + 1, tf.stop_gradient(x_adv)

        # A while_loop, not a Python loop: 100 steps stay one small graph.
        _, x_adv = tf.while_loop(
            lambda i, _: i < self.steps, step, (tf.constant(0), x_adv))
        return tf.stop_gradient(x_adv)


def fgsm(eps, **kwargs):
    """FGSM (Goodfellow et al. 2015): one signed step of size eps from x.

    The 1-step case of PGD (steps=1, step_size=eps, random_start=False);
    other PGD arguments (loss, training) pass through.
    """
    return PGD(eps, steps=1, step_size=eps, random_start=False, **kwargs)
