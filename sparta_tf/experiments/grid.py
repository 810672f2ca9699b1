"""The grid of sparta-compare and sparta-transfer: train, evaluate and report every cell.

`run_grid(base, activations, seeds)` trains every cell of the grid (the `activations` are
arms, `arms.py`) with `training.run` into `root/{objective}/{arm}/seed{seed}` (a
`TrainConfig` that differs from `base` only there, `arms.cell_config`), evaluates it on
the same test images (`cells.evaluate`), and writes `comparison.json`, `comparison.md`
(`report.table`) and, with `make_plots=True`, the pictures of `figures.py` into `root`.
`report_only=True` trains nothing and reports the finished cells.

Every cell resumes: `training.run` continues a killed run from its checkpoints, and a
cell's evaluation is kept in its model_dir (`cache.py`), so a rerun of the same grid skips
finished cells without loading their models. The grid runs seed by seed, so the first
seed's table of every activation is done first.
"""

import dataclasses
import os

from sparta_tf import data, evaluation, model_dir, training
from sparta_tf.experiments import cache, figures, report, stats
from sparta_tf.experiments.arms import TRANSFER_ARM, arm_overrides, cell_config
from sparta_tf.experiments.cells import EvalSettings, evaluate, stalled

REPORT = "comparison"  # the reports' default name: comparison.json, comparison.md


def run_cell(config, x, y, settings, overwrite=False, verbose="auto"):
    """Trains (or resumes) one cell and evaluates it, unless its evaluation is stored.

    A cell trained to the end (its model.keras there, `training.finished`) whose evaluation
    is missing or of other settings (AutoAttack added, say) is evaluated, not retrained.

    Returns the evaluation (see `cells.evaluate`), also kept in model_dir/compare_eval.json
    with the config and settings it belongs to. The model's earlier evaluations (other
    settings) stay there, under `earlier`, and still serve; a retrained cell drops them.
    """
    stored = None if overwrite else cache.stored_results(config, settings)
    if stored is not None:
        return stored
    earlier = []  # the evaluations of this model with other settings, kept beside the new one
    if overwrite or not training.finished(config):
        training.run(config, overwrite=overwrite, verbose=verbose)  # a new model: none
    else:
        earlier = cache.evaluations(config.model_dir)
    model = evaluation.load_model(config.model_dir)
    results = evaluate(model, x, y, settings, verbose=verbose != 0)
    cache.store(config, settings, results, earlier)
    return results


def run_grid(base, activations, seeds, objectives=("pgd", "standard"), root="runs/compare",
             settings=EvalSettings(), make_plots=True, overwrite=False, verbose="auto",
             report_only=False, report_name=REPORT):
    """Trains and evaluates every cell; writes comparison.json, comparison.md and plots.

    Args:
        base: the `training.TrainConfig` that every cell starts from (its data,
            model, recipe; its model_dir, activation, seed and objective are
            replaced, see `arms.cell_config`; its `sparta_from` is the source of
            the `sparta_transfer` arm).
        activations: arms: canonical activation names (`activations.NAMES`)
            or `arms.EXTRA_ARMS`.
        seeds: training seeds.
        objectives: names out of `training.OBJECTIVES`.
        root: the folder of the cells and of the reports.
        settings: a `cells.EvalSettings`; the test images are a class-balanced
            sample of `base.max_test` drawn with `settings.seed`, the same for
            every cell.
        make_plots: also write the PNGs of `figures.pictures`.
        overwrite: retrain every cell from scratch (its model_dir is deleted).
        verbose: Keras' verbosity for training; 0 also hides the evaluation's
            progress bars.
        report_only: train and evaluate nothing: the reports cover the cells
            whose evaluation is stored, and list the others as `missing`.
        report_name: the reports are `{report_name}.json` and `.md`, and
            another name than `REPORT` goes before the PNGs' names too, so
            that several reports (a subset of arms, AutoAttack added) can
            read the same cells without overwriting each other.

    Returns: a JSON-able dict: `train` (the base config), `settings`, `test_examples`,
        `cells` (one per run: objective, activation, seed, model_dir, the results of
        `cells.evaluate` and `stalled`), `missing` (the model_dirs of the cells left out
        by `report_only`), `summary` (see `stats.summarize`), `protocol` (the cells' PGD
        protocol, `EvalSettings.protocol`, as `Protocol.to_json`), `plots` (the PNG
        paths), `activation_change` and `gate_weights` (see `figures.pictures`).

    Raises:
        what `training.run` and `data.load` raise, e.g.
        `training.ConfigMismatchError` for a root of another configuration.
    """
    for arm in activations:  # every arm's config is valid before anything trains
        arm_overrides(arm, base)
    if TRANSFER_ARM in activations:
        base, _ = training.with_sparta_source(base)  # its sha256 is part of the cells' key
    ds = data.load(base.dataset, base.data_dir, max_test=base.max_test, seed=settings.seed,
                   splits=("test",), max_extract_gb=base.max_extract_gb,
                   max_extract_ratio=base.max_extract_ratio)
    cells, missing = [], []
    for seed in seeds:
        for objective in objectives:
            for activation in activations:
                config = cell_config(base, root, objective, activation, seed)
                if config.gates_from:  # the sha256 of its seed's network: part of its key
                    config, _ = training.with_gates_source(config)
                if report_only:
                    results = cache.stored_results(config, settings)
                    if results is None:
                        missing.append(config.model_dir)
                        continue
                else:
                    results = run_cell(config, ds.x_test, ds.y_test, settings, overwrite,
                                       verbose)
                cells.append({"objective": objective, "activation": activation, "seed": seed,
                              "model_dir": config.model_dir, **results,
                              "stalled": stalled(config, ds.num_classes)})
    if report_only and not cells:
        raise FileNotFoundError(f"no finished cell of this grid in {root}")
    results = {"train": base.to_json(), "settings": dataclasses.asdict(settings),
               "test_examples": len(ds.y_test), "cells": cells, "missing": missing,
               "summary": stats.summarize(cells), "protocol": settings.protocol().to_json(),
               "plots": [], "activation_change": None, "gate_weights": None}
    if make_plots:
        prefix = "" if report_name == REPORT else f"{report_name}_"
        results["plots"], values = figures.pictures(results, ds.x_test, ds.y_test, root,
                                                    settings, prefix)
        results.update(values)
    model_dir.write_json(os.path.join(root, f"{report_name}.json"), results)
    model_dir.write_text(os.path.join(root, f"{report_name}.md"), report.table(results))
    return results
