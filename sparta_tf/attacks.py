"""The one L-inf PGD of the project (FGSM is its 1-step case), on TensorFlow and JAX.

Projected gradient descent of Madry et al., "Towards Deep Learning Models
Resistant to Adversarial Attacks" (ICLR 2018), in the shape of MadryLab's
`cifar10_challenge/pgd_attack.py`: start at a random point of the eps ball,
take `steps` signed-gradient steps up the loss, and after each step project
back onto the eps ball around `x` and onto the pixel range [0, 1].

Written by hand on purpose: adversarial training calls it inside its compiled
train step (a Keras `train_step` under `tf.distribute` on TensorFlow, a
`jax.jit`-compiled step on JAX), so the whole attack must be in-graph: a
compiled loop and stateless random numbers from a seed. The math (random
start, sign step, projection, restarts, the CE and CW losses, the seeding) is
written once here in `keras.ops`; only the input gradient, the loop and the
random draw are the backend's, one small module each
(`sparta_tf/backend/tensorflow.py`: `tf.GradientTape`, `tf.while_loop`,
`tf.random.stateless_uniform`; `sparta_tf/backend/jax.py`: `jax.grad`,
`jax.lax.fori_loop`, `jax.random`), imported for the Keras backend in use.
cleverhans and ART run eagerly, outside the training graph; they are used
only to cross-check this attack (`tests/test_attacks.py`) and for
AutoAttack, never copied here.

Training, evaluation and the benchmarks all call this module. It imports
nothing else of the project but its backend piece (and no absl), and no
TensorFlow on JAX.

Usage::

    attack = PGD(eps=8 / 255, steps=10)          # step_size 2.5 * eps / steps
    x_adv = attack(model, x, y)                  # model(x) returns logits
    x_adv = attack(model, x, y, seed=tf.constant([1, step], tf.int64))
    x_adv = fgsm(8 / 255)(model, x, y)

    # JAX, inside jax.jit: a pure function of the input, and a key or [2] seed.
    def logits_fn(v):
        logits, _ = model.stateless_call(trainable, non_trainable, v, training=False)
        return logits
    x_adv = attack(logits_fn, x, y, seed=jax.random.fold_in(key, step))
"""

import importlib
import inspect
import numbers

import keras
from keras import ops

LOSSES = ("ce", "cw")
BACKENDS = ("tensorflow", "jax")


def _backend_module():
    """The module of PGD's pieces for the Keras backend in use (`sparta_tf.backend.<name>`),
    or None on a backend without them."""
    name = keras.backend.backend()
    return importlib.import_module(f"sparta_tf.backend.{name}") if name in BACKENDS else None


_BACKEND = _backend_module()  # Keras fixes its backend when it is imported


def backend_module():
    """The attacks' pieces for the Keras backend in use (input gradient, loop, noise), for
    this module and the other attacks (`sparta_tf.apgd`).

    Raises:
        NotImplementedError: on a Keras backend other than `BACKENDS`.
    """
    if _BACKEND is None:
        raise NotImplementedError(f"sparta_tf's attacks run on the Keras backends {BACKENDS}; "
                                  f"this one is {keras.backend.backend()!r}.")
    return _BACKEND


def _is_int(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _loss(logits, y, kind):
    """Per-example attack loss, in float32 (so mixed_float16 models work).

    "ce": sparse softmax cross-entropy.
    "cw": Carlini-Wagner margin, max_{j != y} z_j - z_y.
    Both are maximised by the attack.
    """
    logits = ops.cast(logits, "float32")
    if kind == "ce":
        return ops.sparse_categorical_crossentropy(y, logits, from_logits=True)
    classes = logits.shape[-1] if logits.shape[-1] is not None else ops.shape(logits)[-1]
    is_true = ops.one_hot(y, classes) > 0.5
    true_logit = ops.max(ops.where(is_true, logits, -float("inf")), axis=-1)
    other_logit = ops.max(ops.where(is_true, -float("inf"), logits), axis=-1)
    return other_logit - true_logit


def forward_of(model, training):
    """`x -> logits`: `model(x, training=training)` for a Keras layer or model, or any
    callable that takes a `training` argument; `model(x)` for one that does not (e.g. a
    pure `logits_fn` on JAX, which fixes its own training mode)."""
    if not isinstance(model, keras.layers.Layer):
        try:
            parameters = inspect.signature(model).parameters.values()
        except (TypeError, ValueError):  # no signature to read: pass it, as always
            parameters = None
        if parameters is not None and not any(
                p.name == "training" or p.kind == p.VAR_KEYWORD for p in parameters):
            return model
    return lambda x: model(x, training=training)


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
        """Returns x_adv (same dtype as x, gradient stopped), with
        |x_adv - x| <= eps and 0 <= x_adv <= 1.

        On TensorFlow it works eagerly, inside `tf.function`, inside a
        compiled Keras `train_step` and in a `strategy.run` replica function;
        call it outside the `GradientTape` that trains the model. On JAX it
        works eagerly and inside `jax.jit` (there with a pure `model`, such as
        a function over `model.stateless_call`, and a seed).

        Args:
            model: `model(x, training=...)` returning logits [N, K] (a Keras
                model, or any callable that takes `training`); or a callable
                without a `training` argument, called as `model(x)`: on JAX,
                a pure function of the input over the model's variable values.
                With `training=True`, a stateful Keras model's BatchNormalization
                statistics are updated on TensorFlow; a pure function's updated
                statistics are dropped.
            x: float pixels in [0, 1], shape [N, ...].
            y: int labels, shape [N].
            seed: None, or the seed of the random start: the same seed gives
                the same x_adv, so a training step can derive its noise from
                (seed, step) and repeat it after a resume. On TensorFlow an
                int32/int64 tensor of shape [2] for
                `tf.random.stateless_uniform` (None: `tf.random.uniform`);
                restart r uses `stateless_fold_in(seed, r)`. Under a
                distribution strategy every replica gets the same noise
                pattern for the same seed; fold in the replica id to avoid it.
                On JAX a `jax.random` key or an int [2] seed (the raw data of
                a threefry key); restart r uses `jax.random.fold_in(key, r)`
                (None: Keras's global seed generator, not under `jax.jit`).
                The two backends draw different noise from the same seed.
        """
        backend = backend_module()
        x = ops.convert_to_tensor(x)
        if self.eps == 0:
            return ops.stop_gradient(x)
        if not callable(self.loss):
            y = ops.cast(y, "int32")
        if seed is not None:
            seed = backend.seed(seed)
        forward = forward_of(model, self.training)

        x_adv, found = None, None
        for r in range(self.restarts):
            run_seed = None if seed is None else backend.fold_in(seed, r)
            candidate = self._run(backend, forward, x, y, run_seed)
            if self.restarts == 1:
                return candidate
            predicted = ops.cast(ops.argmax(forward(candidate), axis=-1), "int32")
            wrong = ops.not_equal(predicted, y)
            if x_adv is None:
                x_adv, found = candidate, wrong
            else:
                keep = ops.reshape(found, (-1,) + (1,) * (len(x.shape) - 1))
                x_adv = ops.where(keep, x_adv, candidate)
                found = ops.logical_or(found, wrong)
        return x_adv

    def _run(self, backend, forward, x, y, seed):
        """One run of PGD from one start point."""
        eps = ops.cast(self.eps, x.dtype)
        step_size = ops.cast(self.step_size, x.dtype)
        lower = ops.maximum(ops.subtract(x, eps), 0)
        upper = ops.minimum(ops.add(x, eps), 1)

        x_adv = x
        if self.random_start:
            noise = backend.uniform_like(x, seed, ops.negative(eps), eps)
            x_adv = ops.clip(ops.add(x, noise), lower, upper)

        def total_loss(x_adv):
            logits = forward(x_adv)
            if callable(self.loss):
                return ops.sum(self.loss(ops.cast(logits, "float32"), y))
            return ops.sum(_loss(logits, y, self.loss))

        def step(i, x_adv):
            grad = backend.input_gradient(total_loss, x_adv)
            x_adv = ops.add(x_adv, ops.multiply(step_size, ops.sign(grad)))
            # Project onto the eps ball around x intersected with [0, 1].
            x_adv = ops.clip(x_adv, lower, upper)
            return ops.stop_gradient(x_adv)

        return ops.stop_gradient(backend.fori_loop(self.steps, step, x_adv))


def fgsm(eps, **kwargs):
    """FGSM (Goodfellow et al. 2015): one signed step of size eps from x.

    The 1-step case of PGD (steps=1, step_size=eps, random_start=False);
    other PGD arguments (loss, training) pass through.
    """
    return PGD(eps, steps=1, step_size=eps, random_start=False, **kwargs)
