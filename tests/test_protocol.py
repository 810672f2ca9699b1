"""Tests of sparta_tf.protocol: the one PGD evaluation protocol, its name, and its numbers.

The protocol replaced three evaluations (the trainer's, the grid's, sparta-evaluate's) that
each seeded `attacks.PGD` with [seed, 0] in every batch; these tests hold it to the numbers
of the code it replaced, on TensorFlow and on JAX (without TensorFlow), and check that the
trainer's results.json names it. sparta-compare's and sparta-evaluate's reports are
checked in tests/test_compare.py and tests/test_evaluation.py.
"""

import dataclasses
import json
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import ROOT, jax_without_tensorflow, needs_jax
from sparta_tf import attacks, protocol, training

SHAPE = (8, 8, 3)


def _model():
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input(SHAPE), keras.layers.Conv2D(8, 3, padding="same"),
                             keras.layers.Activation("relu"), keras.layers.Flatten(),
                             keras.layers.Dense(10)])


def _data(model, n=40):
    x = np.random.default_rng(0).uniform(0, 1, (n,) + SHAPE).astype(np.float32)
    return x, np.argmax(model(x), axis=1).astype(np.int32)


def test_a_protocol_names_itself():
    default = protocol.Protocol()
    assert default.name == "PGD-20"
    assert default.describe() == ("PGD-20 at eps 8/255, CE loss, 20 steps of 2.5 eps / 20, "
                                  "1 random start, batches of 256 seeded with [0, 0]")
    strong = protocol.Protocol(steps=100, restarts=3, loss="cw", seed=2)
    assert strong.name == "PGD-100 CW x3" and "3 random starts" in strong.describe()
    assert strong.to_json() == {"name": "PGD-100 CW x3", "eps": 8 / 255, "steps": 100,
                                "step_size": None, "random_start": True, "restarts": 3,
                                "loss": "cw", "batch_size": 256, "seed": 2}
    for p in (default, strong, protocol.Protocol(eps=0.5, step_size=0.1, random_start=False)):
        assert protocol.Protocol.from_json(json.loads(json.dumps(p.to_json()))) == p
    with pytest.raises(dataclasses.FrozenInstanceError):
        default.steps = 10


def _before(model, x, y, p):
    """The evaluation the protocol replaced (the trainer's and the grid's on TensorFlow):
    PGD seeded with a tf.int64 [seed, 0] in every batch, in a tf.function."""
    pgd = attacks.PGD(p.eps, p.steps, p.step_size, p.random_start, p.restarts, p.loss)
    seed = tf.constant([p.seed, 0], tf.int64)

    @tf.function
    def hits(xb, yb):
        xb = pgd(model, xb, yb, seed=seed)
        return tf.argmax(model(xb, training=False), axis=-1, output_type=tf.int32) == yb

    return np.concatenate([hits(tf.constant(x[i:i + p.batch_size]),
                                tf.constant(y[i:i + p.batch_size])).numpy()
                           for i in range(0, len(x), p.batch_size)])


def test_the_protocol_gives_the_numbers_of_the_evaluation_it_replaced():
    model = _model()
    x, y = _data(model)
    for p in (protocol.Protocol(eps=8 / 255, steps=3, batch_size=16, seed=1),
              protocol.Protocol(eps=8 / 255, steps=2, restarts=2, loss="cw", batch_size=32)):
        hits = protocol.correct(model, x, y, p)
        np.testing.assert_array_equal(hits, _before(model, x, y, p))
        assert 0 < hits.mean() < 1  # the attack breaks some images, not all
        np.testing.assert_array_equal(protocol.correct(model, x, y, p), hits)  # it repeats
    assert protocol.correct(model, x, y, p, clean=True).all()  # the labels are its own


def test_the_trainers_finish_names_its_protocol(tmp_path):
    model = _model()
    x, y = _data(model)
    ds = type("Data", (), dict(x_test=x, y_test=y, x_train=x[:8],
                               class_names=[str(i) for i in range(10)]))
    config = training.TrainConfig(model_dir=str(tmp_path), eps=8 / 255, eval_pgd_steps=3,
                                  seed=4)
    results = training.finish(config, model, ds)
    assert json.loads((tmp_path / "results.json").read_text()) == results
    expected = protocol.Protocol(eps=8 / 255, steps=3, seed=4)
    assert results["protocol"] == expected.to_json() == training.eval_protocol(config).to_json()
    assert results["pgd3_acc"] == float(protocol.correct(model, x, y, expected).mean())
    assert results["pgd3_acc"] == float(_before(model, x, y, expected).mean())
    assert results["clean_acc"] == 1.0 and results["eval_examples"] == len(x)
    clean_only = training.finish(dataclasses.replace(config, eval_pgd_steps=0), model, ds)
    assert set(clean_only) == {"clean_acc", "devices", "eval_examples", "train_examples", "eps"}


_ON_JAX = """
import sys
import jax, jax.numpy as jnp, keras, numpy as np
from sparta_tf import attacks, protocol
keras.utils.set_random_seed(0)
model = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(8, 3, padding="same"),
                          keras.layers.Activation("relu"), keras.layers.Flatten(),
                          keras.layers.Dense(10)])
x = np.random.default_rng(0).uniform(0, 1, (40, 8, 8, 3)).astype(np.float32)
y = np.argmax(np.asarray(model(x)), axis=1).astype(np.int32)
p = protocol.Protocol(eps=8 / 255, steps=3, batch_size=16, seed=1)
# The evaluation the protocol replaced on JAX (the trainer's): an int32 [seed, 0] key.
pgd, key = attacks.PGD(p.eps, p.steps), jnp.asarray([p.seed, 0], "int32")
trainable = [v.value for v in model.trainable_variables]
non_trainable = [v.value for v in model.non_trainable_variables]
@jax.jit
def hits(trainable, non_trainable, xb, yb):
    def logits(images, training=False):
        return model.stateless_call(trainable, non_trainable, images, training=training)[0]
    return jnp.argmax(logits(pgd(logits, xb, yb, seed=key)), axis=-1) == yb
before = np.concatenate([np.asarray(hits(trainable, non_trainable, x[i:i + 16], y[i:i + 16]))
                         for i in range(0, 40, 16)])
now = protocol.correct(model, x, y, p)
assert np.array_equal(now, before), (now, before)
assert 0 < now.mean() < 1 and protocol.correct(model, x, y, p, clean=True).all()
print("tensorflow imported:", "tensorflow" in sys.modules)
"""


@needs_jax
def test_the_protocol_runs_on_jax_without_tensorflow(tmp_path):
    out = subprocess.run([sys.executable, "-c", _ON_JAX], cwd=ROOT, capture_output=True,
                         text=True, env=jax_without_tensorflow(tmp_path / "blocked"),
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "tensorflow imported: False" in out.stdout
