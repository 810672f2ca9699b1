"""sparta-tf: the Sparta activation and adversarial training in Keras/TensorFlow."""

__version__ = "0.1.0"
