"""Square, the score-based attack of AutoAttack (Andriushchenko et al., ECCV 2020), L-inf, in
`keras.ops`.

No gradient: random search over the corners of the eps ball. It starts from vertical stripes
(each column of each channel at x - eps or x + eps, at random) and then, for each query,
sets one random square of each image, per channel, to x - eps or x + eps at random, keeping
the change only where it lowers the margin loss

    m(x') = z_y(x') - max_(j != y) z_j(x')                (the image is broken once m < 0)

Images already broken are left as they are. The square's side is round(sqrt(p h w)) (at
least 1), where p starts at `p_init` (0.8 in AutoAttack) and is halved at the queries
10, 50, 200, 500, 1000, 2000, 4000, 6000 and 8000 of 10,000, scaled to `queries`.
Each image draws its own square and signs (AutoAttack's code draws one for the batch).

Written by hand in `keras.ops` on purpose, as `sparta_tf.apgd` (see there): the loop is
the backend's (`sparta_tf/backend/<name>.py`), seeded, and runs in float32.
"""

import math

from keras import ops

from sparta_tf import attacks

HALVINGS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)  # of 10,000 queries


def square_sizes(queries, p_init, height, width):
    """The side of the square of each query after the first (the stripes): a list."""
    sizes = []
    for i in range(1, queries):
        at = int(i * 10000 / queries)  # the schedule is written for 10,000 queries
        p = p_init / 2 ** sum(at > h for h in HALVINGS)
        sizes.append(min(max(round(math.sqrt(p * height * width)), 1), height, width))
    return sizes


def margin(logits, y):
    """z_y - max_(j != y) z_j per example, of float32 `logits`."""
    is_y = ops.one_hot(y, logits.shape[-1]) > 0.5
    z_y = ops.sum(ops.where(is_y, logits, 0.0), axis=-1)
    return z_y - ops.max(ops.where(is_y, -float("inf"), logits), axis=-1)


class Square:
    """L-inf Square (see the module docstring) on pixels in [0, 1]; models return logits.

    Args:
        eps: the L-inf budget, in pixels (> 0).
        queries: model calls per image, the stripes included (5,000 in AutoAttack).
        p_init: the share of the image that the first squares cover (0.8 in AutoAttack).
    """

    def __init__(self, eps, queries=5000, p_init=0.8):
        if not 0 < float(eps) < math.inf:
            raise ValueError(f"eps must be a finite number > 0; got {eps!r}.")
        if not (isinstance(queries, int) and queries >= 1):
            raise ValueError(f"queries must be an int >= 1; got {queries!r}.")
        if not 0 < float(p_init) <= 1:
            raise ValueError(f"p_init must be in (0, 1]; got {p_init!r}.")
        self.eps, self.queries, self.p_init = float(eps), queries, float(p_init)

    def __repr__(self):
        return f"Square(eps={self.eps}, queries={self.queries}, p_init={self.p_init})"

    def __call__(self, model, x, y, seed=None, target=None):
        """The adversarial examples of `x` (float32, |x_adv - x| <= eps, in [0, 1]).

        Args:
            model: `model(x)` (or `model(x, training=False)`) -> logits [N, K]; on JAX
                inside `jax.jit`, a pure function of the input.
            x: float pixels in [0, 1], [N, H, W, C] with a fixed N.
            y: int labels [N].
            seed: an int [2] seed (or a `jax.random` key on JAX); None: [0, 0].
            target: unused (Square is untargeted); for the attacks' common call.
        """
        del target
        backend = attacks.backend_module()
        forward = attacks.forward_of(model, training=False)
        x = ops.cast(ops.convert_to_tensor(x), "float32")
        y = ops.cast(ops.convert_to_tensor(y), "int32")
        n, height, width, channels = x.shape
        key = backend.seed([0, 0] if seed is None else seed)
        eps = ops.cast(self.eps, "float32")

        def loss(v):
            return margin(ops.cast(forward(v), "float32"), y)

        def coin(shape, k):  # -1 or 1, at random
            return ops.where(backend.uniform_like(ops.zeros(shape), k, 0.0, 1.0) < 0.5,
                             -1.0, 1.0)

        x_best = ops.clip(x + eps * coin((n, 1, width, channels), backend.fold_in(key, 0)),
                          0.0, 1.0)
        m_best = loss(x_best)
        sizes = ops.convert_to_tensor(square_sizes(self.queries, self.p_init, height, width)
                                      or [1], "int32")
        rows = ops.reshape(ops.arange(height), (1, height, 1))
        cols = ops.reshape(ops.arange(width), (1, 1, width))

        def step(i, state):
            x_best, m_best = state
            k = backend.fold_in(key, i + 1)
            draw = backend.uniform_like(ops.zeros((n, 2)), k, 0.0, 1.0)
            side = ops.take(sizes, i)
            top = ops.cast(draw[:, 0] * ops.cast(height - side + 1, "float32"), "int32")
            left = ops.cast(draw[:, 1] * ops.cast(width - side + 1, "float32"), "int32")
            top, left = ops.reshape(top, (n, 1, 1)), ops.reshape(left, (n, 1, 1))
            inside = ((rows >= top) & (rows < top + side) & (cols >= left)
                      & (cols < left + side))
            signs = coin((n, 1, 1, channels), backend.fold_in(k, 1))
            x_new = ops.where(ops.expand_dims(inside, -1),
                              ops.clip(x + eps * signs, 0.0, 1.0), x_best)
            m_new = loss(x_new)
            keep = ops.logical_and(m_new < m_best, m_best > 0)
            x_best = ops.where(ops.reshape(keep, (n, 1, 1, 1)), x_new, x_best)
            return x_best, ops.where(keep, m_new, m_best)

        x_best, _ = backend.fori_loop(self.queries - 1, step, (x_best, m_best))
        return ops.stop_gradient(x_best)
