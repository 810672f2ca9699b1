"""CIFAR-style ResNets and a WideResNet, with any activation of `activations`.

`build(name, num_classes, activation=...)` returns a functional Keras model
that takes pixels in [0, 1], normalises them per channel inside itself, and
outputs logits (no softmax). The final Dense layer is float32, so the logits
stay float32 under mixed precision.

The networks follow the common CIFAR references (kuangliu/pytorch-cifar; the
WideResNet of the TRADES/MART code): a 3x3 stem convolution with no max-pool,
global average pooling, and a Dense layer. Convolutions have no bias.

- `resnet10`, `resnet18`, `resnet34`: basic blocks `conv3x3-BN-act, conv3x3-BN,
  add, act`, [1, 1, 1, 1], [2, 2, 2, 2] and [3, 4, 6, 3] per stage, widths 64,
  128, 256, 512 (ResNet-10: half of ResNet-18's layers to compile and run, for
  quick trials and the tests).
- `resnet50`: bottleneck blocks `conv1x1-BN-act, conv3x3-BN-act, conv1x1-BN,
  add, act`, output width 4 x the inner width, [3, 4, 6, 3] per stage.
- `preact_resnet18`: pre-activation blocks `BN-act-conv3x3, BN-act-conv3x3,
  add`, [2, 2, 2, 2]. As in the reference, the stem is a bare convolution and
  there is no BN-act before the pooling.
- `wrn34_10`: WideResNet-34-10, 5 pre-activation blocks per stage, widths 160,
  320, 640, a bare 16-wide stem convolution, and a final BN-act.

A shortcut is the identity where the shape stays, else a strided 1x1
convolution (with BN in the post-activation blocks; from the first
activation's output in the pre-activation blocks). Every width is scaled by
`width_multiplier` as `max(1, int(round(width_multiplier * width)))`.

Activation names. Every activation layer is named after the canonical
activation name (`activations.canonical_name`) and its place, so that the
activations of two models can be listed and matched:

- `{act}_stem`: after the stem convolution and BN (ResNet-10/18/34/50 only);
- `{act}_s{stage}b{block}_{i}`: inside block `block` (from 0) of stage
  `stage` (from 1), `i` = 1, 2, ... in order, and `out` for the one after the
  residual add (post-activation blocks only);
- `{act}_head`: the final BN-act before the pooling (WRN-34-10 only).

With `sparta_sharing="stage"` there is one Sparta layer per stage instead,
called at every activation of the stage; the stem's activation uses the
first stage's and the head's the last stage's. It is named `sparta_s{stage}`.
Where an activation of the stage has another width than the stage's own (the
4x-wide outputs of the ResNet-50 bottlenecks; the first pre-activation of a
stage, which sees the previous stage's width), those of each other width share
a second layer, `sparta_s{stage}_c{channels}`. Stage sharing is for Sparta
only: asking it for another activation is a ValueError.

Feature denoising (Xie et al., CVPR 2019), the other comparison that Sparta's
paper names: with `denoise="nonlocal"` or `"mean"`, a denoising block follows
every stage: `x + BN(conv1x1(D(x)))`, where `D` is `layers.NonLocalMeans`
(embedded Gaussian non-local means) or a 3x3 mean filter. The BN's scale
starts at 0, so each block starts as the identity. Its layers are
`s{stage}_denoise` (the filter), `s{stage}_denoise_conv`, `_bn` and `_add`.

Other layers are named `stem_conv`, `stem_bn`, `s{stage}b{block}_conv{j}`,
`s{stage}b{block}_bn{j}`, `s{stage}b{block}_shortcut_conv`/`_bn`,
`s{stage}b{block}_add`, `head_bn`, `normalize`, `pool` and `logits`; the input
is `pixels`.
"""

import collections
import functools

import keras

from sparta_tf import activations, keras_private, layers

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)

SHARING = ("layer", "stage")
DENOISE = ("none", "nonlocal", "mean")


class _Activations:
    """Makes the activations of one model, named and shared as described above."""

    def __init__(self, activation, activation_kwargs, sharing):
        self.name = activations.canonical_name(activation)
        if sharing not in SHARING:
            raise ValueError(
                f"Unknown sparta_sharing {sharing!r}; valid values: {', '.join(SHARING)}.")
        if sharing == "stage" and self.name != "sparta":
            raise ValueError(
                f"sparta_sharing='stage' is for the sparta activation only; got "
                f"activation {activation!r}. Use sparta_sharing='layer'.")
        self._factory = activations.get(activation, **(activation_kwargs or {}))
        self._sharing = sharing
        self._shared = {}

    def __call__(self, x, tag, stage, stage_width):
        """Applies the activation at place `tag` of stage `stage` to `x`."""
        if self._sharing == "layer":
            return self._factory(name=f"{self.name}_{tag}")(x)
        channels = x.shape[-1]
        if (stage, channels) not in self._shared:
            suffix = "" if channels == stage_width else f"_c{channels}"
            self._shared[stage, channels] = self._factory(
                name=f"{self.name}_s{stage}{suffix}")
        return self._shared[stage, channels](x)


def _conv(x, width, kernel_size, stride, name):
    return keras.layers.Conv2D(
        width, kernel_size, strides=stride, padding="same", use_bias=False,
        kernel_initializer="he_normal", name=name)(x)


def _batch_norm(**kwargs):
    # PyTorch's BatchNorm2d defaults, as in the references; `build(synchronized=True)`
    # synchronizes them over the replicas of a TensorFlow strategy.
    return keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5, **kwargs)


def unsynchronize(model):
    """Sets `synchronized` to False on every BatchNormalization of `model`, as a file of it
    should say: Keras refuses `synchronized=True` on a backend other than TensorFlow, and the
    layer's weights are the same either way."""
    for layer in keras_private.nested_layers(model):
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.synchronized = False


def _bn(x, name):
    return _batch_norm(name=name)(x)


def _denoise_block(x, kind, prefix):
    """`x + BN(conv1x1(D(x)))`, D non-local means or a 3x3 mean filter; starts as x."""
    if kind == "nonlocal":
        y = layers.NonLocalMeans(name=prefix)(x)
    else:
        y = keras.layers.AveragePooling2D(3, strides=1, padding="same", name=prefix)(x)
    y = _conv(y, x.shape[-1], 1, 1, f"{prefix}_conv")
    y = _batch_norm(gamma_initializer="zeros", name=f"{prefix}_bn")(y)
    return keras.layers.Add(name=f"{prefix}_add")([x, y])


def _keeps_shape(x, width, stride):
    return stride == 1 and x.shape[-1] == width


def _shortcut(x, width, stride, prefix):
    """The identity where the shape stays, else a strided 1x1 convolution and BN."""
    if _keeps_shape(x, width, stride):
        return x
    return _bn(_conv(x, width, 1, stride, f"{prefix}_shortcut_conv"), f"{prefix}_shortcut_bn")


def _basic_block(x, width, stride, act, prefix):
    """`conv3x3-BN-act, conv3x3-BN`, add the shortcut, act (ResNet-10/18/34)."""
    shortcut = _shortcut(x, width, stride, prefix)
    y = act(_bn(_conv(x, width, 3, stride, f"{prefix}_conv1"), f"{prefix}_bn1"),
            f"{prefix}_1")
    y = _bn(_conv(y, width, 3, 1, f"{prefix}_conv2"), f"{prefix}_bn2")
    y = keras.layers.Add(name=f"{prefix}_add")([y, shortcut])
    return act(y, f"{prefix}_out")


def _bottleneck_block(x, width, stride, act, prefix):
    """`conv1x1-BN-act, conv3x3-BN-act, conv1x1-BN` (4 x width), add, act (ResNet-50)."""
    out_width = 4 * width
    shortcut = _shortcut(x, out_width, stride, prefix)
    y = act(_bn(_conv(x, width, 1, 1, f"{prefix}_conv1"), f"{prefix}_bn1"),
            f"{prefix}_1")
    y = act(_bn(_conv(y, width, 3, stride, f"{prefix}_conv2"), f"{prefix}_bn2"),
            f"{prefix}_2")
    y = _bn(_conv(y, out_width, 1, 1, f"{prefix}_conv3"), f"{prefix}_bn3")
    y = keras.layers.Add(name=f"{prefix}_add")([y, shortcut])
    return act(y, f"{prefix}_out")


def _preact_block(x, width, stride, act, prefix):
    """`BN-act-conv3x3, BN-act-conv3x3`, add the shortcut (PreAct-ResNet, WRN)."""
    y = act(_bn(x, f"{prefix}_bn1"), f"{prefix}_1")
    shortcut = x
    if not _keeps_shape(x, width, stride):
        shortcut = _conv(y, width, 1, stride, f"{prefix}_shortcut_conv")
    y = _conv(y, width, 3, stride, f"{prefix}_conv1")
    y = act(_bn(y, f"{prefix}_bn2"), f"{prefix}_2")
    y = _conv(y, width, 3, 1, f"{prefix}_conv2")
    return keras.layers.Add(name=f"{prefix}_add")([y, shortcut])


_Architecture = collections.namedtuple(
    "_Architecture",
    ["block", "blocks_per_stage", "stage_widths", "stem_width", "stem_activation",
     "head_activation"])

_RESNET_WIDTHS = (64, 128, 256, 512)

_ARCHITECTURES = {
    "resnet10": _Architecture(_basic_block, (1, 1, 1, 1), _RESNET_WIDTHS, 64, True, False),
    "resnet18": _Architecture(_basic_block, (2, 2, 2, 2), _RESNET_WIDTHS, 64, True, False),
    "resnet34": _Architecture(_basic_block, (3, 4, 6, 3), _RESNET_WIDTHS, 64, True, False),
    "resnet50": _Architecture(_bottleneck_block, (3, 4, 6, 3), _RESNET_WIDTHS, 64, True,
                              False),
    "preact_resnet18": _Architecture(_preact_block, (2, 2, 2, 2), _RESNET_WIDTHS, 64, False,
                                     False),
    "wrn34_10": _Architecture(_preact_block, (5, 5, 5), (160, 320, 640), 16, False, True),
}

NAMES = tuple(_ARCHITECTURES)


def build(name, num_classes, activation="relu", width_multiplier=1.0,
          sparta_sharing="layer", input_shape=(32, 32, 3), activation_kwargs=None,
          mean=CIFAR10_MEAN, std=CIFAR10_STD, denoise="none", synchronized=False):
    """Builds network `name` with activation `activation`, named `{name}_{act}`.

    Args:
        name: one of `NAMES`.
        num_classes: the number of logits.
        activation: a name that `activations.get` knows.
        width_multiplier: scales every width (see the module docstring).
        sparta_sharing: "layer" (every activation its own layer) or "stage"
            (one Sparta per stage and width; sparta only).
        input_shape: `(height, width, channels)` of the pixel input.
        activation_kwargs: dict of keyword arguments for `activations.get`,
            e.g. `{"kernel_size": 3, "beta0": 1.0}` for sparta.
        mean, std: per-channel statistics of the pixels, for the
            normalisation that the model starts with.
        denoise: one of `DENOISE`: a feature-denoising block after every
            stage ("nonlocal" or "mean"), or none.
        synchronized: batch norm synchronized over the replicas of a TensorFlow
            strategy (TensorFlow only; a model saved after training says False,
            `unsynchronize`, so that its file loads on every backend).

    Returns:
        A `keras.Model` from pixels in [0, 1] to float32 logits of shape
        `(batch, num_classes)`.

    Raises:
        ValueError: for an unknown `name`, `activation`, `sparta_sharing` or
            `denoise`, or stage sharing for an activation other than sparta.
    """
    if name not in _ARCHITECTURES:
        raise ValueError(f"Unknown model {name!r}; valid names: {', '.join(NAMES)}.")
    if synchronized and keras.backend.backend() != "tensorflow":
        raise ValueError("synchronized batch norm is TensorFlow's (MirroredStrategy); on "
                         f"{keras.backend.backend()} one program computes the global batch's.")
    if denoise not in DENOISE:
        raise ValueError(f"Unknown denoise {denoise!r}; valid values: {', '.join(DENOISE)}.")
    arch = _ARCHITECTURES[name]
    acts = _Activations(activation, activation_kwargs, sparta_sharing)

    def scale(width):
        return max(1, int(round(width_multiplier * width)))

    inputs = keras.Input(shape=input_shape, name="pixels")
    x = keras.layers.Normalization(
        mean=list(mean), variance=[s * s for s in std], name="normalize")(inputs)

    act = functools.partial(acts, stage=1, stage_width=scale(arch.stage_widths[0]))
    x = _conv(x, scale(arch.stem_width), 3, 1, "stem_conv")
    if arch.stem_activation:
        x = act(_bn(x, "stem_bn"), "stem")
    for stage, (blocks, width) in enumerate(
            zip(arch.blocks_per_stage, arch.stage_widths), start=1):
        act = functools.partial(acts, stage=stage, stage_width=scale(width))
        for block in range(blocks):
            stride = 2 if stage > 1 and block == 0 else 1
            x = arch.block(x, scale(width), stride, act, f"s{stage}b{block}")
        if denoise != "none":
            x = _denoise_block(x, denoise, f"s{stage}_denoise")
    if arch.head_activation:  # `act` is still the last stage's
        x = act(_bn(x, "head_bn"), "head")

    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = keras.layers.Dense(num_classes, dtype="float32", name="logits")(x)
    model = keras.Model(inputs, outputs, name=f"{name}_{acts.name}")
    for layer in model.layers:  # read when the layer runs, so set before any training
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.synchronized = synchronized
    return model


CAPPED = ("refuse", "keep", "replace")


def _relu_kind(layer):
    """What ReLU `layer` is: "relu" (an Activation or ReLU layer), "capped" (one with a
    maximum, ReLU6), "inner" or "inner_capped" (a layer such as Conv2D or Dense built with
    `activation="relu"` or "relu6"), or None (none: a leaky or shifted ReLU is none)."""
    if isinstance(layer, keras.layers.ReLU):
        if layer.negative_slope or layer.threshold:
            return None
        return "relu" if layer.max_value is None else "capped"
    function = getattr(layer, "activation", None)
    if not callable(function) or isinstance(layer, keras.Model):
        return None
    kind = {"relu": "relu", "relu6": "capped"}.get(keras.activations.serialize(function))
    if kind is None or isinstance(layer, keras.layers.Activation):
        return kind
    return "inner" if kind == "relu" else "inner_capped"


def replace_activations(model, activation="sparta", capped="refuse", **options):
    """A copy of the Keras `model` in which each ReLU is `activation`, every other layer
    keeping its weights (a pretrained model stays pretrained):

        net = keras.applications.ResNet50V2(weights=None, input_shape=(32, 32, 3), classes=10)
        net = sparta_tf.models.replace_activations(net, "sparta", kernel_size=3)

    Each ReLU is an `Activation("relu")` layer, a `ReLU` layer without a negative slope or a
    threshold, or a layer built with `activation="relu"` (Conv2D, Dense, ...), which becomes
    that layer without its activation, then the new one (named `{layer}_{activation}`). A
    replaced activation layer keeps its name. A capped ReLU (`ReLU(max_value=6)`,
    `activation="relu6"`) is what `capped` says, never silently: "refuse" (the default)
    raises, naming them; "keep" leaves them; "replace" replaces them too (the cap is gone).

    Args:
        model: a functional or Sequential Keras model (built). A model nested in it that
            holds a ReLU is refused: replace its activations first.
        activation: a name that `activations.get` knows ("sparta", "silu", ...).
        capped: "refuse", "keep" or "replace" (see above).
        **options: keyword arguments of the activation (`activations.get`), e.g.
            `kernel_size=3`.

    Returns: a new model with the same inputs and outputs; `model` is left as it was.

    Raises:
        ValueError: capped ReLUs and `capped="refuse"`; an unknown `capped` or
            `activation`; a nested model that holds a ReLU; a model that is neither
            functional nor Sequential, or not built.
    """
    if capped not in CAPPED:
        raise ValueError(f"capped must be one of {CAPPED}; got {capped!r}.")
    make = activations.get(activation, **options)
    if not isinstance(model, keras.Model) or not model.built or not model.inputs:
        raise ValueError("replace_activations takes a built functional or Sequential model "
                         f"(from keras.Input); got {type(model).__name__}.")
    for layer in model.layers:
        if isinstance(layer, keras.Model) and any(
                _relu_kind(inner) for inner in keras_private.nested_layers(layer)):
            raise ValueError(f"The nested model {layer.name!r} holds ReLUs: replace its "
                             "activations first (replace_activations on it), then nest it.")
    kinds = {id(layer): _relu_kind(layer) for layer in model.layers}
    found = [layer.name for layer in model.layers
             if kinds[id(layer)] in ("capped", "inner_capped")]
    if found and capped == "refuse":
        raise ValueError(
            f"{len(found)} capped ReLU(s) (ReLU6): {', '.join(found[:5])}"
            f"{', ...' if len(found) > 5 else ''}. Say what becomes of them: capped='keep' "
            "leaves them, capped='replace' replaces them too (the cap is gone).")
    replaced = {"relu", "inner"} | ({"capped", "inner_capped"} if capped == "replace" else set())
    copies, after = [], {}  # (old, new) of the layers whose weights are copied; new: act

    def clone(layer):
        kind = kinds.get(id(layer)) if kinds.get(id(layer)) in replaced else None
        if kind in ("relu", "capped"):
            return make(name=layer.name)
        config = layer.get_config()
        if kind is not None:  # "inner": the layer without its activation, then the new one
            config["activation"] = "linear"
        new = layer.__class__.from_config(config)
        if kind is not None:
            after[id(new)] = make(name=f"{layer.name}_{activation}")
        copies.append((layer, new))
        return new

    def call(layer, *args, **kwargs):
        out = layer(*args, **kwargs)
        return after[id(layer)](out) if id(layer) in after else out

    if isinstance(model, keras.Sequential):  # (clone_model calls no call_function there)
        stack = [keras.Input(batch_shape=model.inputs[0].shape)]
        for layer in model.layers:
            stack.append(clone(layer))
            if id(stack[-1]) in after:
                stack.append(after[id(stack[-1])])
        new_model = keras.Sequential(stack, name=model.name)
    else:
        new_model = keras.models.clone_model(model, clone_function=clone, call_function=call)
    for old, new in copies:
        new.set_weights(old.get_weights())
    return new_model
