"""Print, at initialisation, how much gradient reaches the stem of each transfer arm.

    python tools/gradient_flow.py SOURCE [DATASET [DATA_DIR]]

For ResNet-18 and ResNet-34 at width 0.25 with ReLU, a fresh stage-shared Sparta, and
SOURCE's stage-shared Sparta copied in and frozen (`sparta_tf.transfer`), each built with
seed 0: the cross-entropy of one training-mode forward pass on 128 class-balanced training
images of DATASET (as the trainers' --dataset; default: bundled), the norms of its gradient
to the stem convolution and to the logits layer, and their ratio. A ratio far below the
others would mean that the gradient vanishes on its way down the network.
"""

import sys

import keras
import numpy as np
import tensorflow as tf

from sparta_tf import data, models, transfer


def main(args):
    if not 1 <= len(args) <= 3:
        sys.exit(__doc__)
    source_path, dataset, data_dir = args + [None, "bundled", None][len(args):]
    source = transfer.load(source_path)
    ds = data.load(dataset, data_dir=data_dir, max_train=128, max_test=1)
    x, y = tf.constant(data.pixels(ds.x_train)), tf.constant(ds.y_train.astype(np.int32))
    print("| network | arm | loss | stem gradient | logits gradient | ratio |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for name in ("resnet18", "resnet34"):
        for arm in ("relu", "sparta", "sparta_transfer"):
            keras.utils.set_random_seed(0)
            net = models.build(name, ds.num_classes, "relu" if arm == "relu" else "sparta",
                               0.25, sparta_sharing="layer" if arm == "relu" else "stage")
            if arm == "sparta_transfer":
                transfer.copy_and_freeze(source, net)
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
                    y, net(x, training=True)))
            grads = dict(zip([v.path for v in net.trainable_variables],
                             tape.gradient(loss, net.trainable_variables)))
            stem = float(tf.norm(next(g for p, g in grads.items() if "stem_conv" in p)))
            head = float(tf.norm(next(g for p, g in grads.items()
                                      if "logits" in p and "kernel" in p)))
            print(f"| {name} | {arm} | {float(loss):.3f} | {stem:.3g} | {head:.3g} | "
                  f"{stem / head:.2f} |")


if __name__ == "__main__":
    main(sys.argv[1:])
