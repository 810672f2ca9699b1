"""Robustness evaluation: accuracy under attack, AutoAttack, masking checks, reports.

- `accuracy(model, x, y, attack)`: top-1 accuracy, clean or after an attack of
  `sparta_tf.attacks` (the project's one PGD; FGSM is its 1-step case).
- `autoattack(model, x, y, eps)`: AutoAttack (Croce & Hein, ICML 2020) at L-inf
  `eps`, with the attacks of the Adversarial Robustness Toolbox (ART).
- `robustness_report(model, x, y, eps)`: clean, FGSM, PGD-20/100 with the CE and
  CW losses, Square and AutoAttack, and the gradient-masking sanity checks of
  Carlini et al., "On Evaluating Adversarial Robustness" (arXiv:1902.06705,
  2019). `to_markdown(report)` renders it.
- `load_model(path)`: a model_dir, a `.keras` file or an exported SavedModel.

Models take pixels in [0, 1] and return logits. This module imports no absl.
"""

import os

import keras
import numpy as np
import tensorflow as tf
from tqdm.auto import tqdm

# `layers` registers Sparta and FReLU with Keras, so that `.keras` files load.
from sparta_tf import attacks, layers  # noqa: F401

# The attacks of standard AutoAttack that ART has, in the standard order.
AUTOATTACK = ("apgd-ce", "apgd-t", "square")


def _pixels(x):
    """Float32 pixels in [0, 1] from uint8 images or floats."""
    x = np.asarray(x)
    return (x / 255.0 if x.dtype == np.uint8 else x).astype(np.float32)


def accuracy(model, x, y, attack=None, batch_size=256, progress=None):
    """Top-1 accuracy of `model` on (x, y), after `attack` if one is given.

    Args:
        model: a callable `model(x, training=False)` from pixels in [0, 1] to
            logits, such as a Keras model or what `load_model` returns.
        x: uint8 images (scaled by 1/255) or floats in [0, 1], NHWC.
        y: int labels.
        attack: None, or a callable `attack(model, x, y) -> x_adv` such as
            `attacks.PGD`.
        batch_size: examples per batch.
        progress: None, or the label of a progress bar to show.
    """
    @tf.function
    def correct(xb, yb):
        if attack is not None:
            xb = attack(model, xb, yb)
        pred = tf.argmax(model(xb, training=False), axis=-1, output_type=tf.int32)
        return tf.reduce_sum(tf.cast(pred == yb, tf.int32))

    x, y = _pixels(x), np.asarray(y, np.int32)
    hits = 0
    with tqdm(total=len(x), desc=progress, unit="img", disable=progress is None) as bar:
        for i in range(0, len(x), batch_size):
            xb, yb = x[i:i + batch_size], y[i:i + batch_size]
            hits += int(correct(tf.constant(xb), tf.constant(yb)))
            bar.update(len(xb))
    return hits / len(x)


def load_model(path):
    """Loads a classifier from pixels in [0, 1] to logits.

    Args:
        path: a model_dir (with `model.keras`, as training writes it), a
            `.keras` file, or a SavedModel directory written by
            `sparta_tf.export` (the version directory, or its parent, whose
            highest numbered version is taken).

    Returns: a Keras model, or for a SavedModel the `logits` of its
        `serving_default` signature (through a `keras.layers.TFSMLayer`): both
        are called as `model(x, training=False)` and are differentiable with
        respect to `x`.

    Raises:
        FileNotFoundError: if `path` holds none of these.
    """
    path = os.fspath(path)
    if os.path.isfile(os.path.join(path, "model.keras")):
        path = os.path.join(path, "model.keras")
    if os.path.isfile(path) and path.endswith(".keras"):
        return keras.models.load_model(path)
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "saved_model.pb")):
        versions = [d for d in os.listdir(path) if d.isdigit()
                    and os.path.isfile(os.path.join(path, d, "saved_model.pb"))]
        if versions:
            path = os.path.join(path, max(versions, key=int))
    if os.path.isfile(os.path.join(path, "saved_model.pb")):
        return _ServedLogits(keras.layers.TFSMLayer(path, call_endpoint="serving_default"))
    raise FileNotFoundError(
        f"No model at {path!r}: expected a model_dir holding model.keras, a .keras file, "
        "or a SavedModel directory (holding saved_model.pb, or numbered versions of one).")


class _ServedLogits:
    """The logits of an exported SavedModel's `serving_default`, called like a model."""

    def __init__(self, layer):
        self.layer = layer
        self.name = layer.name

    def __call__(self, x, training=False):
        return self.layer(x)["logits"]


def _compiled(model):
    """`model` as one graph call whose input gradient is computed in a graph too.

    ART differentiates the model eagerly, on ever smaller subsets of the examples.
    Compiled, the forward and backward passes are faster, and they avoid a crash:
    run eagerly at a new batch size, the backward pass of a ResNet (a Keras model
    or a loaded SavedModel) corrupts the heap of TF 2.21's oneDNN CPU kernels in
    about half the runs (not with TF_ENABLE_ONEDNN_OPTS=0).
    """
    forward = tf.function(lambda x: model(x, training=False), reduce_retracing=True)

    @tf.function(reduce_retracing=True)
    def input_gradient(x, upstream):
        with tf.GradientTape() as tape:
            tape.watch(x)
            logits = model(x, training=False)
        return tape.gradient(logits, x, output_gradients=upstream)

    @tf.custom_gradient
    def call(x):
        def gradient(upstream, variables=()):
            return input_gradient(x, upstream), [None] * len(variables)  # none for weights

        return forward(x), gradient

    return lambda x, training=False: call(x)


def autoattack(model, x, y, eps, batch_size=256, attacks=AUTOATTACK, iterations=100,
               queries=5000, verbose=True):
    """Robust accuracy under AutoAttack at L-inf `eps`, with ART's attacks.

    Standard AutoAttack (Croce & Hein 2020, `version="standard"`) runs APGD-CE,
    APGD-T, FAB-T and Square, each on the examples that the ones before did not
    break, with one restart each, 100 iterations, 9 target classes and 5000
    Square queries. This follows it with ART's `AutoProjectedGradientDescent`
    and `SquareAttack`, chained by ART's own AutoAttack step
    (`art.attacks.evasion.auto_attack.run_attack`):

    - `apgd-ce`: untargeted APGD on the cross-entropy, step 2 * eps at first.
    - `apgd-t`: APGD on ART's targeted DLR loss, once for each of the (up to) 9
      classes with the highest clean logits after the top one.
    - `square`: Square (p_init 0.8), `queries` iterations.

    Deviations, because of what ART 1.20 offers: ART has no FAB, so FAB-T is
    left out (it can only lower the accuracy, so this is an upper bound on
    standard AutoAttack's). ART's `AutoAttack` class is not used as a whole: by
    default it runs another list (APGD-CE and APGD-DLR with 5 restarts,
    DeepFool, Square with 5 restarts), its `targeted=True` makes every attack
    of the list targeted after running it untargeted, and its `generate`
    imports `multiprocess`, which ART does not install.

    Args:
        model: a callable `model(x, training=False)` -> logits.
        x: uint8 images or floats in [0, 1], NHWC.
        y: int labels.
        eps: the L-inf budget in pixels (> 0).
        batch_size: examples per batch.
        attacks: names out of `AUTOATTACK`, run in this order. The order does
            not change the result (an example counts as robust only if every
            attack fails on it), only the cost.
        iterations: APGD iterations (100 in standard AutoAttack).
        queries: Square iterations (queries; 5000 in standard AutoAttack).
        verbose: show ART's progress bars.

    Returns: `{"accuracy": robust accuracy, "after": {name: the accuracy
        after that attack and the ones before it}}`.
    """
    from art.attacks.evasion import AutoProjectedGradientDescent, SquareAttack
    from art.attacks.evasion.auto_attack import run_attack
    from art.estimators.classification import TensorFlowV2Classifier

    unknown = set(attacks) - set(AUTOATTACK)
    if unknown:
        raise ValueError(f"Unknown attacks {sorted(unknown)}; valid: {AUTOATTACK}.")
    if not eps > 0:
        raise ValueError(f"eps must be > 0; got {eps!r}.")
    x, y = _pixels(x), np.asarray(y)
    logits = np.concatenate([np.asarray(model(tf.constant(x[i:i + batch_size]), training=False))
                             for i in range(0, len(x), batch_size)])
    classes = logits.shape[-1]
    classifier = TensorFlowV2Classifier(_compiled(model), nb_classes=classes, input_shape=x.shape[1:],
                                        clip_values=(0.0, 1.0))
    onehot = np.eye(classes, dtype=np.float32)
    robust = logits.argmax(axis=1) == y
    x_adv = x.copy()
    after = {}
    for name in attacks:
        if name == "square":
            attack = SquareAttack(classifier, norm=np.inf, eps=eps, max_iter=queries,
                                  p_init=0.8, nb_restarts=1, batch_size=batch_size,
                                  verbose=verbose)
            labels = [y]
        else:
            attack = AutoProjectedGradientDescent(
                classifier, norm=np.inf, eps=eps, eps_step=2 * eps, max_iter=iterations,
                targeted=name == "apgd-t", nb_random_init=1, batch_size=batch_size,
                loss_type="cross_entropy" if name == "apgd-ce" else "difference_logits_ratio",
                verbose=verbose)
            # Targets: the classes of the 2nd to 10th highest clean logit.
            ranked = np.argsort(-logits, axis=1)
            labels = [y] if name == "apgd-ce" else [ranked[:, k] for k in
                                                   range(1, min(10, classes))]
        for target in labels:
            if robust.any():
                x_adv, robust = run_attack(x_adv, onehot[target], robust, attack, classifier,
                                           norm=np.inf, eps=eps)
        after[name] = float(robust.mean())
    return {"accuracy": float(robust.mean()), "after": after}


def seeded(attack, seed):
    """`attack` with a fixed seed: restart 0 of R restarts is then the 1-restart run."""
    seed = tf.constant([seed, 0], tf.int64)
    return lambda model, x, y: attack(model, x, y, seed=seed)


def eps_text(eps):
    """`8/255` for whole numbers of 1/255, else the float."""
    n = eps * 255
    return f"{round(n)}/255" if abs(n - round(n)) < 1e-6 else f"{eps:.4g}"


def robustness_report(model, x, y, eps, steps=(20, 100), losses=("ce", "cw"), restarts=3,
                      run_autoattack=True, autoattack_iterations=100, square_queries=5000,
                      eps_multiples=(0.25, 0.5, 1, 2, 4), large_eps=0.5, tolerance=0.01,
                      batch_size=256, seed=0, verbose=True):
    """Clean and attacked accuracy at `eps`, and checks for gradient masking.

    At `eps`: clean, FGSM, PGD with each of `steps` and `losses` ("ce":
    cross-entropy, "cw": the Carlini-Wagner margin) with `restarts` random
    starts, Square (black-box), and AutoAttack. The checks, after Carlini et
    al. (2019), are each "pass" or a warning; noise is allowed up to
    `slack`, the larger of `tolerance` and one example:

    - `eps_monotone`: accuracy under PGD-steps[0] does not rise with eps
      (`eps_multiples` of eps, and `large_eps`).
    - `steps_monotone`: PGD with steps[-1] steps is not less successful than
      with steps[0] (each loss).
    - `large_eps`: accuracy at eps `large_eps` (0.5: any image can be turned
      into uniform grey) is ~0.
    - `black_box_weaker`: Square does not beat the best white-box PGD. If it
      does, the gradients mislead PGD: the classic sign of masking.
    - `restarts`: PGD-steps[0] with `restarts` restarts is not less successful
      than with one. The runs share a seed, so for a deterministic model
      restart 0 is the 1-restart run and only a model that is random at
      inference (or a broken attack) can fail.

    Args:
        model: a callable `model(x, training=False)` -> logits.
        x, y: uint8 images or floats in [0, 1] (NHWC), and int labels.
        eps: the L-inf budget in pixels.
        steps, losses, restarts: the PGD runs at eps.
        run_autoattack: also run AutoAttack (APGD-CE, APGD-T after Square); if
            False, only Square, for the `black_box_weaker` check.
        autoattack_iterations, square_queries: see `autoattack`.
        eps_multiples, large_eps: the eps values of the `eps_monotone` check.
        tolerance: allowed noise, as a fraction of the examples.
        batch_size: examples per batch.
        seed: the seed of PGD's random starts.
        verbose: show progress bars.

    Returns: a JSON-able dict: `eps`, `examples`, `settings`, `accuracy`
        (name -> accuracy at eps), `autoattack_after` (accuracy after each
        AutoAttack attack, cumulative), `eps_sweep` ([eps, accuracy] pairs)
        and `checks` (a list of {name, passed, detail}).
    """
    x, y = _pixels(x), np.asarray(y, np.int32)
    slack = max(tolerance, 1 / len(x))

    def acc(attack=None, label=None):
        return accuracy(model, x, y, attack, batch_size, label if verbose else None)

    results = {"clean": acc(), "fgsm": acc(attacks.fgsm(eps), "FGSM")}
    for n in steps:
        for loss in losses:
            pgd = attacks.PGD(eps, n, restarts=restarts, loss=loss)
            results[f"pgd{n}_{loss}"] = acc(seeded(pgd, seed),
                                            f"PGD-{n} {loss.upper()} x{restarts}")
    # Square first: its accuracy alone is then the first step of the chain.
    chain = ("square", "apgd-ce", "apgd-t") if run_autoattack else ("square",)
    aa = autoattack(model, x, y, eps, batch_size, chain, autoattack_iterations,
                    square_queries, verbose)
    results["square"] = aa["after"]["square"]
    if run_autoattack:
        results["autoattack"] = aa["accuracy"]

    first = f"pgd{steps[0]}_{losses[0]}"
    sweep = sorted({eps * m for m in eps_multiples} | {eps, large_eps})
    sweep = [[e, acc(seeded(attacks.PGD(e, steps[0], loss=losses[0]), seed),
                     f"PGD-{steps[0]} {losses[0].upper()} at {e:.4g}")] for e in sweep]
    by_eps = dict((e, a) for e, a in sweep)
    pgd_accs = {k: v for k, v in results.items() if k.startswith("pgd")}
    best_pgd = min(pgd_accs, key=pgd_accs.get)

    def check(name, passed, detail):
        return {"name": name, "passed": bool(passed), "detail": detail}

    rises = [(a, b) for a, b in zip(sweep, sweep[1:]) if b[1] > a[1] + slack]
    checks = [check("eps_monotone", not rises, "; ".join(
        f"{a[1]:.1%} at eps {a[0]:.4g} -> {b[1]:.1%} at {b[0]:.4g}" for a, b in rises)
        or "accuracy does not rise with eps")]
    for loss in losses:
        few, many = results[f"pgd{steps[0]}_{loss}"], results[f"pgd{steps[-1]}_{loss}"]
        checks.append(check(
            f"steps_monotone_{loss}", many <= few + slack,
            f"PGD-{steps[-1]} {loss.upper()} {many:.1%} vs PGD-{steps[0]} {few:.1%}"))
    checks += [
        check("large_eps", by_eps[large_eps] <= slack,
              f"PGD-{steps[0]} at eps {large_eps:.4g}: {by_eps[large_eps]:.1%} (should be ~0%)"),
        check("black_box_weaker", results["square"] >= pgd_accs[best_pgd] - slack,
              f"Square {results['square']:.1%} vs the best white-box, {best_pgd}, "
              f"{pgd_accs[best_pgd]:.1%}"),
        check("restarts", results[first] <= by_eps[eps] + slack,
              f"PGD-{steps[0]} {losses[0].upper()}: {restarts} restarts {results[first]:.1%}, "
              f"1 restart {by_eps[eps]:.1%}"),
    ]
    return {
        "eps": eps, "examples": len(x),
        "settings": {"steps": list(steps), "losses": list(losses), "restarts": restarts,
                     "autoattack_iterations": autoattack_iterations,
                     "square_queries": square_queries, "tolerance": tolerance, "seed": seed},
        "accuracy": results, "autoattack_after": aa["after"], "eps_sweep": sweep,
        "checks": checks,
    }


def to_markdown(report):
    """The report as Markdown: a table of accuracies, the eps sweep, the checks."""
    s = report["settings"]
    names = {"clean": "clean", "fgsm": "FGSM",
             "square": f"Square ({s['square_queries']} queries, black-box)",
             "autoattack": f"AutoAttack ({', '.join(report['autoattack_after'])}; "
                           f"APGD {s['autoattack_iterations']} iterations)"}
    for n in s["steps"]:
        for loss in s["losses"]:
            names[f"pgd{n}_{loss}"] = (f"PGD-{n}, {loss.upper()} loss, {s['restarts']} "
                                      f"restart{'s' * (s['restarts'] > 1)}")
    lines = [f"## Robustness at eps = {eps_text(report['eps'])} "
             f"({report['examples']} examples)", "",
             "| attack | accuracy |", "| --- | ---: |"]
    lines += [f"| {names[k]} | {100 * v:.2f}% |" for k, v in report["accuracy"].items()]
    lines += ["", f"### Accuracy against eps (PGD-{s['steps'][0]}, "
              f"{s['losses'][0].upper()} loss, 1 restart)", "",
              "| eps | accuracy |", "| --- | ---: |"]
    lines += [f"| {eps_text(e)} | {100 * a:.2f}% |" for e, a in report["eps_sweep"]]
    lines += ["", "### Gradient-masking checks (Carlini et al., 2019)", ""]
    lines += [f"- {'pass' if c['passed'] else '**WARNING**'} `{c['name']}`: {c['detail']}"
              for c in report["checks"]]
    return "\n".join(lines) + "\n"
