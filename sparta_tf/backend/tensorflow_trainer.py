"""`AdversarialModel.train_step` on TensorFlow: seed, attack, loss, update.

The step under a `tf.GradientTape`, as Keras's own TensorFlow trainer writes it; Keras's
`fit` compiles it with tf.function (XLA with `--jit_compile`) and runs it in each replica of
the strategy it is called under (`sparta_tf/backend/tensorflow_distribute.py`). PGD's random
start is seeded by (seed, the optimizer's step, the replica), so it is the same on every run.
"""

import tensorflow as tf


class TrainStep:
    """`AdversarialModel.train_step` on TensorFlow: seed, attack, loss, update."""

    def train_step(self, batch):
        x, y = batch
        replica = tf.distribute.get_replica_context().replica_id_in_sync_group
        seed = tf.random.experimental.stateless_fold_in(
            tf.stack([tf.cast(self.seed, tf.int64),
                      tf.cast(self.optimizer.iterations, tf.int64)]), replica)
        x_adv = self.adversarial_examples(self.model, x, y, seed)
        variables = self.model.trainable_variables
        with tf.GradientTape() as tape:
            loss, total, logits, adv_logits = self.total_loss(
                lambda images: self.model(images, training=True), x, y, x_adv, variables)
            replicas = tf.distribute.get_strategy().num_replicas_in_sync
            scaled = self.optimizer.scale_loss(total / replicas)
        self.optimizer.apply(self.scaled_gradients(tape.gradient(scaled, variables)),
                             variables)
        logs = self.update_metrics(loss, y, logits, adv_logits)
        if self.logs_as_vectors:  # see tensorflow_distribute: Keras's multi-worker reduce
            logs = {name: tf.reshape(value, [1]) for name, value in logs.items()}
        return logs
