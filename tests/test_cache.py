"""Tests of sparta_tf.experiments.cache: which stored evaluation of a cell serves a grid.

`match` is a pure function: it is shown here on evaluations built to match or not, old ones
(written before a setting or a config field existed) and the committed cells of results/,
and it never changes what it reads. No model runs.
"""

import copy
import dataclasses
import json
import os

import pytest

from sparta_tf import training
from sparta_tf.experiments import arms, cache
from sparta_tf.experiments.cells import EvalSettings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(dataset="bundled", model="resnet10", max_train=64, max_test=20,
            width_multiplier=0.0625, epochs=1, batch_size=32, pgd_steps=1, eval_pgd_steps=1,
            checkpoint_every=0)
SETTINGS = EvalSettings(pgd_steps=1, autoattack=False, eps_curve=(0.0, 8 / 255))
WITH_AUTOATTACK = dataclasses.replace(SETTINGS, autoattack=True, square_examples=4)
RESULTS = {"clean": 0.5, "pgd": 0.3, "autoattack": 0.2, "eps_curve": [[0.0, 0.5]],
           "autoattack_after": {"apgd-ce": 0.25, "apgd-t": 0.2},
           "square_check": {"examples": 4, "square": 0.25, "pgd": 0.25},
           "per_image": {"clean": "2:c0", "pgd": "2:80", "autoattack": "2:00"}}


def _config(**changes):
    base = dataclasses.replace(training.TrainConfig(**TINY), **changes)
    return arms.cell_config(base, "root", "pgd", "relu", 0)


def _stored(config, settings, results=RESULTS):
    """An evaluation as compare_eval.json holds it (read back from JSON)."""
    return json.loads(json.dumps({**cache.key(config, settings), "results": results}))


def _match(stored, config, settings):
    """`cache.match`, checked to leave `stored` as it was."""
    before = copy.deepcopy(stored)
    found = cache.match(stored, config, settings)
    assert stored == before, "match changed the evaluation it read"
    return found


def test_an_evaluation_serves_its_own_config_and_settings_only():
    config = _config()
    stored = _stored(config, SETTINGS)
    assert _match(stored, config, SETTINGS) == RESULTS
    for other in (dict(pgd_steps=2), dict(eps_curve=(0.0,)), dict(seed=1), dict(eps=4 / 255)):
        assert _match(stored, config, dataclasses.replace(SETTINGS, **other)) is None, other
    for other in (dict(lr=0.05), dict(epochs=2), dict(max_test=10), dict(weight_decay=1e-4)):
        assert _match(stored, _config(**other), SETTINGS) is None, other
    # Where things lie and how a run is saved are not part of it (TrainConfig.RESUMABLE).
    for same in (dict(data_dir="/elsewhere"), dict(checkpoint_every=7), dict(jit_compile=True),
                 dict(max_extract_gb=64.0)):
        assert _match(stored, _config(**same), SETTINGS) == RESULTS, same


def test_an_old_evaluation_reads_as_one_with_the_defaults_of_what_it_lacks():
    config = _config()
    stored = _stored(config, SETTINGS)
    for name in ("square_examples", "autoattack_attacks"):  # settings added since
        del stored["settings"][name]
    for name in ("sparta_lr_multiplier", "sparta_normalize_gate_input", "backend"):
        del stored["config"][name]  # config fields added since
    assert _match(stored, config, SETTINGS) == RESULTS
    # A missing setting had its default then, so it does not serve another value (with
    # AutoAttack, whose settings these are: without it they do not count).
    assert _match(stored, config, dataclasses.replace(SETTINGS, square_examples=9)) == RESULTS
    with_aa = dataclasses.replace(SETTINGS, autoattack=True)
    old_aa = _stored(config, with_aa)
    del old_aa["settings"]["square_examples"]
    assert _match(old_aa, config, with_aa) == RESULTS
    assert _match(old_aa, config, dataclasses.replace(with_aa, square_examples=9)) is None
    # A missing engine was ART's: the only AutoAttack sparta-tf had.
    del old_aa["settings"]["autoattack_engine"]
    assert _match(old_aa, config, with_aa) is None
    assert _match(old_aa, config, dataclasses.replace(with_aa, autoattack_engine="art")) == \
        RESULTS
    # A missing backend was TensorFlow's: the only one sparta-tf had.
    assert _match(stored, _config(backend="jax"), SETTINGS) is None


def test_an_evaluation_with_autoattack_serves_one_without_it():
    config = _config()
    stored = _stored(config, WITH_AUTOATTACK)
    assert _match(stored, config, WITH_AUTOATTACK) == RESULTS
    without = _match(stored, config, SETTINGS)
    assert without == {"clean": 0.5, "pgd": 0.3, "autoattack": None, "eps_curve": [[0.0, 0.5]],
                       "per_image": {"clean": "2:c0", "pgd": "2:80", "autoattack": None}}
    assert without == cache.without_autoattack(RESULTS)
    # Not where anything else differs, nor for AutoAttack of other sizes.
    assert _match(stored, config, dataclasses.replace(SETTINGS, pgd_steps=2)) is None
    for other in (dict(square_examples=None), dict(autoattack_iterations=10)):
        assert _match(stored, config, dataclasses.replace(WITH_AUTOATTACK, **other)) is None
    # Nor the other way round: one without AutoAttack never serves one with it.
    assert _match(_stored(config, SETTINGS), config, WITH_AUTOATTACK) is None


def test_stored_results_reads_the_latest_then_the_earlier_evaluations(tmp_path):
    config = dataclasses.replace(_config(), model_dir=str(tmp_path / "cell"))
    assert cache.stored_results(config, SETTINGS) is None  # no file
    os.makedirs(config.model_dir)
    other = dataclasses.replace(SETTINGS, eps_curve=(0.0,))
    cache.store(config, other, {"clean": 0.75}, earlier=[_stored(config, SETTINGS)])
    assert cache.stored_results(config, other) == {"clean": 0.75}
    assert cache.stored_results(config, SETTINGS) == RESULTS
    assert cache.stored_results(config, dataclasses.replace(SETTINGS, seed=3)) is None
    assert [e["results"] for e in cache.evaluations(config.model_dir)] == [
        {"clean": 0.75}, RESULTS]


# The documented command of results/compare_r18w025 and results/autoattack_r18w025
# (docs/RESULTS.md), as the flags make its cells' config and settings.
COMMITTED = dict(dataset="cifar10-jpeg.tar.gz", max_train=10000, max_test=2000,
                 width_multiplier=0.25, epochs=10, batch_size=128, lr=0.1,
                 lr_schedule="cosine", pgd_steps=3, eps=8 / 255)
CURVE = (2 / 255, 4 / 255, 16 / 255)


@pytest.mark.parametrize("cell,settings,autoattack", [
    # Written before `square_examples`, `autoattack_attacks` and `per_image` existed.
    ("compare_r18w025/pgd/relu/seed1", EvalSettings(autoattack=False, eps_curve=CURVE), False),
    # The latest evaluation has AutoAttack, Square on 500 images with 1,000 queries.
    # ART's AutoAttack: written before `autoattack_engine` existed.
    ("autoattack_r18w025/pgd/sparta/seed0", EvalSettings(
        square_queries=1000, square_examples=500, autoattack_attacks=("apgd-ce", "apgd-dlr"),
        eps_curve=CURVE, autoattack_engine="art"), True),
    # One of its `earlier` evaluations: Square with 5,000 queries.
    ("autoattack_r18w025/pgd/sparta/seed0", EvalSettings(
        square_examples=500, autoattack_attacks=("apgd-ce", "apgd-dlr"), eps_curve=CURVE,
        autoattack_engine="art"), True),
])
def test_the_committed_cells_are_read_back(cell, settings, autoattack):
    root, objective, arm, seed = cell.rsplit("/", 3)
    config = arms.cell_config(training.TrainConfig(**COMMITTED), os.path.join(ROOT, "results",
                              root), objective, arm, int(seed.removeprefix("seed")))
    found = cache.stored_results(config, settings)
    assert found is not None, cell
    assert (found["autoattack"] is not None) == autoattack
    assert 0 < found["pgd"] < found["clean"] < 1
    plain = cache.stored_results(config, dataclasses.replace(settings, autoattack=False))
    assert plain is not None and plain["autoattack"] is None and plain["pgd"] == found["pgd"]
    if autoattack:  # ART's evaluation does not serve the keras.ops AutoAttack
        assert cache.stored_results(config, dataclasses.replace(
            settings, autoattack_engine="keras")) is None
