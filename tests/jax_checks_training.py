"""One AT step of `adversarial.AdversarialModel` on a batch, for the TF/JAX cross-check, and
one whose attack returns known images (`known_images_step`).

`tests/test_jax_training.py::test_the_tf_and_jax_steps_agree` runs `step(folder)` on
TensorFlow in its own process, and this file as a script on JAX (TensorFlow unimportable):

    KERAS_BACKEND=jax python tests/jax_checks_training.py FOLDER

Both start from the weights and batch in FOLDER (written on TensorFlow by `setup`), attack
without a random start, take one SGD step, and write what they got to FOLDER/<backend>.npz:
the adversarial images, the loss, and every weight after the step. The script also writes
FOLDER/jax_known_pgd.npz, `known_images_step("pgd")` on JAX, and FOLDER/jax_trades.npz,
`trades_step` (one TRADES step on JAX and the TRADES loss computed apart).

    KERAS_BACKEND=jax python tests/jax_checks_training.py --old_checkpoint MODEL_DIR

rewrites the newest checkpoint of a JAX run as sparta-tf wrote it before `state.npz`
(`old_checkpoint`), and `--state_devices` prints on how many devices each variable of the
training state lies after a `fit` (`state_devices`), for `test_jax_training.py`'s resume
test.
"""

import os
import sys

import keras
import numpy as np

SHAPE = (16, 16, 3)
WEIGHTS = "net.weights.h5"
BATCH = "batch.npz"
LR = 1.0  # plain SGD: the step's change of each weight is its gradient


def _models(objective):
    from sparta_tf import adversarial, attacks, models  # pylint: disable=import-outside-toplevel
    net = models.build("resnet10", 10, "sparta", width_multiplier=0.0625, input_shape=SHAPE)
    attack = attacks.PGD(8 / 255, 3, random_start=False)
    model = adversarial.AdversarialModel(net, objective, attack, weight_decay=5e-4)
    model.compile(keras.optimizers.SGD(LR))
    model.optimizer.build(net.trainable_variables)
    return net, model


def setup(folder):
    """On TensorFlow: the seeded network's weights and a batch."""
    keras.utils.set_random_seed(0)
    net, _ = _models("pgd")
    net.save_weights(os.path.join(folder, WEIGHTS))
    rng = np.random.default_rng(0)
    np.savez(os.path.join(folder, BATCH), x=rng.uniform(size=(16, *SHAPE)).astype("float32"),
             y=rng.integers(0, 10, 16).astype("int32"))


def step(folder, objective="pgd"):
    """One train step from FOLDER's weights and batch; writes FOLDER/<backend>.npz."""
    net, model = _models(objective)
    net.load_weights(os.path.join(folder, WEIGHTS))
    batch = np.load(os.path.join(folder, BATCH))
    x, y = batch["x"], batch["y"]
    backend = keras.backend.backend()
    if backend == "jax":
        from sparta_tf.backend import jax_trainer  # pylint: disable=import-outside-toplevel
        model(x[:1])  # built, as training.run does
        assert [v.path for v in model.trainable_variables] == \
            [v.path for v in net.trainable_variables]
        state = jax_trainer.train_state(model)
        x_adv = model.adversarial_examples(
            lambda v, training=False: net.stateless_call(
                state[0], state[1], v, training=training)[0], x, y, None)
        logs, state = model.train_step(state, (x, y))
        for group, values in zip((model.trainable_variables, model.non_trainable_variables),
                                 state):
            for variable, value in zip(group, values):
                variable.assign(value)
    else:
        x_adv = model.adversarial_examples(net, x, y, None)
        logs = model.train_step((x, y))
    x_adv = x if x_adv is None else x_adv  # `standard` trains on x itself
    np.savez(os.path.join(folder, f"{backend}_{objective}.npz"),
             x_adv=keras.ops.convert_to_numpy(x_adv), loss=float(logs["loss"]),
             **{f"w{i}": keras.ops.convert_to_numpy(w) for i, w in enumerate(net.weights)})


def known_images_step(objective):
    """One train step of `objective` whose attack is a stub that returns known images (the
    batch x reversed), on this process's backend: {"loss": the step's loss, "known": the loss
    on the known images, "clean": the loss on x}, both in training mode before the update."""
    from sparta_tf import adversarial  # pylint: disable=import-outside-toplevel
    keras.utils.set_random_seed(0)
    wide = keras.initializers.RandomNormal(stddev=3.0)  # logits far from uniform
    net = keras.Sequential([keras.Input(SHAPE), keras.layers.Conv2D(4, 3),
                            keras.layers.BatchNormalization(), keras.layers.ReLU(),
                            keras.layers.GlobalAveragePooling2D(),
                            keras.layers.Dense(10, kernel_initializer=wide)])
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(16, *SHAPE)).astype("float32")
    y = rng.integers(0, 10, 16).astype("int32")
    known = x[::-1].copy()  # each image with another's label

    def attack(model, images, labels, seed=None):
        return keras.ops.convert_to_tensor(known)

    def loss_on(images):
        logits = net(images, training=True)
        return float(keras.ops.mean(keras.ops.sparse_categorical_crossentropy(
            y, logits, from_logits=True)))

    model = adversarial.AdversarialModel(net, objective, attack)
    model.compile(keras.optimizers.SGD(LR))
    model.optimizer.build(net.trainable_variables)
    found = {"known": loss_on(known), "clean": loss_on(x)}
    if keras.backend.backend() == "jax":
        import jax  # pylint: disable=import-outside-toplevel
        from sparta_tf.backend import jax_trainer  # pylint: disable=import-outside-toplevel
        model(x[:1])  # built, as training.run does
        state = jax_trainer.train_state(model)
        logs, _ = jax.jit(model.train_step)(state, (x, y))
    else:
        logs = model.train_step((keras.ops.convert_to_tensor(x), keras.ops.convert_to_tensor(y)))
    return dict(found, loss=float(logs["loss"]))


def trades_step(folder):
    """On JAX: one TRADES step from FOLDER's weights and batch, and the TRADES loss (CE on x
    plus beta KL to the prediction on x_adv) of the same images, computed apart: {"loss",
    "expected", "moved" (the largest |x_adv - x|)}."""
    from sparta_tf import adversarial  # pylint: disable=import-outside-toplevel
    from sparta_tf.backend import jax_trainer  # pylint: disable=import-outside-toplevel
    net, model = _models("trades")
    net.load_weights(os.path.join(folder, WEIGHTS))
    batch = np.load(os.path.join(folder, BATCH))
    x, y = batch["x"], batch["y"]
    model(x[:1])  # built, as training.run does
    state = jax_trainer.train_state(model)
    x_adv = model.adversarial_examples(
        lambda v, training=False: net.stateless_call(
            state[0], state[1], v, training=training)[0], x, y, None)
    expected = adversarial.trades_loss(lambda v: net(v, training=True), x, y, x_adv,
                                       model.trades_beta)[0]
    logs, _ = model.train_step(state, (x, y))
    return {"loss": float(logs["loss"]), "expected": float(expected),
            "moved": float(np.max(np.abs(keras.ops.convert_to_numpy(x_adv) - x)))}


def old_checkpoint(folder):
    """On JAX: rewrites the newest checkpoint of model_dir `folder` as sparta-tf wrote it
    before `checkpoints.STATE`: the weights and the optimizer's variables in Keras's
    `state.weights.h5` (`Model.save_weights`), without the metrics' sums."""
    # pylint: disable=import-outside-toplevel
    from sparta_tf import adversarial, checkpoints, model_dir, training
    stored = model_dir.read_json(os.path.join(folder, model_dir.CONFIG))
    config, sources, ds, steps = training.prepare(training.TrainConfig.from_stored(stored))
    model = adversarial.build(config, ds.num_classes, ds.x_train.shape[1:], steps, sources)
    model(ds.x_train[:1])  # built, as training.run does
    saved = checkpoints.Checkpoints(os.path.join(folder, model_dir.CHECKPOINTS))
    saved.restore(model)
    newest = saved.latest()
    model.save_weights(os.path.join(newest, checkpoints.KERAS_STATE))
    os.remove(os.path.join(newest, checkpoints.STATE))


def state_devices():
    """On JAX: one epoch of `fit` on the devices of `--strategy=mirrored`, as sparta-train
    runs it; the sorted numbers of devices that hold each variable of the training state."""
    # pylint: disable=import-outside-toplevel
    from sparta_tf import adversarial, checkpoints, training
    from sparta_tf.backend import jax_distribute
    devices = jax_distribute.Devices("mirrored", 16)
    config = training.TrainConfig(max_train=32, max_test=8, width_multiplier=0.0625,
                                  batch_size=16, pgd_steps=1)
    config, sources, ds, steps = training.prepare(config)
    with devices.scope():
        model = adversarial.build(config, ds.num_classes, ds.x_train.shape[1:], steps, sources)
    devices.prepare(model)
    with devices.scope():
        model.fit(devices.batches(ds, config, 0, 0), epochs=1, steps_per_epoch=steps,
                  verbose=0)
    return sorted({len(v.value.sharding.device_set) for v in checkpoints.variables(model)})


if __name__ == "__main__":
    if sys.argv[1] == "--old_checkpoint":
        old_checkpoint(sys.argv[2])
        sys.exit()
    if sys.argv[1] == "--state_devices":
        print("devices of each variable:", state_devices())
        sys.exit()
    for name in ("pgd", "standard"):
        step(sys.argv[1], name)
    np.savez(os.path.join(sys.argv[1], "jax_known_pgd.npz"), **known_images_step("pgd"))
    np.savez(os.path.join(sys.argv[1], "jax_trades.npz"), **trades_step(sys.argv[1]))
    print("tensorflow imported:", "tensorflow" in sys.modules)
