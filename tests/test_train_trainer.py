"""Tests of trainers/train.py and flags/core.py, run as a user runs them."""

import json
import os
import subprocess
import sys

from conftest import run_app_cases, run_apps, without_tensorflow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--model=resnet10", "--max_train=256", "--max_test=20", "--width_multiplier=0.0625",
        "--epochs=1"]


def _train(*args):
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}  # as a user's
    return subprocess.run([sys.executable, "-m", "trainers.train", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, env=env)


BAD_FLAGS = [
    ("--eps=-1", "--eps"), ("--eps=8/0", "--eps"), ("--activation=tanhh", "--activation"),
    ("--model=vgg", "--model"), ("--dataset=no_such_data", "--dataset"),
    ("--pgd_steps=-2", "--pgd_steps"), ("--objective=fgsm", "--objective"),
    ("--sparta_kernel_size=2", "--sparta_kernel_size"),
    ("--activation=relu --sparta_sharing=stage", "--sparta_sharing=stage is for"),
    ("--batch_size=64 --max_train=32", "--batch_size is larger than --max_train")]


def _refused(out, needle):
    assert out.returncode != 0, out.args
    assert needle in out.stderr and "Traceback" not in out.stderr, (out.args, out.stderr[-2000:])


def test_bad_flag_is_a_usage_error_without_traceback():
    """The first as a user runs it, in its own process; the others in one process (one
    TensorFlow import, not one each)."""
    flag, needle = BAD_FLAGS[0]
    _refused(_train(flag, "--model_dir=/nonexistent/never_written"), needle)
    cases = [[*flag.split(), "--model_dir=/nonexistent/never_written"] for flag, _ in BAD_FLAGS]
    for out, (_, needle) in zip(run_app_cases("train", cases), BAD_FLAGS):
        _refused(out, needle)


NOWHERE = "--model_dir=/nonexistent/never_written"
# (app, its command line, the flag that the error names): NaN, infinity, negative and
# absurd numbers, each refused at the flag. Every float flag refuses nan and inf.
HOSTILE_NUMBERS = [
    ("train", ["--seed=-1"], "--seed"), ("train", ["--seed=4294967296"], "--seed"),
    ("train", ["--width_multiplier=nan"], "--width_multiplier"),
    ("train", ["--width_multiplier=inf"], "--width_multiplier"),
    ("train", ["--width_multiplier=1000"], "--width_multiplier"),
    ("train", ["--eps=nan"], "--eps"), ("train", ["--eps=inf/1"], "--eps"),
    ("train", ["--pgd_step_size=0"], "--pgd_step_size"),
    ("train", ["--pgd_step_size=nan"], "--pgd_step_size"),
    ("train", ["--momentum=1e30"], "--momentum"), ("train", ["--momentum=1"], "--momentum"),
    ("train", ["--momentum=nan"], "--momentum"),
    ("train", ["--lr_decay_epochs=-5,1e30"], "--lr_decay_epochs"),
    ("train", ["--lr_decay_epochs=1e30"], "--lr_decay_epochs"),
    ("train", ["--lr_decay_epochs=nan"], "--lr_decay_epochs"),
    ("train", ["--lr_decay_epochs=4,2"], "--lr_decay_epochs"),
    ("train", ["--checkpoint_every=1e21"], "--checkpoint_every"),
    ("train", ["--checkpoint_every=" + "1" + "0" * 21], "--checkpoint_every"),
    ("train", ["--sparta_beta0=-1e30"], "--sparta_beta0"),
    ("train", ["--sparta_beta0=nan"], "--sparta_beta0"),
    ("train", ["--sparta_kernel_size=99"], "--sparta_kernel_size"),
    ("train", ["--lr=nan"], "--lr"), ("train", ["--lr=inf"], "--lr"),
    ("train", ["--lr=1e30"], "--lr"), ("train", ["--weight_decay=nan"], "--weight_decay"),
    ("train", ["--weight_decay=1e30"], "--weight_decay"),
    ("train", ["--sparta_lr_multiplier=inf"], "--sparta_lr_multiplier"),
    ("train", ["--trades_beta=nan"], "--trades_beta"),
    ("train", ["--trades_beta=1e30"], "--trades_beta"),
    ("train", ["--batch_size=1000000000"], "--batch_size"),
    ("train", ["--epochs=1000000000"], "--epochs"),
    ("train", ["--pgd_steps=1000000000"], "--pgd_steps"),
    ("train", ["--eval_pgd_steps=1000000000"], "--eval_pgd_steps"),
    ("train", ["--max_train=" + "9" * 20], "--max_train"),
    ("train", ["--max_test=0"], "--max_test"),
    ("train", ["--max_extract_gb=0"], "--max_extract_gb"),
    ("train", ["--max_extract_gb=nan"], "--max_extract_gb"),
    ("train", ["--max_extract_ratio=-1"], "--max_extract_ratio"),
    ("train", ["--max_extract_ratio=inf"], "--max_extract_ratio"),
    ("evaluate", ["--eps=nan"], "--eps"), ("evaluate", ["--seed=-1"], "--seed"),
    ("evaluate", ["--batch_size=1000000000"], "--batch_size"),
    ("evaluate", ["--eval_steps=20,1000000000"], "--eval_steps"),
    ("evaluate", ["--pgd_restarts=1000000000"], "--pgd_restarts"),
    ("evaluate", ["--autoattack_iterations=1000000000"], "--autoattack_iterations"),
    ("evaluate", ["--square_queries=" + "9" * 20], "--square_queries"),
    ("evaluate", ["--max_extract_ratio=nan"], "--max_extract_ratio"),
    ("compare", ["--seeds=0,4294967296"], "--seeds"), ("compare", ["--lr=nan"], "--lr"),
    ("compare", ["--eps_curve=0,nan"], "--eps_curve"),
    ("compare", ["--square_examples=" + "9" * 20], "--square_examples"),
    ("export", ["--version=" + "9" * 20], "--version"),
]
# The other arguments of each app; the last, which no app takes, ends a command line whose
# flags pass in one line of its own (it does not name the flag), instead of a run.
WHERE = {"train": [NOWHERE], "compare": [NOWHERE], "evaluate": ["--model_path=x.keras"],
         "export": ["--model_path=x.keras", "--export_dir=/nonexistent/never_written"]}
WHERE = {app: [*argv, "unexpected"] for app, argv in WHERE.items()}


def test_nan_infinite_negative_and_absurd_numbers_are_refused_at_their_flag():
    """Every case in one process, through each app's own flag parsing: exit status 1, one
    line naming the flag, no traceback, nothing run."""
    runs = run_apps([(app, [*argv, *WHERE[app]]) for app, argv, _ in HOSTILE_NUMBERS])
    for out, (app, argv, flag) in zip(runs, HOSTILE_NUMBERS):
        assert out.returncode == 1, (app, argv, out.stderr[-2000:])
        assert f"flag {flag}=" in out.stderr, (app, argv, out.stderr[-2000:])
        assert "Traceback" not in out.stderr and "Epoch" not in out.stdout, (app, argv)


def test_without_tensorflow_and_keras_backend_an_app_says_to_set_it(tmp_path):
    """On a machine with JAX but not TensorFlow, Keras's default backend cannot load: one
    line that says so and names KERAS_BACKEND=jax, for --help too."""
    env = without_tensorflow(tmp_path / "blocked")
    del env["KERAS_BACKEND"]
    env["KERAS_HOME"] = str(tmp_path / "keras_home")  # no keras.json that picks a backend
    os.makedirs(env["KERAS_HOME"])
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    for app, args in (("train", ["--help"]), ("evaluate", ["--model_path=x.keras"])):
        out = subprocess.run([sys.executable, "-m", f"trainers.{app}", *args], cwd=ROOT,
                             capture_output=True, text=True, timeout=120, env=env)
        assert out.returncode == 1, (app, out.stderr[-2000:])
        assert out.stderr.strip().count("\n") == 0 and "Traceback" not in out.stderr, \
            out.stderr[-2000:]
        assert out.stderr.startswith("error: Keras runs on TensorFlow here (KERAS_BACKEND is "
                                     "not set), and TensorFlow cannot be imported"), app
        assert "set KERAS_BACKEND=jax" in out.stderr, app


def test_paper_preset_on_tiny_data_and_overrides(tmp_path):
    out = _train("--config=paper", "--dataset=bundled", *TINY, "--eval_pgd_steps=1",
                 "--sparta_normalize_gate_input", f"--model_dir={tmp_path}")
    assert out.returncode == 0, out.stderr[-3000:]
    config = json.load(open(tmp_path / "config.json"))
    # From the preset:
    assert config["pgd_steps"] == 10 and config["lr_decay_epochs"] == [100.0, 105.0]
    assert abs(config["pgd_step_size"] - 2 / 255) < 1e-12 and config["batch_size"] == 128
    assert abs(config["eps"] - 8 / 255) < 1e-12 and config["weight_decay"] == 5e-4
    # From the command line, over the preset:
    assert config["dataset"] == "bundled" and config["epochs"] == 1
    assert config["width_multiplier"] == 0.0625 and config["sparta_normalize_gate_input"]
    assert os.path.exists(tmp_path / "export" / "1" / "saved_model.pb")
    assert "pgd1" in out.stdout and "exported" in out.stdout
    # No TensorFlow start-up noise: only the app's own output.
    for noise in ("oneDNN", "cuInit", "cuda drivers", "absl::InitializeLog", "I0000", "E0000"):
        assert noise not in out.stderr + out.stdout, noise


def test_other_configuration_in_model_dir_is_refused(tmp_path):
    first = _train(*TINY, "--objective=standard", "--eval_pgd_steps=1", f"--model_dir={tmp_path}")
    assert first.returncode == 0, first.stderr[-3000:]
    second = _train(*TINY, "--objective=pgd", f"--model_dir={tmp_path}")
    assert second.returncode != 0
    assert "objective: 'standard' in model_dir, 'pgd' now" in second.stderr
    assert "Traceback" not in second.stderr


def test_help_shows_the_usage_and_the_flags():
    console_script = os.path.join(os.path.dirname(sys.executable), "sparta-train")
    for out in [subprocess.run([console_script, "--help"], cwd=ROOT, capture_output=True,
                               text=True, timeout=120),
                *run_app_cases("train", [["--help"]])]:
        assert out.returncode == 0, out.stderr[-2000:]  # absl alone ends --help with 1
        assert "Adversarially train a network" in out.stdout and "Try --helpfull" in out.stdout
        for flag in ("--model_dir", "--activation", "--sparta_from", "--strategy", "--eps"):
            assert flag in out.stdout, flag


def test_the_preset_makes_the_config_without_changing_a_flag():
    code = ("import json, sys; from flags import core; core.define_training(); "
            "core.FLAGS(['x', '--config=paper', '--epochs=2']); c = core.train_config(); "
            "print(json.dumps([c.pgd_steps, c.epochs, c.width_multiplier, "
            "core.FLAGS.pgd_steps, core.FLAGS.epochs, core.FLAGS.width_multiplier]))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    # The config: the preset, then the flag given. The flags: as parsed, untouched.
    assert json.loads(out.stdout.splitlines()[-1]) == [10, 2, 1.0, 3, 2, 0.25]


def test_the_ends_of_each_range_are_taken_and_the_extraction_limits_reach_the_config():
    code = ("import json; from flags import core; core.define_training(); "
            "core.FLAGS(['x', '--seed=2147483647', '--momentum=0.999', '--sparta_kernel_size=15', "
            "'--lr_decay_epochs=0.5,100000', '--sparta_beta0=-100', '--width_multiplier=8', "
            "'--pgd_step_size=1/255', '--max_extract_gb=0.5', '--max_extract_ratio=1000']); "
            "c = core.train_config(); print(json.dumps([c.seed, c.momentum, "
            "c.sparta_kernel_size, c.lr_decay_epochs, c.sparta_beta0, c.width_multiplier, "
            "c.max_extract_gb, c.max_extract_ratio])); from sparta_tf import archive; "
            "d = core.config.TrainConfig(); print(json.dumps([d.max_extract_gb, "
            "d.max_extract_ratio] == [archive.MAX_EXTRACT_GB, archive.MAX_EXTRACT_RATIO]))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.splitlines()[-2]) == [
        2**31 - 1, 0.999, 15, [0.5, 100000.0], -100.0, 8.0, 0.5, 1000.0]
    assert json.loads(out.stdout.splitlines()[-1]), "TrainConfig's defaults are not archive's"


def test_the_extraction_limits_reach_the_archive_in_every_app_that_loads_data(tmp_path):
    """--max_extract_gb bounds the bundled archive's extraction (here, into a fresh
    --data_dir) in sparta-train and sparta-compare: refused in one line naming the flag,
    before anything is written in --model_dir. In one process."""
    limit = ["--dataset=bundled", f"--data_dir={tmp_path / 'cache'}", "--max_extract_gb=0.0001",
             f"--model_dir={tmp_path / 'run'}", *TINY]
    runs = run_apps([("train", limit),
                     ("compare", [*limit, "--seeds=0", "--activations=relu", "--autoattack=none"])])
    for out in runs:
        assert out.returncode == 1, (out.args, out.stderr[-2000:])
        assert out.stderr.startswith("error: Refusing archive ") and \
            "--max_extract_gb=0.0001" in out.stderr, (out.args, out.stderr[-2000:])
        assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr, out.args
    assert not (tmp_path / "run").exists()
