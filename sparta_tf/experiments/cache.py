"""The evaluations a cell keeps in its model_dir (compare_eval.json), and which of them serve.

A cell's evaluation is stored with the key it belongs to (`key`): the training run's
identity and the evaluation's settings. A rerun of the same grid reads it back
(`stored_results`) instead of loading the model. The file holds the latest evaluation and,
under `earlier`, the same model's evaluations with other settings, which still serve theirs.

`match(stored, config, settings)` decides whether one stored evaluation serves, and is a
pure function: it reads `stored` as an evaluation written by any earlier version would be
read (a TrainConfig field or a setting added since then takes its default, or what it was
before its default changed: `BEFORE`, ART's AutoAttack before `autoattack_engine`), and an
evaluation with AutoAttack also serves the same settings without it (its AutoAttack left
out), so a grid can gain AutoAttack cell by cell while its tables without it still read
every cell; without AutoAttack, AutoAttack's own settings do not count.
"""

import dataclasses
import json
import os

from sparta_tf import model_dir, training
from sparta_tf.experiments.cells import EvalSettings

EVAL_FILE = "compare_eval.json"

# The settings that only AutoAttack uses: an evaluation with AutoAttack also serves one
# without it (its other numbers are the same).
AUTOATTACK_SETTINGS = ("autoattack", "autoattack_iterations", "square_queries",
                       "square_examples", "autoattack_attacks", "autoattack_engine")
# Settings whose default changed: what an evaluation stored without them had. Before
# `autoattack_engine`, AutoAttack was ART's, and its white-box attacks APGD-CE and APGD-T.
BEFORE = {"autoattack_engine": "art", "autoattack_attacks": ["apgd-ce", "apgd-t"]}


def _json(value):
    """`value` as JSON reads it back: lists for tuples, str keys."""
    return json.loads(json.dumps(value))


def key(config, settings):
    """What a cell's stored evaluation must match to be reused (JSON-normalised): the
    training run's identity (`TrainConfig.identity`, as for resuming), how long it trained,
    and the test images and settings of the evaluation."""
    train = {**config.identity(), "epochs": config.epochs, "max_test": config.max_test}
    return _json({"config": train, "settings": dataclasses.asdict(settings)})


def without_autoattack(results):
    """`results` of `cells.evaluate` as an evaluation without AutoAttack would have them."""
    results = {k: v for k, v in results.items() if k not in ("square_check", "autoattack_after")}
    per_image = results.get("per_image")
    return {**results, "autoattack": None,
            **({"per_image": {**per_image, "autoattack": None}} if per_image else {})}


def match(stored, config, settings):
    """`stored["results"]` if that evaluation serves (config, settings), the same without
    its AutoAttack if it serves them but for AutoAttack, else None. `stored` is not changed.
    """
    wanted = key(config, settings)
    # Read as a config: a field added since the cell was stored takes its default.
    stored_config = key(training.TrainConfig.from_stored(stored.get("config", {})),
                        settings)["config"]
    # Settings added since the cell was stored had their defaults then (or `BEFORE`'s).
    stored_settings = _json({**dataclasses.asdict(EvalSettings()), **BEFORE,
                             **stored.get("settings", {})})
    if {"config": stored_config, "settings": stored_settings} == wanted:
        return stored["results"]
    if settings.autoattack:
        return None
    # Without AutoAttack, its settings do not matter.
    lifted = {**stored_settings, **{k: wanted["settings"][k] for k in AUTOATTACK_SETTINGS}}
    if {"config": stored_config, "settings": lifted} == wanted:
        results = stored["results"]
        return without_autoattack(results) if stored_settings["autoattack"] else results
    return None


def evaluations(folder):
    """The evaluations kept in folder/compare_eval.json, latest first: the file's own and
    its `earlier` ones (of the same model, with other settings)."""
    path = os.path.join(folder, EVAL_FILE)
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        latest = json.load(f)
    return [latest] + latest.pop("earlier", [])


def stored_results(config, settings):
    """The cell's evaluation kept in model_dir/compare_eval.json that serves (config,
    settings) (`match`), or None."""
    for stored in evaluations(config.model_dir):
        results = match(stored, config, settings)
        if results is not None:
            return results
    return None


def store(config, settings, results, earlier=()):
    """Writes `results` to model_dir/compare_eval.json with their key, and the same model's
    `earlier` evaluations (of other settings) beside them."""
    model_dir.write_json(os.path.join(config.model_dir, EVAL_FILE),
                         {**key(config, settings), "results": results,
                          **({"earlier": list(earlier)} if earlier else {})})
