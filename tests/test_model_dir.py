"""Tests of sparta_tf.model_dir: atomic writes, the lock, what --overwrite may delete."""

import json
import os
import resource
import signal
import stat
import subprocess
import sys
import textwrap

import pytest

from sparta_tf import model_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
        model_dir.clear(users)
    assert (users / "chapter1.tex").read_text() == "years of work"


def test_overwrite_refuses_a_model_dir_holding_a_users_file(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_text("{}")
    (run / "notes.txt").write_text("mine")
    with pytest.raises(model_dir.NotAModelDirError, match="notes.txt"):
        model_dir.clear(run)
    assert (run / "notes.txt").exists() and (run / "checkpoints").exists()


def test_clear_empties_a_model_dir_but_keeps_its_lock(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    for name in ("config.json", "model.keras", ".lock", ".model.keras.tmp-x1.keras"):
        (run / name).write_text("x")
    model_dir.clear(run)
    assert os.listdir(run) == [".lock"]


def test_a_file_is_not_a_model_dir(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(model_dir.NotAModelDirError, match="is a file"):
        model_dir.check_deletable(tmp_path / "f")


def test_overwrite_of_a_new_model_dir_passes_its_own_lock(tmp_path):
    # The lock is taken before --overwrite clears: a model_dir that does not exist yet holds
    # only the lock by then, and must not be refused for lacking a config.json.
    run = tmp_path / "new_run"
    with model_dir.lock(str(run)):
        model_dir.clear(str(run))
        assert os.listdir(run) == [".lock"]
    (run / "checkpoints").mkdir()  # anything else without a config.json is still refused
    with pytest.raises(model_dir.NotAModelDirError, match="config.json"):
        model_dir.clear(str(run))
