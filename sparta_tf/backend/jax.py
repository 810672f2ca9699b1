"""PGD's pieces on JAX (`sparta_tf.attacks`): the input gradient, the loop, the noise; and
the compiled batch of an evaluation (`correct_fn`, for `sparta_tf.protocol`).

`jax.grad` to the input and `jax.lax.fori_loop`, so that the attack runs inside `jax.jit`
when the model is a pure function (`logits_fn(x)`, e.g. over `model.stateless_call`).
Random numbers come from a `jax.random` key: a typed key as given, or an int [2] seed taken
as the raw data of a threefry2x32 key (each entry modulo 2**32), so the same [2] seed that
drives the TensorFlow attack drives this one (with another, JAX's, stream).
"""

import jax
import jax.numpy as jnp
import keras
import numpy as np


def input_gradient(loss_fn, x):
    """The gradient of the scalar `loss_fn(x)` with respect to `x` (`jax.grad`)."""
    return jax.grad(loss_fn)(x)


def loss_and_input_gradient(loss_fn, x):
    """`(loss, aux, gradient)`: `loss_fn(x)` is `(per-example loss, aux)`, and the gradient
    is that of the loss's sum with respect to `x` (`jax.value_and_grad`), one pass for all."""
    def total(v):
        loss, aux = loss_fn(v)
        return jnp.sum(loss), (loss, aux)

    (_, (loss, aux)), grad = jax.value_and_grad(total, has_aux=True)(x)
    return loss, aux, grad


def fori_loop(steps, body, value):
    """`value = body(i, value)` for i in 0..steps-1 (`jax.lax.fori_loop`)."""
    return jax.lax.fori_loop(0, steps, body, value)


def seed(value):
    """A typed `jax.random` key from a key (returned as is) or an int [2] seed."""
    if isinstance(value, jax.Array) and jnp.issubdtype(value.dtype, jax.dtypes.prng_key):
        return value
    if isinstance(value, jax.Array):  # maybe traced: wrap modulo 2**32
        data = value.astype(jnp.uint32)
    else:  # NumPy, lists, TF-style int64 seeds: modulo 2**32 without overflow
        data = np.asarray(value).astype(np.int64).astype(np.uint64) & np.uint64(0xFFFFFFFF)
        data = data.astype(np.uint32)
    if data.shape != (2,):
        raise ValueError(f"seed must be a jax.random key or an int [2] seed; got shape "
                         f"{data.shape}.")
    return jax.random.wrap_key_data(data, impl="threefry2x32")


def fold_in(key, data):
    """A new key from `key` and the int `data` (`jax.random.fold_in`)."""
    return jax.random.fold_in(key, data)


def uniform_like(x, key, minval, maxval):
    """U(minval, maxval) noise of `x`'s shape and dtype from `key`; when `key` is None, from
    Keras's global seed generator (eagerly only: under `jax.jit` pass a seed)."""
    if key is None:
        return keras.random.uniform(x.shape, minval, maxval, dtype=x.dtype)
    return jax.random.uniform(key, x.shape, x.dtype, minval, maxval)


def correct_fn(model, attack=None):
    """`batch(x, y)`: which examples of a NumPy batch the Keras `model` classifies correctly
    after `attack` (None: clean), as a NumPy bool array; attack and model in one `jax.jit`
    over `model.stateless_call` with the variables' values as they are now. The loop over
    batches is `sparta_tf.protocol.hits`."""
    trainable = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]

    @jax.jit
    def hits(trainable, non_trainable, x, y):
        def logits(images, training=False):
            return model.stateless_call(trainable, non_trainable, images, training=training)[0]
        if attack is not None:
            x = attack(logits, x, y)
        return jnp.argmax(logits(x), axis=-1) == y

    return lambda x, y: np.asarray(hits(trainable, non_trainable, x, y))


def attack_fn(model, attack):
    """`run(x, y, seed, target)`: `attack` (of `sparta_tf.apgd`, `.fab` or `.square`) on a
    NumPy batch of the Keras `model`, and which of its results the model still classifies
    correctly, as NumPy arrays; attack and model in one `jax.jit` over `model.stateless_call`,
    compiled once for a batch shape (the caller pads its last batch)."""
    trainable = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]

    @jax.jit
    def run(trainable, non_trainable, x, y, seed, target):
        def logits(images, training=False):
            return model.stateless_call(trainable, non_trainable, images, training=training)[0]
        x_adv = attack(logits, x, y, seed=seed, target=target)
        return x_adv, jnp.argmax(logits(x_adv), axis=-1) == y

    def call(x, y, seed, target):
        x_adv, right = run(trainable, non_trainable, x, y, jnp.asarray(seed, jnp.int32), target)
        return np.asarray(x_adv), np.asarray(right)

    return call
