"""What a Keras user does on a backend, run as a script (`tests/test_keras_user.py` runs it on
JAX with TensorFlow unimportable):

    KERAS_BACKEND=jax python tests/keras_user_checks.py FOLDER

FOLDER holds `trained.keras` (a model_dir's model.keras, trained on TensorFlow) and
`images.npz` (images and TensorFlow's logits of them). After `import sparta_tf` alone, the
script loads that file with plain `keras.models.load_model`, and puts Sparta into
keras.applications' MobileNetV2 (`models.replace_activations`; ResNet50V2 too where
`check` is called from TensorFlow's test), saves and loads it; it writes what it found to
FOLDER/jax.json.
"""

import json
import os
import sys

import keras
import numpy as np

import sparta_tf


def counts(model):
    """(ReLUs left, Sparta layers) in `model`."""
    relus = sum(1 for layer in model.layers if sparta_tf.models._relu_kind(layer))
    return [relus, sum(isinstance(layer, sparta_tf.layers.Sparta) for layer in model.layers)]


def same_other_weights(old, new):
    """Whether every layer of `old` that `new` has by name holds the same weights."""
    return all(all(np.array_equal(a, b) for a, b in zip(layer.get_weights(),
                                                        new.get_layer(layer.name).get_weights()))
               for layer in old.layers if layer.weights)


def round_trip(model, folder, x):
    """The largest |logits| difference of `model` and its `.keras` file, loaded."""
    path = os.path.join(folder, f"{model.name}_{keras.backend.backend()}.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    return float(np.max(np.abs(np.asarray(model(x)) - np.asarray(loaded(x)))))


APPLICATIONS = ("mobilenet_v2", "resnet50_v2")


def check(folder, applications=APPLICATIONS):
    images = np.load(os.path.join(folder, "images.npz"))
    x = images["x"]
    trained = keras.models.load_model(os.path.join(folder, "trained.keras"))
    found = {"trained_logits_diff": float(np.max(np.abs(np.asarray(trained(x))
                                                        - images["logits"])))}
    for name, build, capped in (
            ("mobilenet_v2", lambda: keras.applications.MobileNetV2(
                weights=None, input_shape=(32, 32, 3), classes=10, alpha=0.35), "replace"),
            ("resnet50_v2", lambda: keras.applications.ResNet50V2(
                weights=None, input_shape=(32, 32, 3), classes=10), "refuse")):
        if name not in applications:
            continue
        net = build()
        new = sparta_tf.models.replace_activations(net, "sparta", capped=capped)
        found[name] = {"before": counts(net), "after": counts(new),
                       "same_other_weights": same_other_weights(net, new),
                       "round_trip_diff": round_trip(new, folder, x)}
    return found


if __name__ == "__main__":
    # On JAX MobileNetV2 only: the replacement is the same graph rewrite on every backend
    # (ResNet50V2's is checked on TensorFlow), and ResNet50V2's eager passes on JAX cost a
    # minute of the suite.
    result = check(sys.argv[1], ("mobilenet_v2",))
    with open(os.path.join(sys.argv[1], f"{keras.backend.backend()}.json"), "w") as f:
        json.dump(result, f)
    print("tensorflow imported:", "tensorflow" in sys.modules)
