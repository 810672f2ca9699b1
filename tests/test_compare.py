"""Tests of sparta_tf.experiments (the grid), plots, flags/compare.py and trainers/compare.py.

One tiny grid (ResNet-18 at width 1/16, 64 training images, 1 epoch of PGD-1 AT
and of standard training, relu and sparta, one seed, 20 test images) is trained
once for the module; the rerun and the trainer reuse it, so both must skip it.
"""

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
from matplotlib import image as mpimg

from conftest import jax_without_tensorflow, run_app_cases, shared_once
from sparta_tf import data, models, plots, training
from sparta_tf.experiments import ablation, arms, cache, stats
from sparta_tf.experiments.cells import EvalSettings, evaluate, pack, stalled, unpack
from sparta_tf.experiments.grid import run_cell, run_grid
from sparta_tf.experiments.report import after_table, paired_table, square_check, table

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(dataset="bundled", model="resnet10", max_train=64, max_test=20,
            width_multiplier=0.0625, epochs=1, batch_size=32, pgd_steps=1, eval_pgd_steps=1,
            checkpoint_every=0)
SETTINGS = EvalSettings(pgd_steps=1, autoattack=False, eps_curve=(0.0, 8 / 255))
GRID = dict(activations=["relu", "sparta"], seeds=[0], objectives=["pgd", "standard"])
# The same grid as trainer flags.
FLAGS = [f"--{k}={v}" for k, v in TINY.items()] + [
    "--activations=relu,sparta", "--seeds=0", "--objectives=pgd,standard",
    "--eps_curve=0,8/255", "--autoattack=none"]


def _compare(*args):
    return subprocess.run([sys.executable, "-m", "trainers.compare", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


def _mtimes(root):
    """mtime of every cell's model.keras and compare_eval.json."""
    return {os.path.join(d, f): os.path.getmtime(os.path.join(d, f))
            for d, _, files in os.walk(root) for f in files
            if f in ("model.keras", cache.EVAL_FILE)}


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    """`(root, results, mtimes)` of the grid. It is trained once per test run (shared by the
    xdist workers), then copied, mtimes kept, into this worker's own folder, which its tests
    may add to."""
    with shared_once(tmp_path_factory, "compare_grid") as (shared, filled):
        if not filled:
            results = run_grid(training.TrainConfig(**TINY), **GRID,
                               root=str(shared / "root"), settings=SETTINGS, verbose=0)
            (shared / "results.json").write_text(json.dumps(results))
    root = str(tmp_path_factory.mktemp("compare"))
    shutil.copytree(shared / "root", root, dirs_exist_ok=True)  # copy2: mtimes kept
    text = (shared / "results.json").read_text()
    results = json.loads(text.replace(json.dumps(str(shared / "root"))[1:-1], root))
    return root, results, _mtimes(root)


def _tables(markdown, first_header="activation"):
    """{objective title: (header cells, {arm: row cells})} of the tables of the Markdown
    whose first header cell is `first_header`."""
    tables, title, current = {}, None, None
    for line in markdown.splitlines():
        if line.startswith("## "):
            title = line[3:]
        elif not line.startswith("|"):
            current = None
        elif "---" not in line:
            cells = [c.strip() for c in line.strip("|").split("|")]
            if current is None and cells[0] == first_header:
                current = tables[title] = (cells, {})
            elif current is not None:
                current[1][cells[0]] = cells[1:]
    return tables


def _check_png(path):
    pixels = mpimg.imread(path)
    assert pixels.shape[0] > 200 and pixels.shape[1] > 300, (path, pixels.shape)
    assert pixels[..., :3].std() > 0.01, f"{path} is blank"


def test_grid_writes_the_table_per_objective(grid):
    root, results, _ = grid
    assert len(results["cells"]) == 4
    assert os.path.isdir(os.path.join(root, "pgd", "sparta", "seed0"))
    markdown = table(results)
    assert open(os.path.join(root, "comparison.md")).read() == markdown
    tables = _tables(markdown)
    assert list(tables) == ["PGD-1 adversarial training", "Standard training"]
    for header, rows in tables.values():
        assert header == ["activation", "clean", "PGD-1", "AutoAttack", "n"]
        assert list(rows) == ["relu", "sparta"]
        for clean, pgd, autoattack, n in rows.values():
            assert autoattack == "-" and n == "1"
    # The numbers are those that each cell stored (one seed: the mean is the value).
    for title, objective in (("PGD-1 adversarial training", "pgd"),
                             ("Standard training", "standard")):
        for arm, (clean, pgd, _, _) in tables[title][1].items():
            with open(os.path.join(root, objective, arm, "seed0", cache.EVAL_FILE)) as f:
                stored = json.load(f)["results"]
            assert (clean, pgd) == (f"{100 * stored['clean']:.1f}", f"{100 * stored['pgd']:.1f}")
    summary = results["summary"][0]
    assert summary["eps_curve"][0][1] == summary["clean"]["mean"]  # eps 0 is clean
    # The report names the protocol of its PGD numbers.
    assert results["protocol"] == SETTINGS.protocol().to_json()
    assert markdown.splitlines()[3] == (
        "PGD protocol (`sparta_tf.protocol`): PGD-1 at eps 8/255, CE loss, 1 step of "
        "2.5 eps / 1, 1 random start, batches of 256 seeded with [0, 0].")
    old = {k: v for k, v in results.items() if k != "protocol"}  # as comparison.json was
    assert table(old).splitlines() == [line for i, line in enumerate(markdown.splitlines())
                                       if i != 3]
    # Seed by seed, and the eps curve, from the cells (one seed: the means above).
    by_seed = _tables(markdown, "seed by seed: clean / PGD")
    curve = _tables(markdown, "PGD accuracy at eps")
    for title, (header, rows) in tables.items():
        assert by_seed[title][0] == ["seed by seed: clean / PGD", "seed 0"]
        assert curve[title][0] == ["PGD accuracy at eps", "0/255", "8/255"]
        for arm, (clean, pgd, _, _) in rows.items():
            assert by_seed[title][1][arm] == [f"{clean} / {pgd}"]
            assert curve[title][1][arm][0] == clean
    # A dataset path is named as the cells' identity counts it: by its file name.
    elsewhere = {**results, "train": {**results["train"], "dataset": "/a/b/gtsrb-32.tar.gz"}}
    assert table(elsewhere).splitlines()[0].endswith(" on gtsrb-32.tar.gz, 1 epoch")


def test_a_cell_that_did_not_learn_is_marked_stalled(grid, tmp_path):
    _, results, _ = grid
    assert [c["stalled"] for c in results["cells"]] == [False] * 4  # 1 epoch: too early
    config = dataclasses.replace(training.TrainConfig(**TINY), model_dir=str(tmp_path))

    def write(losses):
        with open(tmp_path / "metrics.jsonl", "w") as f:
            f.writelines(json.dumps({"epoch": e + 1, "loss": v}) + "\n"
                         for e, v in enumerate(losses))

    write([2.39, 2.30, 2.29])  # the ResNet-34 Sparta of seed 1: at chance, ln 10 = 2.303
    assert stalled(config, 10)
    assert not stalled(dataclasses.replace(config, objective="trades"), 10)
    write([2.39, 2.30, 2.29, 2.17])  # learning by its last epoch
    assert not stalled(config, 10)
    with open(tmp_path / "metrics.jsonl", "a") as f:  # a damaged line is not a row
        f.write('{"epoch": 5, "lo\n')
    assert not stalled(config, 10)
    # The table marks it, names it and still counts it.
    cells = [{**c, "stalled": c["activation"] == "sparta" and c["objective"] == "pgd"}
             for c in results["cells"]]
    markdown = table({**results, "cells": cells})
    by_seed = _tables(markdown, "seed by seed: clean / PGD")["PGD-1 adversarial training"][1]
    assert by_seed["sparta"][0].endswith(" (stalled)")
    assert not by_seed["relu"][0].endswith(" (stalled)")
    assert markdown.count("Stalled (") == 1 and "): sparta seed 0. They count" in markdown
    # Where cells ran AutoAttack, seed by seed shows it too ("-" where a cell did not).
    cells = [{**c, "autoattack": 0.125 if c["activation"] == "sparta" else None}
             for c in cells]
    by_seed = _tables(table({**results, "cells": cells}),
                      "seed by seed: clean / PGD / AutoAttack")["PGD-1 adversarial training"][1]
    assert by_seed["sparta"][0].endswith(" / 12.5 (stalled)")
    assert by_seed["relu"][0].endswith(" / -") and by_seed["relu"][0].count(" / ") == 2


def test_rerun_skips_finished_cells(grid):
    root, results, mtimes = grid
    start = time.perf_counter()
    again = run_grid(training.TrainConfig(**TINY), **GRID, root=root,
                             settings=SETTINGS, make_plots=False, verbose=0)
    assert time.perf_counter() - start < 10  # a training run takes longer
    assert _mtimes(root) == mtimes
    assert again["summary"] == results["summary"]


def test_report_only_covers_the_finished_cells_and_lists_the_rest(grid, tmp_path):
    root, results, mtimes = grid
    wider = dict(GRID, activations=["relu", "silu", "sparta"], seeds=[0, 1])
    report = run_grid(training.TrainConfig(**TINY), **wider, root=root,
                              settings=SETTINGS, make_plots=False, verbose=0,
                              report_only=True)
    assert _mtimes(root) == mtimes  # nothing trained or evaluated
    assert report["summary"] == results["summary"]
    assert len(report["missing"]) == 8  # silu at seed 0, everything at seed 1
    assert os.path.join(root, "standard", "silu", "seed0") in report["missing"]
    assert "Not finished, so not in the table: 8 cells" in table(report)
    one = {**report, "missing": report["missing"][:1]}
    assert "Not finished, so not in the table: 1 cell (" in table(one)
    with pytest.raises(FileNotFoundError, match="no finished cell"):
        run_grid(training.TrainConfig(**TINY), **GRID, root=str(tmp_path),
                         settings=SETTINGS, verbose=0, report_only=True)
    assert os.listdir(tmp_path) == []
    # Cells stored before a TrainConfig field existed count as its default.
    old = shutil.copytree(root, tmp_path / "old")
    for path in _mtimes(old):
        if path.endswith(cache.EVAL_FILE):
            with open(path) as f:
                stored = json.load(f)
            del stored["config"]["sparta_lr_multiplier"]
            with open(path, "w") as f:
                json.dump(stored, f)
    os.remove(old / "pgd" / "sparta" / "seed0" / "model.keras")  # as in a clone of results/
    report = run_grid(training.TrainConfig(**TINY), **GRID, root=str(old),
                              settings=SETTINGS, verbose=0, report_only=True)
    assert report["summary"] == results["summary"] and not report["missing"]
    assert [os.path.basename(p) for p in report["plots"]] == [
        "eps_curve_pgd.png", "eps_curve_standard.png"]  # the model plots need the model


def test_a_second_report_of_the_same_cells_has_its_own_name(grid, tmp_path):
    root = str(tmp_path / "copy")
    shutil.copytree(grid[0], root)
    before = {n: os.path.getmtime(os.path.join(root, n)) for n in os.listdir(root)
              if os.path.isfile(os.path.join(root, n))}
    report = run_grid(training.TrainConfig(**TINY), activations=["sparta"], seeds=[0],
                              objectives=["pgd"], root=root, settings=SETTINGS, verbose=0,
                              report_only=True, report_name="subset")
    assert {n: os.path.getmtime(os.path.join(root, n)) for n in before} == before
    assert [os.path.basename(p) for p in report["plots"]] == [
        "subset_eps_curve_pgd.png", "subset_attention_maps.png", "subset_gate_weights.png"]
    with open(os.path.join(root, "subset.json")) as f:
        assert [c["activation"] for c in json.load(f)["cells"]] == ["sparta"]
    assert open(os.path.join(root, "subset.md")).read() == table(report)


def test_plots_are_written(grid):
    root, results, _ = grid
    names = ["eps_curve_pgd.png", "eps_curve_standard.png", "attention_maps.png",
             "gate_weights.png", "activation_change.png"]
    assert [os.path.basename(p) for p in results["plots"]] == names
    for name in names:
        _check_png(os.path.join(root, name))
    change = results["activation_change"]
    assert list(change) == ["relu", "sparta"]
    assert list(change["relu"]) == list(change["sparta"])  # the same places
    # ResNet-10: 9 activations.
    assert list(change["relu"])[:2] == ["stem", "s1b0_1"] and len(change["relu"]) == 9
    assert all(v >= 0 for places in change.values() for v in places.values())
    gates = results["gate_weights"]
    assert list(gates)[:2] == ["sparta_stem", "sparta_s1b0_1"] and len(gates) == 9


def test_gate_weights_measure_the_kernel(tmp_path):
    model = models.build("resnet18", 10, "sparta", 0.0625, input_shape=(16, 16, 3),
                         activation_kwargs={"beta0": 2.0})
    stats = plots.gate_weights(model, tmp_path / "gates.png")
    assert stats["sparta_stem"] == {"centre": 2.0, "neighbours": 0.0, "neighbours_abs": 0.0,
                                    "bias": 0.0}  # Swish with beta 2 at the start
    layer = model.get_layer("sparta_s1b0_1")
    kernel = np.zeros(layer.kernel.shape, np.float32)
    kernel[1, 1], kernel[0, 0], kernel[2, 1] = 3.0, 0.5, -0.25
    layer.kernel.assign(kernel)
    layer.bias.assign(np.full(layer.bias.shape, -1.0, np.float32))
    assert plots.gate_weights(model, tmp_path / "gates.png")["sparta_s1b0_1"] == {
        "centre": 3.0, "neighbours": 0.25, "neighbours_abs": 0.75, "bias": -1.0}
    _check_png(tmp_path / "gates.png")
    with pytest.raises(ValueError, match="no Sparta layer"):
        plots.gate_weights(models.build("resnet18", 10, "relu", 0.0625,
                                        input_shape=(16, 16, 3)), tmp_path / "x.png")


def test_gate_spread_measures_the_gate(tmp_path):
    model = models.build("resnet18", 10, "sparta", 0.0625, activation_kwargs={"beta0": 0.0})
    x = np.random.default_rng(0).uniform(size=(4, 32, 32, 3)).astype("float32")
    spread = plots.gate_spread(model, x)
    assert list(spread)[:2] == ["sparta_stem", "sparta_s1b0_1"] and len(spread) == 17
    assert all(s["gate_from_half"] == 0.0 for s in spread.values())
    bn = np.asarray(keras.Model(model.input, model.get_layer("stem_bn").output)(x))
    np.testing.assert_allclose(spread["sparta_stem"]["input_rms"],
                               np.sqrt(np.mean(np.square(bn))), rtol=1e-5)
    stem = model.get_layer("sparta_stem")
    stem.bias.assign(np.full(stem.bias.shape, 20.0, np.float32))  # gate 1: no gating
    assert plots.gate_spread(model, x)["sparta_stem"]["gate_from_half"] > 0.4999
    with pytest.raises(ValueError, match="no Sparta layer"):
        plots.gate_spread(models.build("resnet18", 10, "relu", 0.0625), x)
    os.makedirs(tmp_path / "run")
    model.save(tmp_path / "run" / "model.keras")
    out = subprocess.run([sys.executable, "tools/gate_spread.py", str(tmp_path / "run"),
                          "bundled", "20", str(tmp_path / "data")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "| sparta_stem | " in out.stdout and out.stdout.count("\n") == 19


def test_plots_of_a_stage_shared_sparta(tmp_path):
    keras.utils.set_random_seed(0)
    model = models.build("resnet18", 10, "sparta", 0.0625, sparta_sharing="stage",
                         input_shape=(16, 16, 3))
    x = np.random.default_rng(0).uniform(size=(3, 16, 16, 3)).astype(np.float32)
    x_adv = np.clip(x + 0.03, 0, 1)
    _check_png(plots.attention_maps(model, x[:1], x_adv[:1], tmp_path / "maps.png"))
    change = plots.relative_change(model, x, x_adv)
    assert list(change) == ["s1", "s2", "s3", "s4"]  # one point per shared layer


def test_evaluate_with_autoattack():
    keras.utils.set_random_seed(0)
    model = models.build("resnet18", 10, "sparta", 0.0625, input_shape=(16, 16, 3))
    x = np.random.default_rng(0).integers(0, 256, (8, 16, 16, 3)).astype(np.uint8)
    y = np.argmax(model(x / 255.0), axis=1)  # all correct when clean
    settings = EvalSettings(pgd_steps=2, autoattack_iterations=2, square_queries=5,
                                    eps_curve=(0.0,))
    results = evaluate(model, x, y, settings)
    assert results["clean"] == 1.0 and results["eps_curve"] == [[0.0, 1.0]]
    assert 0 <= results["autoattack"] <= results["pgd"] + 0.25
    assert "square_check" not in results  # Square ran in the chain, on every image
    # Standard AutoAttack in keras.ops by default.
    assert list(results["autoattack_after"]) == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert unpack(results["per_image"]["autoattack"]).mean() == results["autoattack"]
    # Square alone on a class-balanced subset, for the masking check; APGD on every image.
    subset = dataclasses.replace(settings, square_examples=4)
    checked = evaluate(model, x, y, subset)
    assert checked["square_check"]["examples"] == 4
    assert 0 <= checked["square_check"]["square"] <= 1
    markdown = "\n".join(square_check(
        [{"objective": "pgd", "activation": "sparta", "seed": 0, **checked}], "pgd", "PGD-2", 5))
    assert "class-balanced 4 of the test images" in markdown
    assert checked["square_check"]["autoattack"] <= checked["square_check"]["pgd"] + 0.25
    # Square is measured against the best white-box attack on its images, AutoAttack's too.
    def check(square, pgd, autoattack=None):
        kept = {"examples": 100, "square": square, "pgd": pgd,
                **({} if autoattack is None else {"autoattack": autoattack})}
        cell = {"objective": "pgd", "activation": "sparta", "seed": 0, "square_check": kept}
        return square_check([cell], "pgd", "PGD-20", 5000)[0]
    assert "never beats" in check(0.25, 0.27, 0.24)  # below PGD-20, above AutoAttack
    assert "**WARNING**" in check(0.22, 0.27, 0.24) and "(Square 22.0 against 24.0)" in \
        check(0.22, 0.27, 0.24)
    assert "**WARNING**" in check(0.25, 0.27)  # kept before: PGD-20 alone
    assert "against the better of PGD-20 and AutoAttack's white-box" in check(0.25, 0.27, 0.24)
    # Another white-box chain; the accuracy after each of its attacks is kept and tabled.
    dlr = evaluate(model, x, y, dataclasses.replace(
        subset, autoattack_attacks=("apgd-ce", "apgd-dlr"), autoattack_engine="art"))
    assert list(dlr["autoattack_after"]) == ["apgd-ce", "apgd-dlr"]
    assert dlr["autoattack_after"]["apgd-dlr"] == dlr["autoattack"]
    cells = [{"objective": "pgd", "activation": "sparta", "seed": 0, **dlr}]
    assert after_table(cells, "pgd", ["sparta"])[2] == (
        f"| sparta | {100 * dlr['autoattack_after']['apgd-ce']:.1f} | "
        f"{100 * dlr['autoattack']:.1f} | 1 |")


def test_summary_and_cell_config():
    cells = [{"objective": "pgd", "activation": "relu", "seed": s, "clean": c, "pgd": p,
              "autoattack": None, "eps_curve": [[0.0, c]]}
             for s, c, p in [(0, 0.5, 0.2), (1, 0.7, 0.4)]]
    (row,) = stats.summarize(cells)
    assert row["clean"]["mean"] == pytest.approx(0.6) and row["clean"]["n"] == 2
    assert row["pgd"]["std"] == pytest.approx(np.std([0.2, 0.4], ddof=1))
    assert row["autoattack"]["mean"] is None and row["eps_curve"] == [[0.0, 0.6]]
    base = training.TrainConfig(sparta_sharing="stage")
    relu = arms.cell_config(base, "root", "pgd", "relu", 1)
    assert relu.model_dir == os.path.join("root", "pgd", "relu", "seed1")
    assert relu.sparta_sharing == "layer" and relu.seed == 1 and relu.objective == "pgd"
    assert arms.cell_config(base, "root", "pgd", "sparta", 1).sparta_sharing == "stage"


def test_arms_other_than_activations():
    base = training.TrainConfig(sparta_sharing="stage", sparta_from="src.keras",
                                sparta_from_sha256="ab", denoise="mean")
    denoised = arms.cell_config(base, "root", "pgd", "relu_nonlocal", 0)
    assert (denoised.activation, denoised.denoise, denoised.sparta_sharing) == (
        "relu", "nonlocal", "layer")
    assert denoised.sparta_from is None and denoised.sparta_from_sha256 is None
    moved = arms.cell_config(base, "root", "pgd", "sparta_transfer", 0)
    assert (moved.activation, moved.sparta_from, moved.sparta_from_sha256) == (
        "sparta", "src.keras", "ab")
    assert moved.model_dir == os.path.join("root", "pgd", "sparta_transfer", "seed0")
    assert moved.denoise == "none" and moved.sparta_sharing == "stage"
    fresh = arms.cell_config(base, "root", "pgd", "sparta", 0)
    assert fresh.sparta_from is None and fresh.denoise == "none"
    with pytest.raises(ValueError, match="set sparta_from"):
        arms.arm_overrides("sparta_transfer", training.TrainConfig())
    for unknown in ("relu_median", "relu_none"):
        with pytest.raises(ValueError, match="relu_nonlocal"):
            arms.arm_overrides(unknown, base)


def test_trainer_reuses_the_grid_and_writes_the_reports(grid):
    root, _, mtimes = grid
    for name in ["comparison.md", "comparison.json", "attention_maps.png"]:
        os.remove(os.path.join(root, name))
    out = _compare(*FLAGS, f"--model_dir={root}")
    assert out.returncode == 0, out.stderr[-3000:]
    assert _mtimes(root) == mtimes  # the flags give the same cells: nothing retrained
    assert "| sparta |" in out.stdout and "## Standard training" in out.stdout
    for name in ["comparison.md", "comparison.json"]:
        assert os.path.getsize(os.path.join(root, name)) > 0
    _check_png(os.path.join(root, "attention_maps.png"))


BAD_FLAGS = [
    ("--activations=relu,tanh", ["--activations", "tanh", "relu, silu", "sparta"]),
    ("--seed=1", ["--seed=1", "--seeds"]),
    ("--report_name=../up", ["--report_name", "plain file name"]),
    ("--autoattack_attacks=apgd-ce,square", ["--autoattack_attacks", "apgd-dlr"])]


def test_bad_flag_is_a_usage_error_without_traceback():
    """The first as a user runs it, in its own process; the others in one process."""
    cases = [[flag, "--model_dir=/nonexistent/never_written"] for flag, _ in BAD_FLAGS]
    runs = [_compare(*cases[0]), *run_app_cases("compare", cases[1:])]
    for out, (flag, needles) in zip(runs, BAD_FLAGS):
        assert out.returncode != 0, flag
        assert all(n in out.stderr for n in needles), (flag, out.stderr[-2000:])
        assert "Traceback" not in out.stderr, flag
        assert not re.search(r"\bEpoch\b", out.stdout), flag


def test_ablation_table_names_what_each_variant_changes(grid):
    _, results, _ = grid
    k1 = json.loads(json.dumps(results))  # a copy, as read from comparison.json
    k1["train"].update(sparta_kernel_size=1, model_dir="elsewhere")
    for cell in k1["cells"]:
        cell["pgd"] = 0.125
    k1["summary"] = stats.summarize(k1["cells"])
    rows = ablation.ablation_table([results, k1]).splitlines()
    assert rows[0] == "| variant | clean, seed 0 | PGD-1, seed 0 | clean | PGD-1 | n |"
    assert rows[2].startswith("| baseline (k 3, beta0 1, sharing layer, Sparta weight decay "
                              "on, Sparta lr x1, custom gradient on, gate input normalised "
                              "off) |")
    (cell,) = [c for c in k1["cells"] if c["objective"] == "pgd" and c["activation"] == "sparta"]
    clean = f"{100 * cell['clean']:.1f}"
    assert rows[3] == f"| k 1 | {clean} | 12.5 | {clean} | 12.5 | 1 |"
    k1["train"]["sparta_normalize_gate_input"] = True
    assert ablation.ablation_table([results, k1]).splitlines()[3].startswith(
        "| k 1, gate input normalised on |")
    k1["settings"]["pgd_steps"] = 7
    with pytest.raises(ValueError, match=r"differs in \['pgd_steps'\]"):
        ablation.ablation_table([results, k1])
    out = subprocess.run([sys.executable, "tools/ablation_table.py", grid[0], grid[0]],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[3].startswith("| the baseline's settings |")


def test_cells_keep_which_images_they_got_right(grid):
    _, results, _ = grid
    for cell in results["cells"]:
        for metric in ("clean", "pgd"):
            hits = unpack(cell["per_image"][metric])
            assert hits.dtype == bool and len(hits) == results["test_examples"]
            assert hits.mean() == cell[metric]
        assert cell["per_image"]["autoattack"] is None  # not run in this grid


def test_pack_and_unpack_round_trip():
    rng = np.random.default_rng(0)
    for n in (1, 7, 8, 2000):
        hits = rng.random(n) < 0.3
        np.testing.assert_array_equal(unpack(pack(hits)), hits)


def _cells(hits_by_arm):
    return [{"objective": "pgd", "activation": arm, "seed": seed,
             "per_image": {"pgd": pack(h), "autoattack": None}}
            for arm, by_seed in hits_by_arm.items() for seed, h in enumerate(by_seed)]


def test_paired_differences_and_their_interval():
    rng = np.random.default_rng(1)
    n = 2000
    base = [rng.random(n) < 0.3 for _ in range(3)]
    # b: the same images right as a, plus 5% more of the images at every seed.
    more = [h | (rng.random(n) < 0.05 / 0.7) for h in base]
    p = stats.paired(_cells({"a": more, "b": base}), "pgd", "a", "b", "pgd")
    assert p["seeds"] == 3 and p["images"] == n
    for s in range(3):
        assert p["by_seed"][s] == pytest.approx((more[s].astype(int) - base[s]).mean())
    assert 0.03 < p["low"] < p["mean"] < p["high"] < 0.07
    # Two arms that differ by chance alone: the interval holds 0.
    noise = [rng.random(n) < 0.3 for _ in range(3)]
    q = stats.paired(_cells({"a": noise, "b": base}), "pgd", "a", "b", "pgd")
    assert q["low"] < 0 < q["high"] and q["high"] - q["low"] < 0.06
    assert stats.paired(_cells({"a": more, "b": base}), "pgd", "a", "b", "autoattack") is None
    arms = {"relu": base, "sparta": more, "sparta_transfer": noise}
    markdown = "\n".join(paired_table(_cells(arms), "pgd", list(arms), "PGD-20"))
    by_seed = ", ".join(f"{s}: {100 * (more[s].astype(int) - base[s]).mean():+.2f}"
                        for s in range(3))
    assert f"| sparta - relu | PGD-20 | {by_seed} | {100 * p['mean']:+.2f} [" in markdown
    pairs = re.findall(r"^\| (\S+ - \S+) \| PGD-20 \|", markdown, re.M)
    assert pairs == ["sparta - relu", "sparta - sparta_transfer", "sparta_transfer - relu"]
    # How far an interval reaches at this size: the smallest and largest half-width.
    widths = [50 * (p["high"] - p["low"]) for p in (
        stats.paired(_cells(arms), "pgd", a, b, "pgd")
        for a, b in [("sparta", "relu"), ("sparta", "sparta_transfer"),
                     ("sparta_transfer", "relu")])]
    assert markdown.endswith(f"either side of its mean (points, smallest to largest over the "
                             f"pairs): PGD-20 {min(widths):.1f} to {max(widths):.1f}. A "
                             "difference must be about that large to stand out.")
    # 2,000 images, 3 seeds, ~30% accuracy: under 1 point for arms that agree on most
    # images (sparta - relu here), about 3 for independent ones.
    assert 0.5 < min(widths) < 1.0 and 2.5 < max(widths) < 3.5
    # Sparta's variants come first, each against every other arm, each pair once.
    variants = {"relu": base, "sparta": more, "sparta_shift": noise, "sparta_bn": base}
    pairs = re.findall(r"^\| (\S+ - \S+) \| PGD-20 \|", "\n".join(
        paired_table(_cells(variants), "pgd", list(variants), "PGD-20")), re.M)
    assert pairs == ["sparta_shift - relu", "sparta_shift - sparta", "sparta_shift - sparta_bn",
                     "sparta_bn - relu", "sparta_bn - sparta", "sparta - relu"]
    one = "\n".join(paired_table(_cells({"relu": base, "sparta": more}), "pgd",
                                           ["relu", "sparta"], "PGD-20"))
    assert one.endswith(f"pairs): PGD-20 {widths[0]:.1f}. A difference must be about that "
                        "large to stand out.")  # one pair: one number


def test_the_paired_mean_is_over_every_seed_not_one():
    """Seeds that differ by different amounts: 1, 5 and 9 points. The mean is 5 points,
    every seed's difference counts, and the interval holds it; seed 0 alone would say 1."""
    n = 1000
    base = [np.zeros(n, bool) for _ in range(3)]
    more = [np.arange(n) < points * n // 100 for points in (1, 5, 9)]
    p = stats.paired(_cells({"a": more, "b": base}), "pgd", "a", "b", "pgd")
    assert p["by_seed"] == {0: 0.01, 1: 0.05, 2: 0.09}
    assert p["mean"] == pytest.approx(0.05)
    assert p["low"] <= p["mean"] <= p["high"]
    assert p["low"] < 0.05 < p["high"] and p["high"] - p["low"] > 0.04  # seeds disagree
    # The other way round, and with the seeds in another order: the same mean.
    assert stats.paired(_cells({"a": base, "b": more}), "pgd", "a", "b", "pgd")["mean"] == \
        pytest.approx(-0.05)
    shuffled = stats.paired(_cells({"a": more[::-1], "b": base}), "pgd", "a", "b", "pgd")
    assert shuffled["mean"] == pytest.approx(0.05) and shuffled["by_seed"][0] == 0.09


def test_a_finished_cell_is_evaluated_anew_not_retrained(grid, tmp_path):
    root = str(tmp_path / "copy")
    shutil.copytree(grid[0], root)
    trained = {p: os.path.getmtime(p) for p in _mtimes(root) if p.endswith("model.keras")}
    other = dataclasses.replace(SETTINGS, eps_curve=(0.0,))  # other settings: evaluate again
    again = run_grid(training.TrainConfig(**TINY), activations=["relu"], seeds=[0],
                             objectives=["pgd"], root=root, settings=other, make_plots=False,
                             verbose=0)
    assert again["cells"][0]["eps_curve"] == [[0.0, again["cells"][0]["clean"]]]
    assert {p: os.path.getmtime(p) for p in trained} == trained  # no training ran
    metrics = os.path.join(root, "pgd", "relu", "seed0", "metrics.jsonl")
    assert len(open(metrics).readlines()) == TINY["epochs"]
    # The model's first evaluation stays beside the new one and still serves its settings.
    config = arms.cell_config(training.TrainConfig(**TINY), root, "pgd", "relu", 0)
    first = next(c for c in grid[1]["cells"] if (c["objective"], c["activation"]) == (
        "pgd", "relu"))
    assert cache.stored_results(config, SETTINGS)["pgd"] == first["pgd"]
    assert cache.stored_results(config, other)["eps_curve"] == [[0.0, first["clean"]]]
    # A cell trained again is a new model: the earlier evaluations go with the old one.
    ds = data.load("bundled", None, max_test=TINY["max_test"], splits=("test",))
    run_cell(config, ds.x_test, ds.y_test, other, overwrite=True, verbose=0)
    assert cache.stored_results(config, other) is not None
    assert cache.stored_results(config, SETTINGS) is None


def test_the_flags_make_the_evaluation_settings():
    code = ("import dataclasses, json; from flags import compare as c, core; c.define_compare(); "
            "core.FLAGS(['x', '--square_examples=500', '--square_queries=1000', "
            "'--autoattack_iterations=50', '--autoattack_attacks=apgd-ce,apgd-dlr', "
            "'--autoattack=art', "
            "'--eps_curve=2/255']); "
            "print(json.dumps(dataclasses.asdict(c.grid(core.train_config())['settings'])))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    settings = json.loads(out.stdout.splitlines()[-1])
    assert {k: settings[k] for k in ("square_examples", "square_queries",
                                     "autoattack_iterations", "autoattack_attacks")} == {
        "square_examples": 500, "square_queries": 1000, "autoattack_iterations": 50,
        "autoattack_attacks": ["apgd-ce", "apgd-dlr"]}
    assert settings["eps_curve"] == [2 / 255] and settings["autoattack_engine"] == "art"


def test_a_tiny_grid_on_jax_without_tensorflow(tmp_path):
    """sparta-compare trains and evaluates on JAX where TensorFlow cannot be imported, with
    AutoAttack in keras.ops, and writes the reports as on TensorFlow; ART's AutoAttack is one
    line that says TensorFlow is not installed."""
    env = jax_without_tensorflow(tmp_path / "blocked")
    flags = [f"--{k}={v}" for k, v in dict(TINY, max_train=32, max_test=8).items()] + [
        "--activations=relu", "--seeds=0", "--objectives=pgd", "--eps_curve=0",
        "--autoattack_iterations=2", "--square_queries=3", "--noplots",
        f"--model_dir={tmp_path / 'grid'}"]

    def compare(*args):
        return subprocess.run([sys.executable, "-m", "trainers.compare", *flags, *args],
                              cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)

    out = compare()
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads((tmp_path / "grid" / "comparison.json").read_text())
    assert results["settings"]["autoattack_engine"] == "keras"
    [cell] = results["cells"]
    assert 0 <= cell["autoattack"] <= cell["pgd"] <= cell["clean"] <= 1
    assert list(cell["autoattack_after"]) == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert len(unpack(cell["per_image"]["autoattack"])) == 8
    assert "sparta_tf.autoattack_keras" in (tmp_path / "grid" / "comparison.md").read_text()
    out = compare("--autoattack=art")
    assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr[-3000:]
    line = out.stderr.strip().splitlines()[-1]
    assert "needs TensorFlow" in line and "TensorFlow is not installed" in line, line
