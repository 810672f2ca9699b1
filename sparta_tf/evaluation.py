"""Robustness evaluation: accuracy under attack, AutoAttack, masking checks, reports.

- `accuracy(model, x, y, attack)`: top-1 accuracy, clean or after any attack, and
  `correct(...)`, the same example by example. The project's PGD accuracy is one
  protocol, `sparta_tf.protocol` (the settings in one `Protocol`, run by
  `protocol.correct`), which the trainer, sparta-compare and this module all call.
- `robustness_report(model, x, y, eps)`: clean, FGSM, PGD-20/100 with the CE and
  CW losses, Square and AutoAttack, and the gradient-masking sanity checks of
  Carlini et al., "On Evaluating Adversarial Robustness" (arXiv:1902.06705,
  2019; `sparta_tf.masking`), naming its PGD protocol. `to_markdown(report)`
  renders it. AutoAttack is `sparta_tf.autoattack_keras` (its attacks in keras.ops, on
  every backend: `autoattack="keras"`, the default) or, on TensorFlow, ART's in
  `sparta_tf.autoattack` (`autoattack="art"`, the cross-check).
- `load_model(path)`: a model_dir, a `.keras` file or an exported SavedModel;
  `check_fits(model, x, class_names, path)`, that it takes the data's images and has one
  logit per class of the data, and `check_writable(folder)`: both to fail before an
  evaluation rather than after it, or instead of a wrong one.

Models take pixels in [0, 1] and return logits. This module imports no absl, and no
TensorFlow on another Keras backend: there a SavedModel or ART's AutoAttack is refused in one
line (`BackendError`).
"""

import dataclasses
import os
import tempfile

import keras
import numpy as np

# `layers` registers Sparta and FReLU with Keras, so that `.keras` files load.
from sparta_tf import (attacks, autoattack_keras, data, layers, masking,  # noqa: F401
                       model_dir, protocol, transfer)

if keras.backend.backend() == "tensorflow":  # ART's AutoAttack runs on TensorFlow only
    from sparta_tf import autoattack as autoattack_art

ModelFileError = transfer.ModelFileError
AUTOATTACKS = ("keras", "art", "none")  # the AutoAttack that `robustness_report` runs


class BackendError(ValueError):
    """What was asked needs TensorFlow, and Keras runs on another backend."""


def needs_tensorflow(what):
    """Raises `BackendError` for `what` (e.g. "a SavedModel") unless Keras runs on
    TensorFlow; the message says whether TensorFlow is installed here."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        return
    try:  # not `find_spec`: an installation that cannot be imported is not one
        import tensorflow  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
        installed = True
    except ImportError:
        installed = False
    raise BackendError(
        f"{what} needs TensorFlow, and Keras runs on {backend} here"
        + (" (KERAS_BACKEND); run with KERAS_BACKEND=tensorflow." if installed
           else ", where TensorFlow is not installed; install it and run with "
                "KERAS_BACKEND=tensorflow."))


class ModelMismatchError(ValueError):
    """The model does not fit the data: it takes other images, or has other classes."""


def correct(model, x, y, attack=None, batch_size=256, progress=None):
    """Which examples `model` classifies correctly, after `attack` if one is given: a bool
    array, one entry per example (`protocol.hits`, whose arguments these are). For the
    project's PGD accuracy, run a `protocol.Protocol` with `protocol.correct` instead."""
    return protocol.hits(model, x, y, attack, batch_size, progress)


def accuracy(model, x, y, attack=None, batch_size=256, progress=None):
    """Top-1 accuracy of `model` on (x, y), after `attack` if one is given (see `correct`)."""
    return float(correct(model, x, y, attack, batch_size, progress).mean())


def load_model(path):
    """Loads a classifier from pixels in [0, 1] to logits.

    What runs when it is loaded or called: a `.keras` file loads under Keras's safe_mode,
    which refuses arbitrary Python code (a `Lambda` layer is refused, not run), so only the
    layers of Keras and sparta_tf run. An exported SavedModel runs its own graph: the
    TensorFlow ops that whoever wrote it chose, which may read or write files. Only
    evaluate SavedModels you trust.

    Args:
        path: a model_dir (with `model.keras`, as training writes it), a
            `.keras` file, or a SavedModel directory written by
            `sparta_tf.export` (the version directory, or its parent, whose
            highest complete numbered version, one with a saved_model.pb, is
            taken).

    Returns: a Keras model, or for a SavedModel the `logits` of its
        `serving_default` signature (through a `keras.layers.TFSMLayer`): both
        are called as `model(x, training=False)` and are differentiable with
        respect to `x`.

    Raises:
        FileNotFoundError: if `path` holds none of these (also a folder of
            numbered versions none of which is complete).
        ModelFileError: the model file is there but cannot be loaded (corrupt,
            truncated, refused by safe_mode, a SavedModel without a `logits`
            output); the message names it.
    """
    path = os.fspath(path)
    if os.path.isfile(os.path.join(path, model_dir.MODEL)) or path.endswith(".keras"):
        return transfer.load(path)
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "saved_model.pb")):
        complete = model_dir.versions(path)
        if complete:
            path = os.path.join(path, str(complete[-1]))
        else:
            numbered = sorted((d for d in os.listdir(path) if d.isdigit()), key=int)
            if numbered:
                raise FileNotFoundError(
                    f"No model at {path!r}: its numbered versions ({', '.join(numbered)}) "
                    "hold no saved_model.pb; they are incomplete exports.")
    if os.path.isfile(os.path.join(path, "saved_model.pb")):
        needs_tensorflow(f"The SavedModel {path}")
        try:
            served = _ServedLogits(keras.layers.TFSMLayer(path, call_endpoint="serving_default"))
        except Exception as e:  # noqa: BLE001 - any failure of a bad SavedModel: one line
            raise ModelFileError(f"The SavedModel {path} could not be loaded (corrupt or "
                                 f"truncated?): {_first_line(e)}") from e
        if "logits" not in served.outputs:
            raise ModelFileError(
                f"The SavedModel {path} has no `logits` output in its serving_default "
                f"signature (it has: {', '.join(sorted(served.outputs)) or 'none'}); "
                "evaluate a SavedModel that sparta-export wrote, or the .keras model.")
        return served
    raise FileNotFoundError(
        f"No model at {path!r}: expected a model_dir holding {model_dir.MODEL}, a .keras file, "
        "or a SavedModel directory (holding saved_model.pb, or numbered versions of one).")


def check_writable(folder):
    """Creates `folder` if needed and checks that a file can be written in it.

    Raises:
        ValueError: it cannot be created or written; the message names it and why.
    """
    try:
        os.makedirs(folder, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-check-", dir=folder)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise ValueError(f"Cannot write to {folder}: {e.strerror or e}. Choose a writable "
                         "--output_dir.") from None


def _first_line(error, limit=300):
    """`Type: the first line of its message`, at most `limit` characters of it."""
    return f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:limit]}"


def check_fits(model, x, class_names, path):
    """Checks that `model` fits the data: it takes images such as `x` and has one logit per
    class of `class_names`, which are also the names written beside it (the
    `class_names.json` that sparta-train writes in a model_dir), where there are any.

    Args:
        model: a model as `load_model` returns it.
        x: the data's images, [N, H, W, C] (the first is run through the model).
        class_names: the data's class names, in label order.
        path: what `load_model` loaded it from; the messages name it.

    Raises:
        ModelMismatchError: it takes other images, cannot run on them, has another number
            of logits, or other class names; the message says which and what to do.
        ValueError: its class_names.json is not a JSON list of names.
    """
    image = tuple(int(d) for d in x.shape[1:])
    shown = "x".join(map(str, image))
    takes = _input_shape(model)
    if takes is not None and (len(takes) != len(image) or any(
            t is not None and t != i for t, i in zip(takes, image))):
        raise ModelMismatchError(
            f"The model {path} takes images of {'x'.join(str(t) for t in takes)} (height x "
            f"width x channels), and the data's are {shown}: evaluate it on data like the "
            "data it was trained on (--dataset).")
    try:
        logits = keras.ops.convert_to_numpy(model(data.pixels(x[:1]), training=False))
    except Exception as e:  # noqa: BLE001 - a model that cannot run on them: one line
        raise ModelMismatchError(f"The model {path} cannot run on the data's images "
                                 f"({shown}): {_first_line(e)}") from e
    data_classes = f"{len(class_names)} classes ({_names(class_names)})"
    if logits.ndim != 2:
        raise ModelMismatchError(f"The model {path} returns outputs of shape "
                                 f"{tuple(logits.shape[1:])} for an image, not one logit per "
                                 "class: evaluate a classifier that returns logits.")
    if logits.shape[-1] != len(class_names):
        raise ModelMismatchError(
            f"The model {path} has {logits.shape[-1]} classes (logits), and the data has "
            f"{data_classes}: evaluate it on the data it was trained on (--dataset).")
    trained = model_dir.class_names_beside(path)
    if trained is None:
        return
    if not isinstance(trained, list) or not all(isinstance(n, str) for n in trained):
        raise ValueError(f"{model_dir.CLASS_NAMES} beside {path} holds no JSON list of class "
                         "names.")
    if trained != list(class_names):
        raise ModelMismatchError(
            f"The model {path} was trained on {len(trained)} classes "
            f"({_names(trained)}, in its {model_dir.CLASS_NAMES}), and the data has "
            f"{data_classes}: evaluate it on the data it was trained on (--dataset).")


def _names(names, shown=4):
    """The first `shown` of `names`, and how many there are in all if more."""
    more = f", ... ({len(names)} in all)" if len(names) > shown else ""
    return ", ".join(repr(n)[:60] for n in names[:shown]) + more  # repr: one line


def _input_shape(model):
    """The image shape that `model` declares, (H, W, C) with None for any size, or None
    where it declares none."""
    if isinstance(model, _ServedLogits):
        return model.input_shape
    try:
        return tuple(model.inputs[0].shape[1:])
    except (AttributeError, IndexError, TypeError, ValueError):
        return None


class _ServedLogits:
    """The logits of an exported SavedModel's `serving_default`, called like a model."""

    def __init__(self, layer):
        self.layer = layer
        self.name = layer.name
        function = layer.call_endpoint_fn  # a signature, or a restored tf.function
        function = (getattr(function, "concrete_functions", None) or [function])[0]
        outputs = function.structured_outputs
        self.outputs = set(outputs) if isinstance(outputs, dict) else set()
        args, kwargs = function.structured_input_signature
        specs = [*args, *kwargs.values()]
        shape = getattr(specs[0], "shape", None) if len(specs) == 1 else None
        self.input_shape = (None if shape is None or shape.rank is None
                            else tuple(shape.as_list()[1:]))

    def __call__(self, x, training=False):
        return self.layer(x)["logits"]


def robustness_report(model, x, y, eps, steps=(20, 100), losses=("ce", "cw"), restarts=3,
                      autoattack="keras", autoattack_iterations=100, square_queries=5000,
                      eps_multiples=(0.25, 0.5, 1, 2, 4), large_eps=0.5,
                      tolerance=masking.TOLERANCE, batch_size=256, seed=0, verbose=True):
    """Clean and attacked accuracy at `eps`, and the checks for gradient masking.

    At `eps`: clean, FGSM, PGD with each of `steps` and `losses` ("ce":
    cross-entropy, "cw": the Carlini-Wagner margin) with `restarts` random
    starts, Square (black-box), and AutoAttack; then PGD-steps[0] with
    losses[0] and one restart at `eps_multiples` of eps and at `large_eps`.
    `sparta_tf.masking` reads the checks off these numbers.

    Args:
        model: a callable `model(x, training=False)` -> logits.
        x, y: uint8 images or floats in [0, 1] (NHWC), and int labels.
        eps: the L-inf budget in pixels.
        steps, losses, restarts: the PGD runs at eps.
        autoattack: which AutoAttack runs after Square (`AUTOATTACKS`): "keras"
            (`autoattack_keras`: APGD-CE, APGD-T, FAB-T), "art" (ART's APGD-CE and
            APGD-T, on TensorFlow only), or "none": only Square, for the
            `black_box_weaker` check.
        autoattack_iterations, square_queries: see `autoattack_keras.robust_accuracy`.
        eps_multiples, large_eps: the eps values of the sweep.
        tolerance: the noise the checks allow, as a fraction of the examples.
        batch_size: examples per batch.
        seed: the seed of PGD's random starts.
        verbose: show progress bars.

    Every PGD number is `protocol.correct` of one protocol (`sparta_tf.protocol`): the
    first row's, `protocol` in the report (PGD-steps[0] with losses[0] and `restarts`,
    in batches of `batch_size` seeded with `seed`), with its steps and loss changed for
    the other rows, and its eps changed and 1 restart for the sweep.

    Returns: a JSON-able dict: `eps`, `examples`, `settings`, `protocol` (as
        `Protocol.to_json`), `accuracy` (name -> accuracy at eps), `autoattack_after`
        (accuracy after each AutoAttack attack, cumulative), `per_image` (which images
        Square and AutoAttack's whole chain left right, `pack`ed), `eps_sweep` ([eps,
        accuracy] pairs) and `checks` (`masking.checks` of the rest).

    Raises:
        ValueError: `autoattack` is not one of `AUTOATTACKS`.
        BackendError: "art" where Keras does not run on TensorFlow.
    """
    if autoattack not in AUTOATTACKS:
        raise ValueError(f"autoattack must be one of {AUTOATTACKS}; got {autoattack!r}.")
    if autoattack == "art":
        needs_tensorflow("ART's AutoAttack (--autoattack=art)")
    x, y = data.pixels(x), np.asarray(y, np.int32)
    first = protocol.Protocol(eps=eps, steps=steps[0], restarts=restarts, loss=losses[0],
                              batch_size=batch_size, seed=seed)

    def acc(run, label, clean=False):
        hits = protocol.correct(model, x, y, run, clean, label if verbose else None)
        return float(hits.mean())

    results = {"clean": acc(first, None, clean=True),
               "fgsm": accuracy(model, x, y, attacks.fgsm(eps), batch_size,
                                "FGSM" if verbose else None)}
    for n in steps:
        for loss in losses:
            run = dataclasses.replace(first, steps=n, loss=loss)
            results[f"pgd{n}_{loss}"] = acc(run, run.name)
    # Square first: its accuracy alone is then the first step of the chain.
    if autoattack == "art":
        aa = autoattack_art.robust_accuracy(model, x, y, eps, batch_size,
                                            ("square", "apgd-ce", "apgd-t"),
                                            autoattack_iterations, square_queries, verbose,
                                            seed)
    else:
        chain = ("square",) + (autoattack_keras.ATTACKS[:-1] if autoattack == "keras" else ())
        aa = autoattack_keras.robust_accuracy(model, x, y, eps, batch_size, chain,
                                              autoattack_iterations, square_queries, seed,
                                              verbose)
    results["square"] = aa["after"]["square"]
    if autoattack != "none":
        results["autoattack"] = aa["accuracy"]
    sweep = sorted({eps * m for m in eps_multiples} | {eps, large_eps})
    one = dataclasses.replace(first, restarts=1)
    sweep = [[e, acc(dataclasses.replace(one, eps=e),
                     f"PGD-{steps[0]} {losses[0].upper()} at {e:.4g}")] for e in sweep]
    report = {
        "eps": eps, "examples": len(x),
        "settings": {"steps": list(steps), "losses": list(losses), "restarts": restarts,
                     "autoattack": autoattack, "autoattack_iterations": autoattack_iterations,
                     "square_queries": square_queries, "tolerance": tolerance,
                     "large_eps": large_eps, "seed": seed},
        "protocol": first.to_json(),
        "accuracy": results, "autoattack_after": aa["after"],
        "per_image": {"autoattack" if autoattack != "none" else "square": pack(aa["robust"])},
        "eps_sweep": sweep,
    }
    return {**report, "checks": masking.checks(report)}


def pack(hits):
    """A bool array as a short string: its length and its bits in hex (`unpack` reverses)."""
    return f"{len(hits)}:{np.packbits(np.asarray(hits, bool)).tobytes().hex()}"


def unpack(text):
    """The bool array of `pack`."""
    length, bits = text.split(":")
    return np.unpackbits(np.frombuffer(bytes.fromhex(bits), np.uint8))[:int(length)].astype(bool)


def to_markdown(report):
    """The report as Markdown: a table of accuracies, the eps sweep, the checks."""
    s = report["settings"]
    names = {"clean": "clean", "fgsm": "FGSM",
             "square": f"Square ({s['square_queries']} queries, black-box)",
             "autoattack": f"AutoAttack ({', '.join(report['autoattack_after'])}; "
                           f"{'ART' if s.get('autoattack') == 'art' else 'keras.ops'}, "
                           f"{s['autoattack_iterations']} iterations)"}
    for n in s["steps"]:
        for loss in s["losses"]:
            names[f"pgd{n}_{loss}"] = (f"PGD-{n}, {loss.upper()} loss, {s['restarts']} "
                                      f"restart{'s' * (s['restarts'] > 1)}")
    lines = [f"## Robustness at eps = {protocol.eps_text(report['eps'])} "
             f"({report['examples']} examples)", ""]
    if report.get("protocol"):  # reports written before it was kept have none
        described = protocol.Protocol.from_json(report["protocol"]).describe()
        lines += [f"PGD protocol (`sparta_tf.protocol`): {described}; the other PGD rows "
                  "change its steps and loss, the eps sweep its eps, with 1 restart.", ""]
    lines += ["| attack | accuracy |", "| --- | ---: |"]
    lines += [f"| {names[k]} | {100 * v:.2f}% |" for k, v in report["accuracy"].items()]
    lines += ["", f"### Accuracy against eps (PGD-{s['steps'][0]}, "
              f"{s['losses'][0].upper()} loss, 1 restart)", "",
              "| eps | accuracy |", "| --- | ---: |"]
    lines += [f"| {protocol.eps_text(e)} | {100 * a:.2f}% |" for e, a in report["eps_sweep"]]
    lines += ["", "### Gradient-masking checks (Carlini et al., 2019)", ""]
    lines += [f"- {'pass' if c['passed'] else '**WARNING**'} `{c['name']}`: {c['detail']}"
              for c in report["checks"]]
    return "\n".join(lines) + "\n"
