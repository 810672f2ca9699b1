"""sparta-tf: the Sparta activation and adversarial training in Keras.

    import sparta_tf

    x = sparta_tf.layers.Sparta()(x)                                   # in a model of yours
    net = sparta_tf.models.replace_activations(net, "sparta")          # or into one you have
    model = sparta_tf.adversarial.AdversarialModel(net, "pgd", sparta_tf.attacks.PGD(8 / 255, 10))

Importing the package registers its layers with Keras, so that `keras.models.load_model`
reads a `.keras` file that holds them, on every backend.
"""

from sparta_tf import activations, adversarial, attacks, layers, models  # noqa: F401

__version__ = "0.1.0"
