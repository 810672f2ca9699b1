"""Tests of trainers/train.py and flags/core.py, run as a user runs them."""

import json
import os
import subprocess
import sys

from conftest import run_app_cases

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--max_train=256", "--max_test=20", "--width_multiplier=0.0625", "--epochs=1"]


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
