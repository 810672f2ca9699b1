"""Tests of sparta_tf.model_dir and the model_dir part of sparta_tf.training: atomic writes,
the lock, what --overwrite may delete, config.json's mark, metrics.jsonl."""

import errno
import glob
import json
import os
import re
import resource
import signal
import stat
import subprocess
import sys
import textwrap

import pytest

from conftest import run_app_cases
from sparta_tf import config as config_module
from sparta_tf import callbacks, model_dir, training

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
READ = training._stored_config  # what sparta-train passes to check_deletable and clear


def _leftovers(folder):
    return [n for n in os.listdir(folder) if model_dir.is_temporary(n)]


def test_a_write_that_fails_leaves_the_old_file_whole(tmp_path):
    """A re-save over the file-size limit (EFBIG) must not replace a good file with part
    of a new one, as an in-place write did."""
    path = tmp_path / "results.json"
    model_dir.write_json(path, {"good": 1})
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG, not a kill
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
    try:
        with pytest.raises(OSError):
            model_dir.write_text(path, "x" * 100_000)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
    assert json.loads(path.read_text()) == {"good": 1}
    assert _leftovers(tmp_path) == []


def test_an_exception_inside_atomic_path_keeps_the_old_file(tmp_path):
    path = tmp_path / "model.keras"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with model_dir.atomic_path(path) as tmp:
            assert tmp.endswith(".keras") and os.path.dirname(tmp) == str(tmp_path)
            with open(tmp, "wb") as f:
                f.write(b"half")
            raise RuntimeError("killed mid-save")
    assert path.read_bytes() == b"old"
    assert _leftovers(tmp_path) == []


def test_an_atomic_file_gets_the_mode_of_a_new_file(tmp_path):
    old = os.umask(0o022)
    try:
        model_dir.write_text(tmp_path / "a.json", "{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "a.json").st_mode) == 0o644  # not mkstemp's 0600


def test_read_json_names_a_corrupt_file(tmp_path):
    (tmp_path / "config.json").write_text('{"epochs": 3,')
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        model_dir.read_json(tmp_path / "config.json")


_HOLDER = textwrap.dedent("""
    import sys, time
    from sparta_tf import model_dir
    with model_dir.lock(sys.argv[1]):
        print("locked", flush=True)
        time.sleep(600)
""")


def test_a_second_run_is_refused_with_the_holders_pid_and_a_stale_lock_is_taken(tmp_path):
    folder = str(tmp_path / "run")
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, folder], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(model_dir.LockedError, match=f"process {holder.pid} on"):
            with model_dir.lock(folder):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)  # dies holding it: the lock file stays behind
        holder.wait()
    assert os.path.exists(os.path.join(folder, model_dir.LOCK))
    with model_dir.lock(folder):  # taken over
        with open(os.path.join(folder, model_dir.LOCK)) as f:
            assert f.read().startswith(f"{os.getpid()} on")


def test_overwrite_refuses_a_folder_that_is_not_a_model_dir(tmp_path):
    users = tmp_path / "thesis"
    users.mkdir()
    (users / "chapter1.tex").write_text("years of work")
    with pytest.raises(model_dir.NotAModelDirError, match="chapter1.tex"):
        model_dir.clear(users, READ)
    assert (users / "chapter1.tex").read_text() == "years of work"


def test_overwrite_refuses_a_model_dir_holding_a_users_file(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    _write_config(run)
    (run / "notes.txt").write_text("mine")
    with pytest.raises(model_dir.NotAModelDirError, match="notes.txt"):
        model_dir.clear(run, READ)
    assert (run / "notes.txt").exists() and (run / "checkpoints").exists()


def test_clear_empties_a_model_dir_but_keeps_its_lock(tmp_path):
    run = tmp_path / "run"
    _write_config(run)
    (run / "checkpoints").mkdir(parents=True)
    for name in ("model.keras", ".lock", ".model.keras.tmp-x1.keras"):
        (run / name).write_text("x")
    model_dir.clear(run, READ)
    assert os.listdir(run) == [".lock"]


def test_a_file_is_not_a_model_dir(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(model_dir.NotAModelDirError, match="is a file"):
        model_dir.check_deletable(tmp_path / "f", READ)


def test_overwrite_of_a_new_model_dir_passes_its_own_lock(tmp_path):
    # The lock is taken before --overwrite clears: a model_dir that does not exist yet holds
    # only the lock by then, and must not be refused for lacking a config.json.
    run = tmp_path / "new_run"
    with model_dir.lock(str(run)):
        model_dir.clear(str(run), READ)
        assert os.listdir(run) == [".lock"]
    (run / "checkpoints").mkdir()  # anything else without a config.json is still refused
    with pytest.raises(model_dir.NotAModelDirError, match="config.json"):
        model_dir.clear(str(run), READ)


def _config(folder, **overrides):
    values = dict(model_dir=str(folder), max_train=64, max_test=8, width_multiplier=0.0625,
                  epochs=1, batch_size=32, pgd_steps=1, eval_pgd_steps=0)
    return training.TrainConfig(**{**values, **overrides})


def _write_config(folder, **overrides):
    """Writes folder/config.json as sparta-train does."""
    training.prepare_model_dir(_config(folder, **overrides), overwrite=False)


def _snapshot(folder):
    """Every path under `folder` with its content (None for a folder)."""
    found = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            full = os.path.join(root, name)
            found[os.path.relpath(full, folder)] = None if os.path.isdir(full) else \
                open(full, "rb").read()
    return found


# Every name that sparta-train and its apps write into a model_dir, on TensorFlow and on
# JAX, and what a kill while writing leaves.
LAYOUT = [
    "checkpoints/checkpoint", "checkpoints/checkpoint.tmp0123456789abcdef",
    "checkpoints/ckpt-3.index", "checkpoints/ckpt-3.data-00000-of-00001",
    "checkpoints/ckpt-4_temp/part-00000-of-00001.index",
    "checkpoints/ckpt-2/state.npz", "checkpoints/ckpt-2/position.json",
    "checkpoints/ckpt-1/state.weights.h5", "checkpoints/ckpt-1/position.json",  # of before
    "checkpoints/ckpt-3/state.npz", "checkpoints/ckpt-3/position.json",
    "checkpoints/ckpt-5_temp-x1y2/state.weights.h5",
    "logs/events.out.tfevents.1796554890.vm.4619.0.v2",
    "logs/train/events.out.tfevents.1796554890.vm.4619.1.v2",
    "export/1/saved_model.pb", "export/1/fingerprint.pb", "export/1/variables/variables.index",
    "export/1/variables/variables.data-00000-of-00001", "export/1/assets.extra/sparta_tf.json",
    "export/.partial-2-abc123/saved_model.pb", "export/.export.lock",
    ".worker1/checkpoints/ckpt-1.index", ".worker1/model.keras",
    "model.keras", ".model.keras.tmp-x1y2.keras", "metrics.jsonl", "class_names.json",
    "results.json", "eval.json", "eval.md", "compare_eval.json", ".lock"]


def _layout(run):
    _write_config(run)
    for name in LAYOUT:
        os.makedirs(os.path.dirname(run / name), exist_ok=True)
        (run / name).write_bytes(b"x")
    (run / "export" / "1" / "assets").mkdir()


def test_overwrite_deletes_every_name_of_the_layout_on_both_backends(tmp_path):
    run = tmp_path / "run"
    _layout(run)
    model_dir.clear(run, READ)
    assert os.listdir(run) == [".lock"]


@pytest.mark.parametrize("foreign", [
    "notes.txt", "checkpoints/notes.txt", "checkpoints/ckpt-2/mine.csv", "logs/train/plot.png",
    "logs/.hidden/events.out.tfevents.1", "export/1/README", "export/latest/saved_model.pb",
    ".worker1/data.csv", ".ipynb_checkpoints/a.ipynb", "model.keras/inside"])
def test_overwrite_refuses_a_foreign_file_at_any_depth_and_deletes_nothing(tmp_path, foreign):
    run = tmp_path / "run"
    _layout(run)
    if foreign == "model.keras/inside":  # a folder where sparta-train writes a file
        (run / "model.keras").unlink()
    os.makedirs(os.path.dirname(run / foreign), exist_ok=True)
    (run / foreign).write_text("mine")
    before = _snapshot(run)
    with pytest.raises(model_dir.NotAModelDirError, match=r"is not one: it holds "
                       + re.escape(foreign.split("/")[0])):
        model_dir.clear(run, READ)
    assert _snapshot(run) == before


def test_overwrite_refuses_a_link_and_leaves_its_target(tmp_path):
    run, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    _write_config(run)
    elsewhere.mkdir()
    (elsewhere / "checkpoint").write_text("theirs")
    os.symlink(elsewhere, run / "checkpoints")
    with pytest.raises(model_dir.NotAModelDirError, match="it holds checkpoints, which"):
        model_dir.clear(run, READ)
    assert (elsewhere / "checkpoint").read_text() == "theirs"


def _another_tools_run(folder, config):
    """A run of another trainer, as the issue found it: its config.json, checkpoints/,
    logs/ and metrics.jsonl."""
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "logs").mkdir()
    (folder / "checkpoints" / "checkpoint").write_text("theirs")
    (folder / "logs" / "events.out.tfevents.1.host.2.0.v2").write_text("theirs")
    (folder / "metrics.jsonl").write_text('{"epoch": 1, "loss": 0.5}\n')
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("theirs, reason", [
    ({"epochs": 30, "lr": 0.01, "optimizer": "adam"}, "it holds 'optimizer', which is no "
                                                      "setting of sparta-train"),
    ({"epochs": 30, "lr": 0.01}, "it has no \"written_by\": \"sparta-train\", and no "
                                 "'model_dir', 'dataset', 'data_dir' ... either"),
    ({"written_by": "other-trainer", "epochs": 30}, "it says it was written by "
                                                    "'other-trainer'")])
def test_another_tools_run_is_neither_overwritten_nor_described_with_defaults(
        tmp_path, theirs, reason):
    run = tmp_path / "theirs"
    _another_tools_run(run, theirs)
    before = _snapshot(run)
    with pytest.raises(model_dir.NotAModelDirError, match=re.escape(
            f"{run} is not one: {run / 'config.json'} is not a config.json of sparta-train: "
            f"{reason}")):
        with training.holding(_config(run), overwrite=True):
            pass
    with pytest.raises(model_dir.NotAModelDirError):
        training.prepare_model_dir(_config(run), overwrite=True)
    with pytest.raises(training.ConfigMismatchError) as refused:  # resuming
        training.prepare_model_dir(_config(run), overwrite=False)
    message = str(refused.value)
    assert reason in message and "Use another --model_dir, or move" in message
    assert "another configuration" not in message and " in model_dir" not in message
    assert "--overwrite" not in message  # it would be refused
    assert _snapshot(run) == before
    assert not training.finished(_config(run))


@pytest.mark.parametrize("field, value, reason", [
    ("dataset", None, "its 'dataset' is null, not a string."),
    ("lr", "fast", "its 'lr' is \"fast\", not a number."),
    ("epochs", 2.5, "its 'epochs' is 2.5, not an integer."),
    ("jit_compile", 1, "its 'jit_compile' is 1, not true or false."),
    ("max_train", True, "its 'max_train' is true, not an integer or null."),
    ("config_format", 99, "its config_format is 99; this sparta-tf reads 1")])
def test_a_field_of_the_wrong_type_in_config_json_is_one_error(tmp_path, field, value, reason):
    run = tmp_path / "run"
    _write_config(run)
    stored = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**stored, field: value}))
    with pytest.raises(training.ConfigMismatchError, match=re.escape(
            f"{run / 'config.json'} is not a config.json of sparta-train: {reason}")):
        training.prepare_model_dir(_config(run), overwrite=False)
    with pytest.raises(model_dir.NotAModelDirError, match=re.escape(reason)):
        training.prepare_model_dir(_config(run), overwrite=True)
    assert (run / "config.json").exists()


def test_config_json_is_marked_and_an_unmarked_one_of_before_still_resumes(tmp_path):
    run = tmp_path / "run"
    _write_config(run)
    stored = json.loads((run / "config.json").read_text())
    assert {k: stored[k] for k in config_module.WRITTEN_BY} == config_module.WRITTEN_BY
    assert "written_by" not in _config(run).identity()
    # As the first sparta-train wrote it: no mark, only the first fields.
    old = {k: v for k, v in stored.items() if k in config_module.FIRST_FIELDS}
    (run / "config.json").write_text(json.dumps(old))
    assert training.prepare_model_dir(_config(run), overwrite=False)  # resumes
    assert json.loads((run / "config.json").read_text())["written_by"] == "sparta-train"
    (run / "config.json").write_text(json.dumps(old))
    (run / "metrics.jsonl").write_text("")
    model_dir.clear(run, READ)  # --overwrite takes it: a whole config.json of sparta-train
    assert os.listdir(run) == []
    # Every model_dir of results/ was written before the mark, and is one of sparta-train.
    found = glob.glob(os.path.join(ROOT, "results", "**", "config.json"), recursive=True)
    assert len(found) > 100
    for path in found:
        READ(path)
    # One that lacks a field of the first config.json is not.
    del old["pgd_steps"]
    (run / "config.json").write_text(json.dumps(old))
    with pytest.raises(model_dir.NotAModelDirError, match="and no 'pgd_steps' either"):
        model_dir.clear(run, READ)


def test_a_model_dir_that_cannot_be_written_is_one_error(tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    run.chmod(0o555)
    if os.geteuid() == 0:  # root writes anyway: refuse what the kernel refuses a user
        real = os.open

        def read_only(path, flags, *args, **kwargs):
            if flags & os.O_CREAT and os.path.dirname(os.fspath(path)) == str(run):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
            return real(path, flags, *args, **kwargs)
        monkeypatch.setattr(os, "open", read_only)
    try:
        with pytest.raises(training.WriteError, match=re.escape(
                f"--model_dir={run} cannot be written ([Errno 13] Permission denied: "
                f"'{run / '.lock'}')")):
            with training.holding(_config(run), overwrite=False):
                pytest.fail("held a folder it cannot write")
    finally:
        run.chmod(0o755)


def test_a_lock_that_is_a_link_is_refused_and_its_target_kept(tmp_path):
    run, target = tmp_path / "run", tmp_path / "thesis.tex"
    run.mkdir()
    target.write_text("years of work")
    (run / ".lock").symlink_to(target)  # the lock's file is truncated and written
    with pytest.raises(training.WriteError, match=re.escape(
            f"--model_dir={run} cannot be written ([Errno {errno.ELOOP}]")):
        with training.holding(_config(run), overwrite=False):
            pytest.fail("held a lock through a link")
    assert target.read_text() == "years of work"


def test_a_damaged_line_of_metrics_jsonl_is_dropped_with_a_warning(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"epoch": 1, "loss": 2.0}\ngarbage\n[1, 2]\n{"loss": 1}\n\xff\xfe\n'
                     b'{"epoch": "1"}\n{"epoch": 2, "loss": 9.0}\n{"epo')
    callbacks.log_epoch(str(tmp_path), {"epoch": 2, "loss": 1.5})
    assert [json.loads(line) for line in path.read_text().splitlines()] == [
        {"epoch": 1, "loss": 2.0}, {"epoch": 2, "loss": 1.5}]
    out = capsys.readouterr().out
    for number in (2, 3, 4, 5, 6, 8):
        assert f"Warning: line {number} of {path} is not a row of metrics" in out, out
    assert "line 7" not in out  # a row of a later epoch is dropped without a word
    assert "('garbage'); it is dropped." in out
    callbacks.log_epoch(str(tmp_path), {"epoch": 3, "loss": 1.0})  # the next epoch: clean
    assert [json.loads(line)["epoch"] for line in path.read_text().splitlines()] == [1, 2, 3]
    assert capsys.readouterr().out == ""


def test_the_app_refuses_another_tools_run_and_a_null_dataset_in_one_line(tmp_path):
    theirs, nulled = tmp_path / "theirs", tmp_path / "nulled"
    _another_tools_run(theirs, {"epochs": 30, "lr": 0.01})
    _write_config(nulled)
    stored = json.loads((nulled / "config.json").read_text())
    (nulled / "config.json").write_text(json.dumps({**stored, "dataset": None}))
    before = _snapshot(theirs), _snapshot(nulled)
    tiny = ["--max_train=64", "--max_test=8", "--width_multiplier=0.0625", "--epochs=1",
            "--batch_size=32", "--pgd_steps=1", "--eval_pgd_steps=0"]
    overwritten, resumed = run_app_cases("train", [
        [*tiny, f"--model_dir={theirs}", "--overwrite"], [*tiny, f"--model_dir={nulled}"]])
    for out, needle in ((overwritten, "--overwrite deletes only a model_dir of sparta-train"),
                        (resumed, "its 'dataset' is null, not a string")):
        assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
        (line,) = out.stderr.strip().splitlines()
        assert line.startswith("error: ") and needle in line, line
    nulled_after = {k: v for k, v in _snapshot(nulled).items() if k != ".lock"}  # its lock
    assert (_snapshot(theirs), nulled_after) == before
