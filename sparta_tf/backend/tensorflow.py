"""PGD's pieces on TensorFlow (`sparta_tf.attacks`): the input gradient, the loop, the noise;
and the compiled batch of an evaluation (`correct_fn`, for `sparta_tf.protocol`).

A `tf.GradientTape` and a `tf.while_loop`, so that the attack runs eagerly, inside
`tf.function`, inside a compiled Keras `train_step` and in a `strategy.run` replica
function; stateless random numbers from an int [2] seed tensor, so that a seed gives the same
start on every run (the stream `sparta_tf.attacks` has always drawn on TensorFlow).
"""

import tensorflow as tf


def input_gradient(loss_fn, x):
    """The gradient of the scalar `loss_fn(x)` with respect to `x`."""
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = loss_fn(x)
    return tape.gradient(loss, x)


def loss_and_input_gradient(loss_fn, x):
    """`(loss, aux, gradient)`: `loss_fn(x)` is `(per-example loss, aux)`, and the gradient
    is that of the loss's sum with respect to `x`, one pass for all."""
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss, aux = loss_fn(x)
        total = tf.reduce_sum(loss)
    return loss, aux, tape.gradient(total, x)


def fori_loop(steps, body, value):
    """`value = body(i, value)` for i in 0..steps-1: a `tf.while_loop`, so that 100 steps
    stay one small graph."""
    _, value = tf.while_loop(lambda i, _: i < steps, lambda i, v: (i + 1, body(i, v)),
                             (tf.constant(0), value))
    return value


def seed(value):
    """A stateless seed (int32 or int64 [2] tensor) from `value`."""
    return tf.convert_to_tensor(value)


def fold_in(seed_, data):
    """A new seed from `seed_` and the int `data` (`stateless_fold_in`)."""
    return tf.random.experimental.stateless_fold_in(seed_, data)


def uniform_like(x, seed_, minval, maxval):
    """U(minval, maxval) noise of `x`'s shape and dtype: stateless from `seed_`, or from
    TensorFlow's global generator when `seed_` is None."""
    if seed_ is None:
        return tf.random.uniform(tf.shape(x), minval, maxval, dtype=x.dtype)
    return tf.random.stateless_uniform(tf.shape(x), seed_, minval, maxval, dtype=x.dtype)


def correct_fn(model, attack=None):
    """`batch(x, y)`: which examples of a NumPy batch `model` classifies correctly after
    `attack` (None: clean), as a NumPy bool array; attack and model in one `tf.function`.
    The loop over batches is `sparta_tf.protocol.hits`."""
    @tf.function
    def hits(x, y):
        if attack is not None:
            x = attack(model, x, y)
        return tf.argmax(model(x, training=False), axis=-1, output_type=tf.int32) == y

    return lambda x, y: hits(tf.constant(x), tf.constant(y)).numpy()


def attack_fn(model, attack):
    """`run(x, y, seed, target)`: `attack` (of `sparta_tf.apgd`, `.fab` or `.square`) on a
    NumPy batch of `model`, and which of its results `model` still classifies correctly, as
    NumPy arrays; attack and model in one `tf.function`, traced once for a batch shape (the
    caller pads its last batch)."""
    @tf.function
    def run(x, y, seed, target):
        x_adv = attack(model, x, y, seed=seed, target=target)
        right = tf.argmax(model(x_adv, training=False), axis=-1, output_type=tf.int32) == y
        return x_adv, right

    def call(x, y, seed, target):
        x_adv, right = run(tf.constant(x), tf.constant(y), tf.constant(seed, tf.int32),
                           tf.constant(target))
        return x_adv.numpy(), right.numpy()

    return call
