"""The pictures of the comparison of activations, as PNG files.

- `robust_accuracy_vs_eps(curves, path)`: robust accuracy against the L-inf
  budget, one line per activation.
- `attention_maps(model, x_clean, x_adv, path)`: Sparta's attention map
  `sigmoid(Z)` at a few layers, for a clean image and its adversarial version,
  and their difference.
- `activation_change(models, x_clean, x_adv, path)`: per activation layer, in
  depth order, the relative change `||f(x_adv) - f(x)|| / ||f(x)||` of its
  output (e.g. ReLU against Sparta).
- `gate_weights(model, path)`: per Sparta layer, what its gate learned: the
  kernel's centre weight, the weight on the neighbours, and the bias.
- `gate_spread(model, x)` (a measurement, no picture): per Sparta layer, how
  far its gate is from 1/2 on images `x`, and the scale of its input.

Figures are drawn on `matplotlib.figure.Figure` (the Agg canvas), without
pyplot, so no global backend is set. Models are the functional Keras models of
`sparta_tf.models` (or loaded from their `.keras` files); their activation
layers are named `{activation}_{place}` as that module describes.
"""

import keras
import numpy as np
from matplotlib.figure import Figure

from sparta_tf import activations, layers

_BATCH = 64  # images per forward pass of the sub-models


def _save(fig, path):
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def robust_accuracy_vs_eps(curves, path, title=None):
    """Plots accuracy (%) against eps (in 1/255), one line per activation.

    Args:
        curves: `{activation: [[eps, accuracy], ...]}`, eps in pixels and
            accuracy in [0, 1].
        path: the PNG to write.
        title: an optional title.

    Returns: `path`.
    """
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for name, curve in curves.items():
        eps, acc = np.asarray(curve, np.float64).T
        ax.plot(eps * 255, acc * 100, marker="o", label=name)
    ax.set(xlabel="L-inf eps (x 1/255)", ylabel="robust accuracy (%)", ylim=(0, 100),
           title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def _activation_layers(model):
    """The activation layers of `model` in depth order, named `{activation}_{place}`."""
    return [l for l in model.layers if l.name.partition("_")[0] in activations.NAMES]


def _outputs(model, tensors, x):
    """The values of the symbolic `tensors` of `model` on `x`, in batches: a list of arrays."""
    sub = keras.Model(model.input, tensors)
    parts = [sub(x[i:i + _BATCH], training=False) for i in range(0, len(x), _BATCH)]
    return [np.concatenate([np.asarray(p[j]) for p in parts]) for j in range(len(tensors))]


def attention_maps(model, x_clean, x_adv, path, layer_names=None):
    """Plots Sparta's attention map sigmoid(Z) for a clean image and its adversarial version.

    The first row shows the clean image, the adversarial one and the
    perturbation (amplified to the full colour range). Each further row is one
    Sparta layer: its gate `layer.gate(input)` averaged over the channels, for
    the clean image, for the adversarial one, and their difference
    (adversarial - clean). A layer shared by a stage (`sparta_sharing="stage"`)
    is shown at its first call.

    Args:
        model: a functional Keras model with `layers.Sparta` activations.
        x_clean, x_adv: one image each, `[1, H, W, C]` pixels in [0, 1].
        path: the PNG to write.
        layer_names: the Sparta layers to show; default the first, the middle
            and the last one in depth order.

    Returns: `path`.
    """
    sparta = [l for l in model.layers if isinstance(l, layers.Sparta)]
    if not sparta:
        raise ValueError(f"Model {model.name!r} has no Sparta layer.")
    if layer_names is None:
        chosen = list(dict.fromkeys([sparta[0], sparta[len(sparta) // 2], sparta[-1]]))
    else:
        chosen = [model.get_layer(name) for name in layer_names]
    pair = np.concatenate([x_clean, x_adv]).astype(np.float32)
    inputs = _outputs(model, [l.input for l in chosen], pair)
    gates = [np.asarray(l.gate(x)).mean(axis=-1) for l, x in zip(chosen, inputs)]  # [2, h, w]

    fig = Figure(figsize=(9, 3 * (len(chosen) + 1)))
    axes = fig.subplots(len(chosen) + 1, 3, squeeze=False)
    delta = pair[1] - pair[0]
    scale = max(float(np.abs(delta).max()), 1e-12)
    for ax, image, title in zip(axes[0], [pair[0], pair[1], 0.5 + delta / (2 * scale)],
                                ["clean image", "adversarial image",
                                 f"perturbation (max {scale * 255:.1f}/255)"]):
        ax.imshow(np.clip(image, 0, 1))
        ax.set_title(title)
    for row, layer, gate in zip(axes[1:], chosen, gates):
        low, high = float(gate.min()), float(gate.max())
        for ax, g, title in zip(row, gate, ["clean", "adversarial"]):
            image = ax.imshow(g, cmap="viridis", vmin=low, vmax=high)
            ax.set_title(f"{layer.name}: sigmoid(Z), {title}", fontsize=8)
        fig.colorbar(image, ax=row[:2].tolist(), fraction=0.046)
        diff = gate[1] - gate[0]
        bound = max(float(np.abs(diff).max()), 1e-12)
        image = row[2].imshow(diff, cmap="RdBu_r", vmin=-bound, vmax=bound)
        row[2].set_title("adversarial - clean", fontsize=8)
        fig.colorbar(image, ax=row[2], fraction=0.046)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    return _save(fig, path)


def relative_change(model, x_clean, x_adv):
    """Per activation layer (depth order): the mean over images of ||f(x_adv) - f(x)|| / ||f(x)||.

    `f` is the layer's output (its first call, for a layer shared by a stage);
    the norms are L2 norms over one image's whole feature map.

    Returns: `{place: relative change}`, places as in the layer names
        (`stem`, `s1b0_1`, ...), in depth order.
    """
    found = _activation_layers(model)
    clean = _outputs(model, [l.output for l in found], np.asarray(x_clean, np.float32))
    adv = _outputs(model, [l.output for l in found], np.asarray(x_adv, np.float32))
    change = {}
    for layer, c, a in zip(found, clean, adv):
        c, a = c.reshape(len(c), -1), a.reshape(len(a), -1)
        ratio = np.linalg.norm(a - c, axis=1) / np.maximum(np.linalg.norm(c, axis=1), 1e-12)
        change[layer.name.partition("_")[2]] = float(ratio.mean())
    return change


def gate_spread(model, x):
    """Per Sparta layer (depth order): how much its gate gates, on images `x`.

    A gate of 1/2 everywhere makes Sparta the linear `x / 2`; a gate near 0 or
    1 is a hard, ReLU-like switch. Measured at the layer's first call.

    Returns: `{layer name: {"input_rms", "gate_from_half"}}`: the root mean
        square of the layer's input, and the mean of `|sigmoid(Z) - 1/2|`
        over images, positions and channels (0 to 1/2).
    """
    found = [l for l in getattr(model, "layers", []) if isinstance(l, layers.Sparta)]
    if not found:  # also a SavedModel's TFSMLayer, which has no layers
        raise ValueError(f"Model {model.name!r} has no Sparta layer.")
    inputs = _outputs(model, [l.input for l in found], np.asarray(x, np.float32))
    return {l.name: {"input_rms": float(np.sqrt(np.mean(np.square(v)))),
                     "gate_from_half": float(np.mean(np.abs(np.asarray(l.gate(v)) - 0.5)))}
            for l, v in zip(found, inputs)}


def activation_change(models, x_clean, x_adv, path):
    """Plots `relative_change` against depth, one line per model (e.g. ReLU and Sparta).

    Args:
        models: `{name: model}`.
        x_clean: images, `[N, H, W, C]` pixels in [0, 1].
        x_adv: `{name: adversarial versions of x_clean for that model}`.
        path: the PNG to write.

    Returns: `{name: {place: relative change}}`, the plotted values.
    """
    changes = {name: relative_change(m, x_clean, x_adv[name]) for name, m in models.items()}
    fig = Figure(figsize=(8, 4))
    ax = fig.subplots()
    for name, change in changes.items():
        ax.plot(range(len(change)), list(change.values()), marker="o", label=name)
    places = max(changes.values(), key=len)
    ax.set_xticks(range(len(places)), list(places), rotation=60, fontsize=7)
    ax.set(xlabel="activation layer (depth order)",
           ylabel="||f(x_adv) - f(x)|| / ||f(x)||", ylim=(0, None),
           title=f"Relative change of the activations ({len(x_clean)} images)")
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path)
    return changes


def gate_weights(model, path):
    """Plots, per Sparta layer (depth order), what its gate kernel and bias learned.

    Per layer, averaged over its channels: the centre weight of the kernel
    (where Swish's beta sits), the sum of the other k*k - 1 weights and the sum
    of their absolute values (the spatial part: 0 for Swish), and the bias.
    At the start (`beta0` at the centre, 0 elsewhere) they are beta0, 0, 0, 0.

    Args:
        model: a Keras model with `layers.Sparta` layers.
        path: the PNG to write.

    Returns: `{layer name: {"centre", "neighbours", "neighbours_abs", "bias"}}`,
        the plotted values, in depth order.
    """
    stats = {}
    for layer in model.layers:
        if isinstance(layer, layers.Sparta):
            kernel = np.asarray(layer.kernel)[..., 0]  # [k, k, C]
            k = kernel.shape[0] // 2
            centre = kernel[k, k]
            others = kernel.sum(axis=(0, 1)) - centre
            others_abs = np.abs(kernel).sum(axis=(0, 1)) - np.abs(centre)
            stats[layer.name] = {"centre": float(centre.mean()),
                                 "neighbours": float(others.mean()),
                                 "neighbours_abs": float(others_abs.mean()),
                                 "bias": float(np.asarray(layer.bias).mean())}
    if not stats:
        raise ValueError(f"Model {model.name!r} has no Sparta layer.")
    fig = Figure(figsize=(8, 4))
    ax = fig.subplots()
    labels = {"centre": "centre weight", "neighbours": "sum of neighbour weights",
              "neighbours_abs": "sum of |neighbour weights|", "bias": "bias"}
    for key, label in labels.items():
        ax.plot(range(len(stats)), [s[key] for s in stats.values()], marker="o", label=label)
    ax.axhline(0, color="black", linewidth=0.5)
    ax.set_xticks(range(len(stats)), list(stats), rotation=60, fontsize=7)
    ax.set(xlabel="Sparta layer (depth order)", ylabel="mean over channels",
           title="What Sparta's gate learned")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)
    return stats
