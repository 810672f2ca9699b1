"""APGD, the Auto-PGD of AutoAttack (Croce & Hein, ICML 2020), L-inf, in `keras.ops`.

PGD with a step size that it sets itself, momentum, and the best point kept:

    x(0)    a random point of the eps ball around x (or x itself)
    x(1)    = P(x(0) + eta sign(grad f(x(0))))                         eta = 2 eps at first
    z(k+1)  = P(x(k) + eta(k) sign(grad f(x(k))))
    x(k+1)  = P(x(k) + alpha (z(k+1) - x(k)) + (1 - alpha) (x(k) - x(k-1)))   alpha = 0.75

P projects onto the eps ball around x and onto [0, 1]. At each checkpoint w_j (`checkpoints`:
w_j = ceil(p_j N) with p_0 = 0, p_1 = 0.22, p_(j+1) = p_j + max(p_j - p_(j-1) - 0.03, 0.06))
an example's step size is halved, and it goes on from its best point x_max, when

    Condition 1: f rose on fewer than rho (w_j - w_(j-1)) of the steps since w_(j-1) (rho 0.75);
    Condition 2: its step size was not halved at w_(j-1), and f_max has not risen since.

The loss f is the cross-entropy ("ce"), the DLR loss ("dlr") or the targeted DLR loss
("dlr-targeted", towards the class of the `target_rank`-th highest clean logit), per example:

    DLR          -(z_y - max_(i != y) z_i) / (z_pi1 - z_pi3 + 1e-12)
    targeted DLR -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2 + 1e-12)

with z_pi1 >= z_pi2 >= ... the logits sorted. The attack returns, per example, the last point
that the model misclassified if there was one, else x_max (robust accuracy counts an example
as broken once any iterate breaks it).

Written by hand in `keras.ops` on purpose: no AutoAttack exists for JAX or Keras 3 (ART's runs
on TensorFlow and PyTorch, the reference code on PyTorch), and the whole attack is one
compiled loop. Only the input gradient, the loop and the random draw are the backend's
(`sparta_tf/backend/<name>.py`, as for `sparta_tf.attacks.PGD`); the math is here, once. It
runs in float32 under any dtype policy. The reference code settled no detail here: where the
paper and it differ, this follows the paper.
"""

import math

from keras import ops

from sparta_tf import attacks

LOSSES = ("ce", "dlr", "dlr-targeted")
ALPHA = 0.75  # momentum
RHO = 0.75    # Condition 1's share of steps that must raise the loss


def checkpoints(iterations):
    """The iterations W = [w_0 = 0, w_1, ...] at which the step size may be halved."""
    p = [0.0, 0.22]
    while True:
        step = max(p[-1] - p[-2] - 0.03, 0.06)
        if p[-1] + step > 1:
            break
        p.append(p[-1] + step)
    # round first: 0.41 * 100 is 41.00000000000001 in floating point
    return sorted({math.ceil(round(q * iterations, 6)) for q in p})


def dlr_loss(logits, y, target=None):
    """The per-example (targeted, if `target` is given) DLR loss of float32 `logits`."""
    classes = logits.shape[-1]
    ranked = ops.flip(ops.sort(logits, axis=-1), axis=-1)  # descending
    z_y = ops.take_along_axis(logits, ops.expand_dims(y, -1), axis=-1)[:, 0]
    if target is None:
        is_y = ops.one_hot(y, classes) > 0.5
        other = ops.max(ops.where(is_y, -float("inf"), logits), axis=-1)
        return -(z_y - other) / (ranked[:, 0] - ranked[:, 2] + 1e-12)
    z_t = ops.take_along_axis(logits, ops.expand_dims(target, -1), axis=-1)[:, 0]
    return -(z_y - z_t) / (ranked[:, 0] - (ranked[:, 2] + ranked[:, 3]) / 2 + 1e-12)


class APGD:
    """L-inf APGD (see the module docstring) on pixels in [0, 1]; models return logits.

    Args:
        eps: the L-inf budget, in pixels (> 0).
        iterations: N, the number of steps (100 in AutoAttack).
        loss: one of `LOSSES`.
        target_rank: for "dlr-targeted", the rank of the target class among the clean
            logits (2: the second highest, ..., 10; AutoAttack runs 2 to 10).
        random_start: start at x + eps t / max|t|, t ~ U(-1, 1) per pixel (as AutoAttack
            does), clipped to [0, 1]; else at x.
    """

    def __init__(self, eps, iterations=100, loss="ce", target_rank=2, random_start=True):
        if not 0 < float(eps) < math.inf:
            raise ValueError(f"eps must be a finite number > 0; got {eps!r}.")
        if not (isinstance(iterations, int) and iterations >= 1):
            raise ValueError(f"iterations must be an int >= 1; got {iterations!r}.")
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}; got {loss!r}.")
        if not (isinstance(target_rank, int) and target_rank >= 2):
            raise ValueError(f"target_rank must be an int >= 2; got {target_rank!r}.")
        self.eps, self.iterations, self.loss = float(eps), iterations, loss
        self.target_rank, self.random_start = target_rank, bool(random_start)

    def __repr__(self):
        return (f"APGD(eps={self.eps}, iterations={self.iterations}, loss={self.loss!r}, "
                f"target_rank={self.target_rank}, random_start={self.random_start})")

    def __call__(self, model, x, y, seed=None, target=None):
        """The adversarial examples of `x` (float32, |x_adv - x| <= eps, in [0, 1]).

        Args:
            model: `model(x)` (or `model(x, training=False)`) -> logits [N, K]; on JAX
                inside `jax.jit`, a pure function of the input.
            x: float pixels in [0, 1], [N, H, W, C].
            y: int labels [N].
            seed: the random start's seed, as for `sparta_tf.attacks.PGD` (an int [2]
                seed, or a `jax.random` key on JAX); None: not seeded.
            target: for "dlr-targeted", the target classes [N] (None: the class of the
                `target_rank`-th highest clean logit), so that one compiled attack serves
                every rank; ignored by the other losses.
        """
        backend = attacks.backend_module()
        forward = attacks.forward_of(model, training=False)
        x = ops.cast(ops.convert_to_tensor(x), "float32")
        y = ops.cast(ops.convert_to_tensor(y), "int32")
        eps = ops.cast(self.eps, "float32")
        lower, upper = ops.maximum(x - eps, 0.0), ops.minimum(x + eps, 1.0)
        extra = (1,) * (len(x.shape) - 1)  # per-example values broadcast over the pixels

        def project(v):
            return ops.clip(v, lower, upper)

        if self.loss != "dlr-targeted":
            target = None
        elif target is not None:
            target = ops.cast(ops.convert_to_tensor(target), "int32")
        else:
            clean = ops.cast(forward(x), "float32")
            if clean.shape[-1] < max(4, self.target_rank):
                raise ValueError(f"The targeted DLR loss needs at least "
                                 f"{max(4, self.target_rank)} classes; the model has "
                                 f"{clean.shape[-1]}.")
            target = ops.argsort(-clean, axis=-1)[:, self.target_rank - 1]

        def loss_and_logits(v):
            logits = ops.cast(forward(v), "float32")
            if self.loss == "ce":
                loss = ops.sparse_categorical_crossentropy(y, logits, from_logits=True)
            else:
                loss = dlr_loss(logits, y, target)
            return loss, logits

        def evaluate(v):
            loss, logits, grad = backend.loss_and_input_gradient(loss_and_logits, v)
            wrong = ops.not_equal(ops.cast(ops.argmax(logits, axis=-1), "int32"), y)
            return ops.stop_gradient(loss), wrong, ops.stop_gradient(grad)

        x0 = x
        if self.random_start:
            t = backend.uniform_like(x, None if seed is None else backend.seed(seed), -1.0, 1.0)
            scale = ops.max(ops.abs(t), axis=tuple(range(1, len(x.shape))), keepdims=True)
            x0 = ops.clip(x + eps * t / scale, 0.0, 1.0)
        f0, wrong0, g0 = evaluate(x0)
        check, since = _checkpoint_tables(self.iterations)

        def expand(v):
            return ops.reshape(v, (-1,) + extra)

        def step(i, state):
            (x_cur, x_prev, g, f_cur, eta, x_max, f_max, g_max, rises, f_max_then,
             halved_then, x_found, found) = state
            alpha = ops.where(ops.equal(i, 0), 1.0, ALPHA)  # no momentum on the first step
            z = project(x_cur + expand(eta) * ops.sign(g))
            x_new = project(x_cur + alpha * (z - x_cur) + (1 - alpha) * (x_cur - x_prev))
            f_new, wrong, g_new = evaluate(x_new)
            x_found = ops.where(expand(wrong), x_new, x_found)
            found = ops.logical_or(found, wrong)
            rises = rises + ops.cast(f_new > f_cur, "float32")
            better = f_new > f_max
            x_max = ops.where(expand(better), x_new, x_max)
            g_max = ops.where(expand(better), g_new, g_max)
            f_max = ops.where(better, f_new, f_max)
            # A checkpoint after the iterate i + 1.
            at_check = ops.take(check, i + 1)
            condition1 = rises < RHO * ops.take(since, i + 1)
            condition2 = ops.logical_and(ops.logical_not(halved_then), f_max <= f_max_then)
            halve = ops.logical_and(at_check, ops.logical_or(condition1, condition2))
            eta = ops.where(halve, eta / 2, eta)
            x_next = ops.where(expand(halve), x_max, x_new)
            g_next = ops.where(expand(halve), g_max, g_new)
            f_next = ops.where(halve, f_max, f_new)
            rises = ops.where(at_check, 0.0, rises)
            f_max_then = ops.where(at_check, f_max, f_max_then)
            halved_then = ops.where(at_check, halve, halved_then)
            return (x_next, x_cur, g_next, f_next, eta, x_max, f_max, g_max, rises, f_max_then,
                    halved_then, x_found, found)

        n = ops.shape(y)[0]
        state = (x0, x0, g0, f0, ops.full((n,), 2.0 * self.eps, "float32"), x0, f0, g0,
                 ops.zeros((n,), "float32"), f0, ops.zeros((n,), "bool"), x0, wrong0)
        state = backend.fori_loop(self.iterations, step, state)
        x_max, x_found, found = state[5], state[11], state[12]
        return ops.stop_gradient(ops.where(expand(found), x_found, x_max))


def _checkpoint_tables(iterations):
    """Two tables over the iterates 0..N: whether iterate t is a checkpoint, and how many
    steps lie between it and the checkpoint before (0 where t is none)."""
    ws = checkpoints(iterations)
    check = [False] * (iterations + 1)
    since = [0.0] * (iterations + 1)
    for before, w in zip(ws, ws[1:]):
        check[w], since[w] = True, float(w - before)
    return ops.convert_to_tensor(check), ops.convert_to_tensor(since, "float32")
