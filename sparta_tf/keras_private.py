"""The private Keras attributes that sparta_tf touches, each behind one function that says why.

Keras has no public way to do either of these. They were written against Keras 3.15; a Keras
that renames the attributes breaks these two functions and nothing else, and the tests of
`transfer` (`nested_layers`) and of multi-worker training (`skip_fit_strategy_build`) fail.

This module imports nothing of `sparta_tf`.
"""

# pylint: disable=protected-access


def nested_layers(model):
    """Every layer inside `model`, nested ones too, in model order, `model` itself left out.

    `Model.layers` lists the top level only, so a layer held inside another layer would be
    missed. `_flatten_layers` is the walk Keras itself makes over a model's layers (for its
    weights, `summary()` and saving).
    """
    return list(model._flatten_layers(include_self=False))


def skip_fit_strategy_build(model):
    """Keep `model.fit()` from building `model` by reducing its first batch over replicas.

    Keras 3.15's `fit()` reduces the first batch to build the model symbolically, a reduce
    that MultiWorkerMirroredStrategy cannot do on an (images, labels) tuple of PerReplica
    values. For a model that is built already this skips that step: `fit()` then finds the
    strategy from the scope it runs in.
    """
    model._distribute_strategy = None
