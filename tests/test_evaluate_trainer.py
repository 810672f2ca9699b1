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
import tensorflow as tf
from PIL import Image

from conftest import jax_without_tensorflow, needs_jax, run_app_cases
from sparta_tf import evaluation, layers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
           "truck"]
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
    # As training writes them; evaluate takes the data flags and eps from it, and checks
    # the class names against the data's.
    (path / "config.json").write_text(json.dumps(
        {"dataset": "bundled", "max_test": 20, "seed": 1, "eps": 4 / 255, "model": "resnet18"}))
    (path / "class_names.json").write_text(json.dumps(CIFAR10))
    return path


def _classifier(path, shape=(32, 32, 3), classes=10):
    """A tiny classifier of `shape` images and `classes` logits, saved to `path`."""
    inputs = keras.Input(shape)
    h = keras.layers.Conv2D(4, 3, strides=4, padding="same")(inputs)
    keras.Model(inputs, keras.layers.Dense(classes)(keras.layers.Flatten()(h))).save(path)
    return path


def _two_class_folder(root):
    """An image folder (split/class/image) of 2 classes, 2 PNGs of 32x32 each."""
    for split in ("train", "test"):
        for name in ("cat", "dog"):
            os.makedirs(root / split / name)
            for i in range(2):
                Image.new("RGB", (32, 32), (60 * i, 90, 30)).save(root / split / name / f"{i}.png")
    return root


def _without_logits(path):
    """A SavedModel whose serving_default returns probabilities, not logits."""
    module = tf.Module()
    module.serve = tf.function(
        lambda images: {"probabilities": tf.nn.softmax(tf.reduce_mean(images, [1, 2]))},
        input_signature=[tf.TensorSpec([None, 32, 32, 3], tf.float32, name="images")])
    tf.saved_model.save(module, str(path / "1"), signatures={"serving_default": module.serve})
    return path


def _model_dir_with(folder, model_dir, **files):
    """A copy of `model_dir` in `folder`, with other `files` ({name: JSON text})."""
    folder.mkdir()
    (folder / "model.keras").write_bytes((model_dir / "model.keras").read_bytes())
    for name, text in files.items():
        (folder / f"{name}.json").write_text(text)
    return folder


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
    # Standard AutoAttack in keras.ops, Square first (alone, for the masking check).
    assert report["settings"]["autoattack"] == "keras"
    assert list(report["autoattack_after"]) == ["square", "apgd-ce", "apgd-t", "fab-t"]
    robust = evaluation.unpack(report["per_image"]["autoattack"])
    assert len(robust) == 20 and robust.mean() == acc["autoattack"]
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
                    "--num_examples=10", "--eps=2/255", "--autoattack=none", *SMALL)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["examples"] == 10 and report["eps"] == pytest.approx(2 / 255)
    assert "autoattack" not in report["accuracy"] and "square" in report["accuracy"]


def test_arts_autoattack_is_the_cross_check_on_tensorflow(model_dir, tmp_path):
    out = _evaluate(f"--model_path={model_dir}", f"--output_dir={tmp_path}",
                    "--num_examples=10", "--autoattack=art", *SMALL)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["settings"]["autoattack"] == "art"
    assert list(report["autoattack_after"]) == ["square", "apgd-ce", "apgd-t"]
    assert "ART" in (tmp_path / "eval.md").read_text()


@needs_jax
def test_evaluates_on_jax_without_tensorflow(model_dir, tmp_path):
    """The whole report, AutoAttack included, on JAX where TensorFlow cannot be imported;
    what needs TensorFlow is one line that says it is not installed."""
    env = jax_without_tensorflow(tmp_path / "blocked")

    def evaluate(*args):
        return subprocess.run([sys.executable, "-m", "trainers.evaluate", *args], cwd=ROOT,
                              capture_output=True, text=True, env=env, timeout=600)

    # Fewer PGD runs than SMALL's: each compiles anew on JAX.
    out = evaluate(f"--model_path={model_dir}", f"--output_dir={tmp_path}", "--num_examples=8",
                   "--eval_steps=2", "--pgd_restarts=1", *SMALL[2:])
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["examples"] == 8 and report["settings"]["autoattack"] == "keras"
    assert list(report["autoattack_after"]) == ["square", "apgd-ce", "apgd-t", "fab-t"]
    assert 0 <= report["accuracy"]["autoattack"] <= report["accuracy"]["square"]
    assert len(evaluation.unpack(report["per_image"]["autoattack"])) == 8
    assert {c["name"] for c in report["checks"]} >= {"eps_monotone", "black_box_weaker"}
    saved_model = _without_logits(tmp_path / "saved_model")
    for args in ([f"--model_path={model_dir}", "--autoattack=art"],
                 [f"--model_path={saved_model}"]):
        out = evaluate(*args, *SMALL)
        assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr[-3000:]
        line = out.stderr.strip().splitlines()[-1]
        assert line.startswith("error:") and "needs TensorFlow" in line, line
        assert "TensorFlow is not installed" in line, line


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


def test_a_model_that_does_not_fit_the_data_is_refused_in_one_line(model_dir, tmp_path,
                                                                    tmp_path_factory):
    """Before the evaluation, and before anything is written: the issue's 12-class model on
    the 10 classes of the bundled data and 10-class model on a 2-class folder (every
    accuracy was 0.0, with exit status 0), a model of other images or channels, class names
    that are not the data's, a SavedModel without logits, and a config.json that holds what
    the flags refuse; and data that --max_extract_gb refuses. All in one process."""
    small = ["--num_examples=10", *SMALL]
    renamed = _model_dir_with(tmp_path / "renamed", model_dir,
                              class_names=json.dumps([f"c{i}" for i in range(10)]))
    null = _model_dir_with(tmp_path / "null", model_dir, config='{"dataset": null}')
    seed = _model_dir_with(tmp_path / "seed", model_dir, config='{"seed": -1}')
    cases = [
        ([f"--model_path={_classifier(tmp_path / 'twelve.keras', classes=12)}"],
         f"error: The model {tmp_path / 'twelve.keras'} has 12 classes (logits), and the data "
         "has 10 classes ('airplane', 'automobile', 'bird', 'cat', ... (10 in all)): evaluate "
         "it on the data it was trained on (--dataset)."),
        ([f"--model_path={model_dir}", f"--dataset={_two_class_folder(tmp_path / 'two')}",
          "--num_examples=2"],
         f"error: The model {model_dir} has 10 classes (logits), and the data has 2 classes "
         "('cat', 'dog')"),
        ([f"--model_path={_classifier(tmp_path / 'small.keras', shape=(8, 8, 3))}"],
         f"error: The model {tmp_path / 'small.keras'} takes images of 8x8x3 (height x width "
         "x channels), and the data's are 32x32x3"),
        ([f"--model_path={_classifier(tmp_path / 'gray.keras', shape=(32, 32, 1))}"],
         "takes images of 32x32x1 (height x width x channels), and the data's are 32x32x3"),
        ([f"--model_path={renamed}"],
         f"error: The model {renamed} was trained on 10 classes ('c0', 'c1', "
         "'c2', 'c3', ... (10 in all), in its class_names.json), and the data has 10 classes"),
        ([f"--model_path={_without_logits(tmp_path / 'served')}"],
         f"error: The SavedModel {tmp_path / 'served' / '1'} has no `logits` output in its "
         "serving_default signature (it has: probabilities)"),
        ([f"--model_path={null}"],
         f"error: {null / 'config.json'} holds dataset: null, which --dataset "
         "refuses"),
        ([f"--model_path={seed}"],
         f"error: {seed / 'config.json'} holds seed: -1, which --seed refuses"),
        ([f"--model_path={model_dir}", "--max_extract_gb=0.0001",
          f"--data_dir={tmp_path_factory.mktemp('cache')}"],
         "it expands to more than 0.0001 GB (--max_extract_gb=0.0001)"),
    ]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    before = {p for p in tmp_path.rglob("*")}
    evaluated = model_dir / "eval.json"
    stamp = evaluated.stat().st_mtime_ns if evaluated.exists() else None
    runs = run_app_cases("evaluate", [[*small, *args] for args, _ in cases], env=env)
    for out, (args, message) in zip(runs, cases):
        assert out.returncode == 1, (args, out.stderr[-2000:])
        assert message in out.stderr, (args, out.stderr[-2000:])
        assert out.stderr.strip().count("\n") == 0 and "Traceback" not in out.stderr, args
        assert "Robustness" not in out.stdout, args  # nothing was evaluated
    assert {p for p in tmp_path.rglob("*")} == before  # no eval.json anywhere
    assert (evaluated.stat().st_mtime_ns if evaluated.exists() else None) == stamp


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
