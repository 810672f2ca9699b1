"""`AdversarialModel.train_step` on JAX: seed, attack, loss, update, all stateless.

The stateless twin of the TensorFlow step, written as Keras's own JAX trainer writes its
step: `state` is (trainable, non-trainable, optimizer, metrics) values, the gradient comes
from `jax.value_and_grad`, the update from `optimizer.stateless_apply`, and the optimizer's
step counter and the metrics are read and updated through `keras.StatelessScope`. Keras's
`fit` runs it under `jax.jit` (and, with `keras.distribution.DataParallel`, over every
device). `train_state(model)` and `compiled_step(model)` are the state and the step that
`fit` would use, for benchmarks and checks that call the step directly.
"""

import jax
import jax.numpy as jnp
import keras


class TrainStep:
    """`AdversarialModel.train_step` on JAX (see the module docstring)."""

    def train_step(self, state, batch):
        trainable, non_trainable, optimizer_vars, metrics_vars = state
        x, y = batch
        optimizer_state = list(zip(self.optimizer.variables, optimizer_vars))
        with keras.StatelessScope(state_mapping=optimizer_state):
            iterations = self.optimizer.iterations.value
        seed = jnp.stack([jnp.asarray(self.seed, "int32"), iterations.astype("int32")])

        def inference(images, training=False):
            return self.stateless_call(trainable, non_trainable, images, training=training)[0]

        x_adv = self.adversarial_examples(inference, x, y, seed)

        def loss_fn(values):
            updated = [non_trainable]  # batch statistics, threaded through each forward

            def forward(images):
                logits, updated[0] = self.stateless_call(values, updated[0], images,
                                                         training=True)
                return logits

            loss, total, logits, adv_logits = self.total_loss(forward, x, y, x_adv, values)
            with keras.StatelessScope(state_mapping=optimizer_state):
                total = self.optimizer.scale_loss(total)
            return total, (loss, logits, adv_logits, updated[0])

        (_, (loss, logits, adv_logits, non_trainable)), grads = jax.value_and_grad(
            loss_fn, has_aux=True)(trainable)
        trainable, optimizer_vars = self.optimizer.stateless_apply(
            optimizer_vars, self.scaled_gradients(grads), trainable)
        with keras.StatelessScope(
                state_mapping=list(zip(self.metrics_variables, metrics_vars))) as scope:
            logs = self.update_metrics(loss, y, logits, adv_logits)
        metrics_vars = [_or(scope.get_current_value(v), old)
                        for v, old in zip(self.metrics_variables, metrics_vars)]
        return logs, (trainable, non_trainable, optimizer_vars, metrics_vars)


def _or(value, default):
    return default if value is None else value


def train_state(model):
    """The (trainable, non-trainable, optimizer, metrics) values of a built, compiled
    `AdversarialModel`: the `state` of its `train_step`."""
    return ([v.value for v in model.trainable_variables],
            [v.value for v in model.non_trainable_variables],
            [v.value for v in model.optimizer.variables],
            [v.value for v in model.metrics_variables])


def compiled_step(model):
    """`model.train_step` under `jax.jit`, its state donated, as `fit` compiles it."""
    return jax.jit(model.train_step, donate_argnums=0)
