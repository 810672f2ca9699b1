"""Reuse a trained Sparta: copy the Sparta parameters of one model into another and freeze them.

The paper's second claim (SPARTA.md, statement 4): a Sparta function trained with one network
and dataset can be fixed and reused to adversarially train another network, or on another
dataset. In a user's own code:

    source = transfer.load("runs/r18")                       # a model_dir or a .keras file
    target = models.build("resnet34", 10, "sparta", sparta_sharing="stage")
    transfer.copy_and_freeze(source, target)                 # then train `target` as usual

`mapping(source, target)` pairs each Sparta layer of the target with one of the source:

- By name, where every target name is a source name: the same network, or stage-shared
  Sparta (`sparta_s{stage}`), which maps stage to stage, so ResNet-18 goes to ResNet-34 and
  to any network with the same stage widths.
- Per-layer Sparta of `sparta_tf.models` (`sparta_stem`, `sparta_s{stage}b{block}_{role}`,
  `sparta_head`), by relative position inside each stage: block `b` of the target's `B_t`
  blocks of a stage takes block `floor((b + 1/2) * B_s / B_t)` of the source's `B_s`, in the
  same role (`1`, `2`, `out`); the stem and head take the stem and head.
- Any other naming: pass `names={target_layer: source_layer}`.

A sharing, width, kernel size or gate-input option that does not match is a `TransferError`
that names both layers and both shapes, raised before any value is copied. Frozen layers
are `trainable=False`: they get no gradient, no weight decay, and keep their values through
checkpoints and `.keras` files.

The converse, `copy_network_and_freeze(source, target)`, keeps a trained network and trains
only its gates (the gates-only probe, `--gates_from`): every layer of the target but its
Sparta layers takes the weights of the source's layer of the same name (the same
architecture with another activation, SiLU say) and is frozen. Frozen batch norm layers
run in inference mode (Keras 3), on the moving statistics the source trained.

This module imports nothing of `sparta_tf` but `layers`, `model_dir` (where a model_dir
keeps its model.keras) and `keras_private` (to find nested layers).
"""

import hashlib
import json
import os
import re
import tempfile
import zipfile

import keras
import numpy as np

from sparta_tf import keras_private, layers, model_dir

_STAGE_SHARED = re.compile(r"sparta_s\d+(_c\d+)?")
_PER_LAYER = re.compile(r"sparta_s(\d+)b(\d+)_(\w+)")
_ENDS = ("sparta_stem", "sparta_head")


class TransferError(ValueError):
    """The Sparta layers of two models cannot be mapped onto each other."""


class ModelFileError(ValueError):
    """A model file exists but cannot be loaded: corrupt, truncated, or refused as unsafe."""


# The most that a JSON file inside a .keras file (config.json, metadata.json) may hold:
# Keras reads it whole, and a model's config is a few MiB at most.
MAX_JSON_BYTES = 64 * 2**20


def load(path):
    """The Keras model of a `sparta-train` model_dir (its model.keras) or of a `.keras` file.

    The one loader of `.keras` files (evaluation and export use it too). It loads under
    Keras's safe_mode: a file that holds arbitrary Python code (a `Lambda` layer) is
    refused, not run. A JSON file inside it of more than `MAX_JSON_BYTES` (as its zip
    directory says: Python's zip reader reads no more) is refused before Keras reads it.

    Raises:
        FileNotFoundError: `path` holds no `.keras` file (`model_dir.keras_file`).
        ModelFileError: the file is no `.keras` archive (corrupt or truncated), holds a JSON
            file of more than `MAX_JSON_BYTES`, is refused by safe_mode, or fails to load
            otherwise; the message names the file and why.
    """
    file = model_dir.keras_file(path)
    if not zipfile.is_zipfile(file):  # Keras would say "File not found"
        raise ModelFileError(f"{file} is not a .keras file: it is no zip archive (corrupt or "
                             "truncated?).")
    _check_json_sizes(file)
    try:
        return _load_keras_file(file)
    except Exception as e:  # noqa: BLE001 - any failure of a bad file is one clear line
        cause = (str(e).strip().splitlines() or [""])[0][:300]
        if "safe_mode" in str(e):
            raise ModelFileError(
                f"{file} is refused: it holds arbitrary Python code (a Lambda layer or a "
                "lambda), and .keras files are loaded with Keras's safe_mode on. Only if you "
                "trust its author, load it yourself with safe_mode=False.") from e
        raise ModelFileError(f"{file} could not be loaded as a Keras model (corrupt or "
                             f"truncated?): {type(e).__name__}: {cause}") from e


def _check_json_sizes(file):
    """Refuses a `.keras` file whose JSON members hold more than `MAX_JSON_BYTES`."""
    try:
        with zipfile.ZipFile(file) as archive:
            members = archive.infolist()
    except (zipfile.BadZipFile, OSError) as e:
        raise ModelFileError(f"{file} is not a .keras file: its zip directory cannot be read "
                             f"(corrupt or truncated?): {e}") from None
    for item in members:
        if item.filename.endswith(".json") and item.file_size > MAX_JSON_BYTES:
            raise ModelFileError(
                f"{file} is refused: its {item.filename[:100]!r} holds {item.file_size:,} "
                f"bytes, more than the {MAX_JSON_BYTES // 2**20} MiB a model's config may "
                "hold (a damaged or hostile file?).")


def _load_keras_file(file):
    """`keras.models.load_model(file, safe_mode=True)`, on any backend.

    sparta-tf 0.1 on TensorFlow saved its batch norm `synchronized=True` (now only a model
    built for several replicas has it, and sparta-train saves it plain), which Keras refuses
    on other backends. There,
    a file that asks for it is loaded from a copy whose batch norm is plain: on one device
    the two are the same layer with the same weights.
    """
    if keras.backend.backend() == "tensorflow":
        return keras.models.load_model(file, safe_mode=True)
    with zipfile.ZipFile(file) as archive:
        config = json.loads(archive.read("config.json"))
        if not _unsynchronize(config):
            return keras.models.load_model(file, safe_mode=True)
        with tempfile.TemporaryDirectory() as folder:
            copy = os.path.join(folder, os.path.basename(file))
            with zipfile.ZipFile(copy, "w") as out:
                for item in archive.infolist():
                    out.writestr(item, json.dumps(config) if item.filename == "config.json"
                                 else archive.read(item))
            return keras.models.load_model(copy, safe_mode=True)


def _unsynchronize(node):
    """Sets `synchronized` to False in every BatchNormalization config inside the JSON
    `node`, in place; returns how many it changed."""
    if isinstance(node, list):
        return sum(_unsynchronize(child) for child in node)
    if not isinstance(node, dict):
        return 0
    changed = 0
    config = node.get("config")
    if node.get("class_name") == "BatchNormalization" and isinstance(config, dict) \
            and config.get("synchronized"):
        config["synchronized"] = False
        changed = 1
    return changed + sum(_unsynchronize(child) for child in node.values())


def sparta_layers(model):
    """The `layers.Sparta` layers of `model` (nested ones too), in model order, by name."""
    found = [l for l in keras_private.nested_layers(model) if isinstance(l, layers.Sparta)]
    return {l.name: l for l in found}


def _some(names, shown=4):
    names = list(names)
    more = f", ... ({len(names)} in all)" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def _sharing(names):
    if all(_STAGE_SHARED.fullmatch(n) for n in names):
        return "stage"
    if all(_PER_LAYER.fullmatch(n) or n in _ENDS for n in names):
        return "layer"
    return None


def _by_position(source_names, target_names):
    """{target: source} for per-layer Sparta, by relative block position inside each stage."""
    blocks = {}  # (which model, stage) -> number of blocks
    for which, names in (("source", source_names), ("target", target_names)):
        for name in names:
            match = _PER_LAYER.fullmatch(name)
            if match:
                key = (which, int(match[1]))
                blocks[key] = max(blocks.get(key, 0), int(match[2]) + 1)
    pairs = {}
    for name in target_names:
        match = _PER_LAYER.fullmatch(name)
        if not match:  # the stem or the head
            pairs[name] = name
            continue
        stage, block, role = int(match[1]), int(match[2]), match[3]
        source_blocks = blocks.get(("source", stage), 0)
        source_block = int((block + 0.5) * source_blocks / blocks["target", stage])
        pairs[name] = f"sparta_s{stage}b{source_block}_{role}"
    return pairs


def mapping(source, target, names=None):
    """Pairs each Sparta layer of `target` with the Sparta layer of `source` it copies.

    Args:
        source, target: Keras models with `layers.Sparta` layers.
        names: optional `{target layer name: source layer name}`; by default the
            mapping of the module docstring.

    Returns: a list of `(source layer, target layer)`, in the target's order.

    Raises:
        TransferError: a model has no Sparta layer, the sharings differ, a
            target layer has no counterpart, or a pair differs in shape or in
            `normalize_gate_input`.
    """
    src, tgt = sparta_layers(source), sparta_layers(target)
    for model, found in ((source, src), (target, tgt)):
        if not found:
            raise TransferError(f"Model '{model.name}' has no Sparta layer to transfer.")
    if names is None:
        kinds = _sharing(src), _sharing(tgt)
        if None not in kinds and kinds[0] != kinds[1]:
            raise TransferError(
                f"The Sparta sharings differ: '{source.name}' has sparta_sharing="
                f"{kinds[0]!r} ({_some(src)}) and '{target.name}' {kinds[1]!r} "
                f"({_some(tgt)}). Build the target with sparta_sharing={kinds[0]!r}.")
        if set(tgt) <= set(src):
            names = {n: n for n in tgt}
        elif kinds == ("layer", "layer"):
            names = _by_position(src, tgt)
        else:
            raise TransferError(
                f"Cannot map the Sparta layers of '{source.name}' ({_some(src)}) onto "
                f"those of '{target.name}' ({_some(tgt)}): name them as "
                "sparta_tf.models does, or pass names={target layer: source layer}.")
    pairs = []
    for name, layer in tgt.items():
        if name not in names or names[name] not in src:
            raise TransferError(
                f"Target Sparta layer '{name}' of '{target.name}' has no counterpart "
                f"{names.get(name, '')!r} in '{source.name}' (its Sparta layers: "
                f"{_some(src)}).")
        pairs.append((src[names[name]], layer))
    for s, t in pairs:
        _check_pair(s, t)
    return pairs


def _check_pair(s, t):
    for what, a, b in (("kernel", s.kernel.shape, t.kernel.shape),
                       ("bias", s.bias.shape, t.bias.shape)):
        if tuple(a) != tuple(b):
            raise TransferError(
                f"Sparta {what} shapes differ: source layer '{s.name}' has "
                f"{tuple(a)}, target layer '{t.name}' has {tuple(b)} (kernel "
                "[k, k, channels, 1]: the widths or kernel sizes do not match).")
    for option in ("normalize_gate_input", "shift", "gate_batch_norm"):
        if getattr(s, option) != getattr(t, option):
            raise TransferError(
                f"Source layer '{s.name}' has {option}={getattr(s, option)}, "
                f"target layer '{t.name}' {getattr(t, option)}.")


def fingerprint(model):
    """sha256 (hex) of the Sparta values of `model`: names, kernels and biases in model order.

    For a source model, it names what a transfer copies, whatever the target.
    """
    return _digest(sparta_layers(model))  # kernel, bias, then a variant's beta or batch norm


def _digest(layers_by_name):
    """sha256 (hex) of `{name: layer}`: each name, then its weights as float32 bytes."""
    digest = hashlib.sha256()
    for name, layer in layers_by_name.items():
        digest.update(name.encode())
        for variable in layer.weights:
            digest.update(np.ascontiguousarray(
                keras.ops.convert_to_numpy(variable), np.float32).tobytes())
    return digest.hexdigest()


def network_layers(model):
    """The layers of `model` that hold weights, activations (Sparta, FReLU, PReLU) left out,
    by name: the network around the activations (convolutions, batch norm, the classifier).
    Nested models are walked into; other layers are taken whole (a variant's batch norm
    inside a Sparta belongs to the Sparta)."""
    activations = (layers.Sparta, layers.FReLU, keras.layers.PReLU)
    found = {}
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            found.update(network_layers(layer))
        elif layer.weights and not isinstance(layer, activations):
            found[layer.name] = layer
    return found


def network_fingerprint(model):
    """sha256 (hex) of the network around the activations (`network_layers`): names and
    weights in model order."""
    return _digest(network_layers(model))


def copy_network_and_freeze(source, target):
    """Copies every weight of `source` but its activations' into `target` and freezes it,
    so that only the target's Sparta layers train.

    The two must be one architecture: the same layers with weights (`network_layers`), by
    name, of the same shapes. Everything is checked before anything is copied. Compile or
    build the target's optimizer after this call, so that it leaves the frozen layers out.

    Returns: the names of the layers copied, in the target's order.

    Raises:
        TransferError: the target has no Sparta layer, or the two networks differ (a layer
            missing on either side, or of other shapes); the message names them.
    """
    if not sparta_layers(target):
        raise TransferError(f"Model '{target.name}' has no Sparta layer to train: the "
                            "gates-only probe needs --activation=sparta.")
    src, tgt = network_layers(source), network_layers(target)
    if set(src) != set(tgt):
        raise TransferError(
            f"'{source.name}' and '{target.name}' are not one network: layers only in the "
            f"source: {_some(sorted(set(src) - set(tgt))) or 'none'}; only in the target: "
            f"{_some(sorted(set(tgt) - set(src))) or 'none'}.")
    for name, layer in tgt.items():
        shapes = ([tuple(w.shape) for w in src[name].weights],
                  [tuple(w.shape) for w in layer.weights])
        if shapes[0] != shapes[1]:
            raise TransferError(f"Layer '{name}' has weights of shapes {shapes[0]} in "
                                f"'{source.name}' and {shapes[1]} in '{target.name}'.")
    for name, layer in tgt.items():
        layer.set_weights(src[name].get_weights())
        layer.trainable = False
    return list(tgt)


def copy_and_freeze(source, target, names=None):
    """Copies the Sparta parameters of `source` into `target` and freezes them.

    Everything is checked (`mapping`) before anything is copied. The target's
    Sparta layers become `trainable=False`; compile or build the target's
    optimizer after this call, so that it leaves them out.

    Returns: the `(source layer name, target layer name)` pairs copied.

    Raises:
        TransferError: see `mapping`.
    """
    pairs = mapping(source, target, names)
    for s, t in pairs:
        t.set_weights(s.get_weights())  # kernel and bias (a variant's beta or batch norm too)
        t.trainable = False
    return [(s.name, t.name) for s, t in pairs]
