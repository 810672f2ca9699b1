"""Activations by name, as layer factories.

`get(name, **kwargs)` returns a factory, `factory(name=None)`, that makes a
new Keras layer on every call, so a model builder can put a fresh activation
(with its own parameters, where it has any) at every place it needs one:

    make = activations.get("sparta", kernel_size=3)
    x = make(name="sparta_stem")(x)

The names, in `NAMES` order:

- `relu`, `silu` (alias `swish`), `softplus`, `gelu`, `elu`: fixed functions,
  `keras.layers.Activation`; they take no keyword arguments.
- `prelu`: `keras.layers.PReLU` with one slope per channel, shared over height
  and width; keyword arguments go to the layer.
- `frelu`: `layers.FReLU`; keyword arguments (`kernel_size`) go to the layer.
- `sparta`: `layers.Sparta`; keyword arguments (`kernel_size`, `beta0`,
  `use_custom_gradient`, `normalize_gate_input`, `kernel_regularizer`,
  `bias_regularizer`) go to the layer.
- `sparta_shift`, `sparta_bn`: `layers.Sparta` with `shift=True` (an output for
  negative inputs, PSSiLU's shift) or `gate_batch_norm=True` (a batch norm on the
  gate's convolution); the same keyword arguments as `sparta`.

This module imports nothing of `sparta_tf` but `layers`.
"""

import functools

import keras

from sparta_tf import layers

COMPARED = ("relu", "silu", "softplus", "gelu", "elu", "prelu", "frelu", "sparta")  # the grid's
VARIANTS = ("sparta_shift", "sparta_bn")  # of Sparta, for the gate probe (docs/RESULTS.md)
NAMES = COMPARED + VARIANTS

_ALIASES = {"swish": "silu"}

_FIXED = ("relu", "silu", "softplus", "gelu", "elu")

_PARAMETRIC = {
    "prelu": functools.partial(keras.layers.PReLU, shared_axes=[1, 2]),
    "frelu": layers.FReLU,
    "sparta": layers.Sparta,
    "sparta_shift": functools.partial(layers.Sparta, shift=True),
    "sparta_bn": functools.partial(layers.Sparta, gate_batch_norm=True),
}


def canonical_name(name):
    """Returns the canonical name of activation `name` (resolves aliases).

    Raises:
        ValueError: if `name` is not a known activation; the message lists
            the valid names.
    """
    canonical = _ALIASES.get(name, name)
    if canonical not in NAMES:
        valid = ", ".join(NAMES + tuple(_ALIASES))
        raise ValueError(f"Unknown activation {name!r}; valid names: {valid}.")
    return canonical


def get(name, **kwargs):
    """Returns a factory `factory(name=None) -> keras.layers.Layer`.

    Every call of the factory makes a new layer, with `kwargs` passed to it.

    Args:
        name: one of `NAMES`, or the alias `swish`.
        **kwargs: arguments of the activation's layer (see the module
            docstring); only `prelu`, `frelu` and `sparta` take any.

    Raises:
        ValueError: for an unknown name, or for keyword arguments given to an
            activation that takes none.
    """
    canonical = canonical_name(name)
    if canonical in _FIXED:
        if kwargs:
            raise ValueError(
                f"Activation {name!r} takes no arguments; got {sorted(kwargs)}.")
        return lambda name=None: keras.layers.Activation(canonical, name=name)
    layer_class = _PARAMETRIC[canonical]
    return lambda name=None: layer_class(name=name, **kwargs)
