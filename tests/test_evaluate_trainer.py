"""End-to-end tests of trainers/evaluate.py, run as `python -m trainers.evaluate`.

A tiny Sparta CNN for the bundled CIFAR-10 sample (32x32x3), saved into a model_dir
with a config.json as training writes one, and a few small attacks keep it fast.
"""

import json
import os
import subprocess
import sys

import keras
import pytest

from conftest import run_app_cases
from sparta_tf import layers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--eval_steps=2,4", "--pgd_restarts=2", "--autoattack_iterations=2",
         "--square_queries=10", "--batch_size=16"]


def _evaluate(*args):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    return subprocess.run([sys.executable, "-m", "trainers.evaluate", *args], cwd=ROOT,
                          capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("run")
    keras.utils.set_random_seed(0)
    inputs = keras.Input((32, 32, 3))
    h = layers.Sparta()(keras.layers.Conv2D(8, 3, strides=2, padding="same")(inputs))
    h = layers.Sparta()(keras.layers.Conv2D(8, 3, strides=2, padding="same")(h))
    logits = keras.layers.Dense(10)(keras.layers.GlobalAveragePooling2D()(h))
    keras.Model(inputs, logits).save(path / "model.keras")
    # As training writes it; evaluate takes the data flags and eps from it.
    (path / "config.json").write_text(json.dumps(
        {"dataset": "bundled", "max_test": 20, "seed": 1, "eps": 4 / 255, "model": "resnet18"}))
    return path


def test_evaluates_a_model_dir(model_dir):
    out = _evaluate(f"--model_path={model_dir}", *SMALL)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((model_dir / "eval.json").read_text())
    markdown = (model_dir / "eval.md").read_text()
    assert markdown in out.stdout
    assert report["model"] == str(model_dir) and report["dataset"] == "bundled"
    assert report["examples"] == 20 and report["eps"] == pytest.approx(4 / 255)
    assert report["settings"]["steps"] == [2, 4] and report["settings"]["restarts"] == 2
    acc = report["accuracy"]
    assert list(acc) == ["clean", "fgsm", "pgd2_ce", "pgd2_cw", "pgd4_ce", "pgd4_cw",
                         "square", "autoattack"]
    assert all(0 <= v <= acc["clean"] for v in acc.values())
    assert acc["clean"] > 0
    assert report["eps_sweep"][-1] == [0.5, 0.0]   # PGD at eps 0.5 breaks every example
    assert [e for e, _ in report["eps_sweep"]] == pytest.approx(
        [1 / 255, 2 / 255, 4 / 255, 8 / 255, 16 / 255, 0.5])
    assert {c["name"] for c in report["checks"]} == {
        "eps_monotone", "steps_monotone_ce", "steps_monotone_cw", "large_eps",
        "black_box_weaker", "restarts"}
    assert "| clean |" in markdown and "Gradient-masking checks" in markdown


def test_flags_override_the_config_and_output_dir(model_dir, tmp_path):
    out = _evaluate(f"--model_path={model_dir / 'model.keras'}", f"--output_dir={tmp_path}",
                    "--num_examples=10", "--eps=2/255", "--noautoattack", *SMALL)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["examples"] == 10 and report["eps"] == pytest.approx(2 / 255)
    assert "autoattack" not in report["accuracy"] and "square" in report["accuracy"]


BAD_INPUT = [
    (["--model_path=/no/such/model"], "error: No model at '/no/such/model'"),
    (["--model_path=x.keras", "--eps=-1"], "flag --eps=-1"),
    (["--model_path=x.keras", "--eps=0"], "must be > 0"),
    ([], "--model_path must have a value"),
] + [  # the flags of training that evaluation does not use do not exist
    (["--model_path=x.keras", flag], f"Unknown command line flag '{flag[2:].split('=')[0]}'")
    for flag in ("--pgd_steps=3", "--pgd_step_size=0.01", "--max_train=10")]


def test_bad_input_is_an_error_without_traceback():
    """The first as a user runs it, in its own process; the others in one process."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    runs = [_evaluate(*BAD_INPUT[0][0]),
            *run_app_cases("evaluate", [args for args, _ in BAD_INPUT[1:]], env=env)]
    for out, (args, message) in zip(runs, BAD_INPUT):
        assert out.returncode != 0, args
        assert message in out.stderr, (args, out.stderr[-2000:])
        assert "Traceback" not in out.stderr, args


def test_help_says_what_runs_when_a_model_loads():
    out = _evaluate("--help")
    text = " ".join(out.stdout.split())
    assert "loads under Keras's safe_mode, so it runs no arbitrary code: a Lambda layer is " \
           "refused" in text, out.stdout[:3000]
    assert "An exported SavedModel runs its own graph, TensorFlow ops chosen by whoever " \
           "wrote it: only evaluate SavedModels you trust" in text


def test_an_unwritable_output_dir_fails_before_the_evaluation(model_dir, tmp_path):
    # A path under a file: unwritable for root too (a read-only folder is not, for root).
    (tmp_path / "file").write_text("")
    out = _evaluate(f"--model_path={model_dir}", f"--output_dir={tmp_path / 'file' / 'out'}",
                    *SMALL)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert f"error: Cannot write to {tmp_path / 'file' / 'out'}" in out.stderr
    assert "Robustness" not in out.stdout  # nothing was evaluated


def test_a_corrupt_config_json_is_one_clear_error(model_dir, tmp_path):
    (tmp_path / "model.keras").write_bytes((model_dir / "model.keras").read_bytes())
    (tmp_path / "config.json").write_text('{"dataset": "bundled", "eps": ')  # cut short
    out = _evaluate(f"--model_path={tmp_path}", *SMALL)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert f"error: {tmp_path / 'config.json'} is not valid JSON" in out.stderr
    assert not (tmp_path / "eval.json").exists()
