"""FAB-T, the targeted Fast Adaptive Boundary attack of AutoAttack (Croce & Hein, ICML 2020),
L-inf, in `keras.ops`.

FAB looks for the adversarial example closest to x. At each step it linearises, at the
current point x(k), the difference of logits g = z_t - z_y between the target class t and
the true class y, and projects onto the linearised decision boundary {g(x(k)) + grad g .
(v - x(k)) = 0} inside the box [0, 1] (`project`: the smallest L-inf step that reaches it)
both x(k), giving the step d_k, and the original x, giving d_0. The next point mixes the two,

    x(k+1) = clip((1 - a) (x(k) + eta d_k) + a (x + eta d_0), 0, 1),
    a = min(|d_k| / (|d_k| + |d_0|), alpha_max)                 (eta 1.05, alpha_max 0.1)

so that it stays near x. Where x(k+1) is misclassified, it is kept if it is the closest so
far, and the search steps back towards x: x(k+1) = (1 - beta) x + beta x(k+1) (beta 0.9).
The attack returns the closest misclassified point found where it lies within eps of x, else
x: robust accuracy counts an image as broken only within the budget. AutoAttack runs FAB-T
once for each of the classes of the 2nd to 10th highest clean logit (`target_rank`), from x
itself (one restart, so no random start), 100 steps each.

`project` solves min ||d||_inf subject to w . d = c and 0 <= p + d <= 1 by bisection on
t = ||d||_inf: the most that w . d can reach with ||d||_inf <= t is sum_i |w_i| min(t, r_i),
where r_i is the room that coordinate i has towards the sign of c w_i, and it rises with t;
the smallest t that reaches |c| gives d_i = sign(c w_i) min(t, r_i). Where even t = 1 does
not reach it (the box is in the way), d is that largest step.

Written by hand in `keras.ops` on purpose, as `sparta_tf.apgd` (see there): the loop is the
backend's (`sparta_tf/backend/<name>.py`), and it runs in float32.
"""

import math

from keras import ops

from sparta_tf import attacks

ETA = 1.05
ALPHA_MAX = 0.1
BETA = 0.9
BISECTIONS = 30  # halvings of t's interval [0, 1]: to 1e-9, below float32's resolution


def project(p, w, c):
    """The smallest L-inf steps d [N, D] with w . d = c and 0 <= p + d <= 1 (see the module
    docstring), for points `p` [N, D], normals `w` [N, D] and offsets `c` [N]."""
    direction = ops.sign(w) * ops.expand_dims(ops.sign(c), -1)  # where each d_i must go
    room = ops.where(direction > 0, 1.0 - p, p)
    weight, target = ops.abs(w), ops.abs(c)

    def reach(t):
        return ops.sum(weight * ops.minimum(ops.expand_dims(t, -1), room), axis=-1)

    def halve(_, bounds):
        low, high = bounds
        middle = (low + high) / 2
        enough = reach(middle) >= target
        return ops.where(enough, low, middle), ops.where(enough, middle, high)

    zeros = ops.zeros_like(target)
    _, t = attacks.backend_module().fori_loop(BISECTIONS, halve, (zeros, zeros + 1.0))
    return direction * ops.minimum(ops.expand_dims(t, -1), room)


def step(difference, flat, y, state):
    """One FAB step (see the module docstring) on flattened images: `state` is (x(k), the
    closest misclassified point so far, its L-inf distance to `flat`, inf if none), and
    `difference(v)` gives (z_t - z_y, the logits) at the flat points v."""
    x_k, best, best_norm = state
    g, _, grad = attacks.backend_module().loss_and_input_gradient(difference, x_k)
    g, grad = ops.stop_gradient(g), ops.stop_gradient(grad)
    # The boundary g(x_k) + grad . (v - x_k) = 0, reached from x_k and from x.
    d_k = project(x_k, grad, -g)
    d_0 = project(flat, grad, -g - ops.sum(grad * (flat - x_k), axis=-1))
    a_k = ops.max(ops.abs(d_k), axis=-1, keepdims=True)
    a_0 = ops.max(ops.abs(d_0), axis=-1, keepdims=True)
    alpha = ops.clip(a_k / ops.maximum(a_k + a_0, 1e-12), 0.0, ALPHA_MAX)
    x_next = ops.clip((1 - alpha) * (x_k + ETA * d_k) + alpha * (flat + ETA * d_0), 0.0, 1.0)
    _, logits = difference(x_next)
    wrong = ops.not_equal(ops.cast(ops.argmax(logits, axis=-1), "int32"), y)
    norm = ops.max(ops.abs(x_next - flat), axis=-1)
    closer = ops.logical_and(wrong, norm < best_norm)
    best = ops.where(ops.expand_dims(closer, -1), x_next, best)
    best_norm = ops.where(closer, norm, best_norm)
    x_next = ops.where(ops.expand_dims(wrong, -1), (1 - BETA) * flat + BETA * x_next, x_next)
    return x_next, best, best_norm


class FAB:
    """Targeted L-inf FAB (see the module docstring) on pixels in [0, 1]; models return logits.

    Args:
        eps: the L-inf budget, in pixels (> 0): a point found further away is not returned.
        iterations: the number of steps (100 in AutoAttack).
        target_rank: the rank of the target class among the clean logits (2: the second
            highest, ..., 10).
    """

    def __init__(self, eps, iterations=100, target_rank=2):
        if not 0 < float(eps) < math.inf:
            raise ValueError(f"eps must be a finite number > 0; got {eps!r}.")
        if not (isinstance(iterations, int) and iterations >= 1):
            raise ValueError(f"iterations must be an int >= 1; got {iterations!r}.")
        if not (isinstance(target_rank, int) and target_rank >= 2):
            raise ValueError(f"target_rank must be an int >= 2; got {target_rank!r}.")
        self.eps, self.iterations, self.target_rank = float(eps), iterations, target_rank

    def __repr__(self):
        return (f"FAB(eps={self.eps}, iterations={self.iterations}, "
                f"target_rank={self.target_rank})")

    def __call__(self, model, x, y, seed=None, target=None):
        """The adversarial examples of `x` within eps, and `x` where none was found.

        Args:
            model: `model(x)` (or `model(x, training=False)`) -> logits [N, K]; on JAX
                inside `jax.jit`, a pure function of the input.
            x: float pixels in [0, 1], [N, H, W, C].
            y: int labels [N].
            seed: unused (FAB-T from x is deterministic); for the attacks' common call.
            target: the target classes [N] (None: the class of the `target_rank`-th
                highest clean logit), so that one compiled attack serves every rank.
        """
        del seed
        backend = attacks.backend_module()
        forward = attacks.forward_of(model, training=False)
        x = ops.cast(ops.convert_to_tensor(x), "float32")
        y = ops.cast(ops.convert_to_tensor(y), "int32")
        shape = x.shape
        n = shape[0]
        flat = ops.reshape(x, (n, -1))

        def logits_of(v):
            return ops.cast(forward(ops.reshape(v, shape)), "float32")

        clean = logits_of(flat)
        classes = clean.shape[-1]
        if target is not None:
            target = ops.cast(ops.convert_to_tensor(target), "int32")
        elif classes < self.target_rank:
            raise ValueError(f"target_rank {self.target_rank} needs as many classes; the "
                             f"model has {classes}.")
        else:
            target = ops.argsort(-clean, axis=-1)[:, self.target_rank - 1]
        pick = ops.one_hot(target, classes) - ops.one_hot(y, classes)

        def difference(v):  # g = z_t - z_y, per example
            logits = logits_of(v)
            return ops.sum(logits * pick, axis=-1), logits

        def one(_, state):
            return step(difference, flat, y, state)

        state = (flat, flat, ops.full((n,), float("inf"), "float32"))
        _, best, best_norm = backend.fori_loop(self.iterations, one, state)
        within = ops.expand_dims(best_norm <= self.eps, -1)
        return ops.stop_gradient(ops.reshape(ops.where(within, best, flat), shape))
