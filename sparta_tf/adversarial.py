"""Adversarial training: the objectives, and the model whose `train_step` runs them.

`AdversarialModel` wraps a classifier (pixels in [0, 1] -> logits) and trains it with one
of three objectives, each a small loss in `keras.ops`:

- `standard`: cross-entropy on clean images;
- `pgd`: cross-entropy on PGD examples (Madry et al., 2018);
- `trades`: CE(clean) + beta * KL(p(clean) || p(adv)), with the adversarial example
  maximising that KL (Zhang et al., 2019).

A train step reads: seed, attack, loss, update. The seed, the attack, the loss and the
metrics are written here once; the step itself is the backend's
(`sparta_tf/backend/tensorflow_trainer.py` with a GradientTape, `jax_trainer.py` stateless),
as Keras's own trainers are one small file per backend, and Keras's `fit` runs it.
`build(config, ...)` makes the model of a `TrainConfig`. This module imports no TensorFlow.
"""

import keras

from sparta_tf import attacks, models, transfer
from sparta_tf.config import OBJECTIVES, learning_rate

if keras.backend.backend() == "jax":
    from sparta_tf.backend.jax_trainer import TrainStep
elif keras.backend.backend() == "tensorflow":
    from sparta_tf.backend.tensorflow_trainer import TrainStep
else:
    class TrainStep:  # importable everywhere: `import sparta_tf` is (layers.Sparta runs on all)
        """No train step: adversarial training runs on TensorFlow and JAX only."""

        def train_step(self, *args):
            raise NotImplementedError(
                f"AdversarialModel trains on the tensorflow and jax backends of Keras, not on "
                f"{keras.backend.backend()!r} (layers.Sparta runs on every backend).")

ops = keras.ops


def _ce(logits, y):
    """Per-example cross-entropy to int labels, in float32."""
    return ops.sparse_categorical_crossentropy(y, ops.cast(logits, "float32"), from_logits=True)


def soft_ce(logits, target):
    """Cross-entropy to soft targets: KL(target || softmax(logits)) up to a constant."""
    return ops.categorical_crossentropy(target, logits, from_logits=True)


def kl(p_logits, q_logits):
    """Per-example KL(softmax(p) || softmax(q))."""
    p_log = ops.log_softmax(p_logits)
    return ops.sum(ops.exp(p_log) * (p_log - ops.log_softmax(q_logits)), axis=-1)


def standard_loss(forward, x, y, x_adv, beta):
    """CE on the clean images. Returns (loss, clean logits, adversarial logits)."""
    logits = ops.cast(forward(x), "float32")
    return ops.mean(_ce(logits, y)), logits, None


def pgd_loss(forward, x, y, x_adv, beta):
    """CE on the PGD examples (Madry et al.)."""
    adv_logits = ops.cast(forward(x_adv), "float32")
    return ops.mean(_ce(adv_logits, y)), None, adv_logits


def trades_loss(forward, x, y, x_adv, beta):
    """CE(clean) + beta * KL(p(clean) || p(adv)) (Zhang et al.). The adversarial images
    go through the network first, then the clean ones (batch statistics in that order)."""
    adv_logits = ops.cast(forward(x_adv), "float32")
    logits = ops.cast(forward(x), "float32")
    return ops.mean(_ce(logits, y) + beta * kl(logits, adv_logits)), logits, adv_logits


LOSSES = {"standard": standard_loss, "pgd": pgd_loss, "trades": trades_loss}


class AdversarialModel(TrainStep, keras.Model):
    """A classifier whose `train_step` runs adversarial training.

    Args:
        model: a Keras model from pixels in [0, 1] to logits.
        objective: one of `OBJECTIVES`.
        attack: an `attacks.PGD`, used by `pgd` and `trades` (for `trades` its
            loss is replaced by the KL to the clean prediction).
        trades_beta: the weight of the KL term of `trades`.
        weight_decay: L2 coefficient, added to the loss as
            `weight_decay / 2 * sum(w ** 2)` (PyTorch's coupled SGD weight decay).
        decay_sparta: whether the Sparta parameters get weight decay too.
        sparta_lr_multiplier: scales the gradients of the Sparta parameters,
            which for SGD (with momentum) multiplies their learning rate.
        seed: the seed of PGD's random start, folded with the step (and replica).
    """

    def __init__(self, model, objective="pgd", attack=None, trades_beta=6.0,
                 weight_decay=0.0, decay_sparta=True, sparta_lr_multiplier=1.0, seed=0,
                 **kwargs):
        super().__init__(**kwargs)
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}; got {objective!r}.")
        if objective != "standard" and attack is None:
            raise ValueError(f"objective {objective!r} needs an attack.")
        self.model = model
        self.objective = objective
        self.loss_of = LOSSES[objective]
        self.attack = attack
        if objective == "trades":  # the same PGD, maximising the KL to the clean prediction
            self.attack = attacks.PGD(attack.eps, attack.steps, attack.step_size,
                                      attack.random_start, attack.restarts, loss=soft_ce,
                                      training=attack.training)  # its checks run again
        self.trades_beta = trades_beta
        self.weight_decay = weight_decay
        sparta = {id(v) for layer in transfer.sparta_layers(model).values()
                  for v in layer.trainable_variables}
        # By position in model.trainable_variables: the step may see values, not variables.
        self.decayed = [i for i, v in enumerate(model.trainable_variables)
                        if decay_sparta or id(v) not in sparta]
        self.gradient_scale = [sparta_lr_multiplier if id(v) in sparta else 1.0
                               for v in model.trainable_variables]
        self.seed = seed
        self.logs_as_vectors = False
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.clean_acc = keras.metrics.SparseCategoricalAccuracy(name="clean_acc")
        self.adv_acc = keras.metrics.SparseCategoricalAccuracy(name="adv_acc")

    @property
    def metrics(self):
        """What the progress bar and metrics.jsonl show: the loss, and the accuracy on the
        batch of each kind of image that the loss sees (clean for `standard`, adversarial for
        `pgd`, both for `trades`), from the logits of the loss itself: training mode (batch
        statistics), before the step's update. No forward pass runs for a metric alone."""
        shown = {"standard": [self.clean_acc], "pgd": [self.adv_acc],
                 "trades": [self.clean_acc, self.adv_acc]}[self.objective]
        return [self.loss_tracker, *shown]

    def call(self, x, training=False):
        return self.model(x, training=training)

    def adversarial_examples(self, model, x, y, seed):
        """The attack of the objective on `model` (inference mode), or None (`standard`)."""
        if self.objective == "pgd":
            return self.attack(model, x, y, seed=seed)
        if self.objective == "trades":
            target = ops.softmax(ops.cast(model(x, training=False), "float32"))
            return self.attack(model, x, target, seed=seed)
        return None

    def total_loss(self, forward, x, y, x_adv, trainable):
        """(loss, the loss plus weight decay on `trainable` (values or variables, in the
        order of model.trainable_variables), clean logits, adversarial logits)."""
        loss, logits, adv_logits = self.loss_of(forward, x, y, x_adv, self.trades_beta)
        total = loss
        if self.weight_decay and self.decayed:  # none where only frozen layers or gates are
            squares = [ops.sum(ops.square(trainable[i])) for i in self.decayed]
            total = total + self.weight_decay / 2 * sum(squares[1:], squares[0])
        return loss, total, logits, adv_logits

    def update_metrics(self, loss, y, logits, adv_logits):
        """Updates the metrics with the step's loss and logits; returns their results."""
        self.loss_tracker.update_state(loss)
        if logits is not None:
            self.clean_acc.update_state(y, logits)
        if adv_logits is not None:
            self.adv_acc.update_state(y, adv_logits)
        return {m.name: m.result() for m in self.metrics}

    def scaled_gradients(self, grads):
        """The gradients with the Sparta ones scaled by `sparta_lr_multiplier`."""
        return [g if s == 1.0 else g * s for g, s in zip(grads, self.gradient_scale)]


def build(config, num_classes, input_shape, steps_per_epoch, sources=None,
          synchronized=False):
    """The wrapped model of `config`, compiled with SGD (under the strategy's scope on TF).
    `synchronized`: batch norm over the replicas of a TensorFlow strategy (`models.build`).

    `sources` (`training.with_sources`): with `"sparta_from"` (a Keras model), its Sparta
    parameters are copied into the network and frozen (`transfer.copy_and_freeze`); with
    `"gates_from"`, everything but its activations is (`transfer.copy_network_and_freeze`),
    so that only the gates train. Both before the optimizer and the weight decay see the
    trainable variables.
    """
    sources = sources or {}
    net = models.build(config.model, num_classes, activation=config.activation,
                       width_multiplier=config.width_multiplier,
                       sparta_sharing=config.sparta_sharing, input_shape=input_shape,
                       activation_kwargs=config.activation_kwargs(), denoise=config.denoise,
                       synchronized=synchronized)
    if "sparta_from" in sources:
        transfer.copy_and_freeze(sources["sparta_from"], net)
    if "gates_from" in sources:
        transfer.copy_network_and_freeze(sources["gates_from"], net)
    attack = None
    if config.objective != "standard":
        attack = attacks.PGD(config.eps, config.pgd_steps, config.pgd_step_size)
    model = AdversarialModel(net, config.objective, attack, config.trades_beta,
                             config.weight_decay, config.sparta_weight_decay,
                             config.sparta_lr_multiplier, config.seed)
    optimizer = keras.optimizers.SGD(learning_rate(config, steps_per_epoch),
                                     momentum=config.momentum)
    # On JAX the step is always compiled (jax.jit); --jit_compile is TensorFlow's XLA.
    jit = config.jit_compile if keras.backend.backend() == "tensorflow" else True
    model.compile(optimizer=optimizer, jit_compile=jit)
    model.optimizer.build(net.trainable_variables)  # so that a checkpoint can restore into it
    return model
