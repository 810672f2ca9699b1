"""The model_dir of `sparta-train`: one layout, written by training, read by the rest.

    model_dir/
        config.json         the TrainConfig of the run (training.TrainConfig)
        checkpoints/        tf.train checkpoints, resumed from
        metrics.jsonl       one row per epoch; logs/ holds the same for TensorBoard
        model.keras         the trained network (MODEL), written when training ends
        class_names.json    its class names in label order (CLASS_NAMES)
        results.json        clean and PGD accuracy on the test images
        export/VERSION/     the SavedModel for TF Serving (sparta_tf.export)
        .lock               held by the run that trains in it (`lock`)

What a reader trusts is never seen half-written: every file is written whole to a hidden
temporary file beside it, then renamed onto its name (`atomic_path`, `write_text`,
`write_json`), so a kill or a full disk leaves the old file or the new one, never a
truncated one. `keras_file(path)` finds the model of a model_dir or a `.keras` path, for
every reader (evaluation, transfer, export). This module imports nothing else of
`sparta_tf`.
"""

import contextlib
import errno
import fcntl
import json
import os
import shutil
import tempfile

CONFIG = "config.json"
CHECKPOINTS = "checkpoints"
LOGS = "logs"
MODEL = "model.keras"
METRICS_FILE = "metrics.jsonl"
CLASS_NAMES = "class_names.json"
RESULTS = "results.json"
EXPORT = "export"
LOCK = ".lock"
# Everything that sparta-train and the apps reading a model_dir write into one: what
# --overwrite may delete. `.worker<i>` folders are a multi-worker job's, hidden temporary
# files (`.<name>.tmp-*`) those of `atomic_path`.
KNOWN = frozenset({CONFIG, CHECKPOINTS, LOGS, MODEL, METRICS_FILE, CLASS_NAMES, RESULTS,
                   EXPORT, LOCK, "eval.json", "eval.md", "compare_eval.json"})
_TMP = ".tmp-"


class LockedError(RuntimeError):
    """Another process is running in this model_dir."""


class NotAModelDirError(ValueError):
    """A folder that --overwrite was asked to delete is not a model_dir of sparta-train."""


def keras_file(path):
    """The `.keras` file of `path`: a model_dir's model.keras, or `path` itself.

    Raises:
        FileNotFoundError: `path` is neither a `.keras` file nor a folder holding one.
    """
    path = os.fspath(path)
    file = os.path.join(path, MODEL) if os.path.isdir(path) else path
    if not (file.endswith(".keras") and os.path.isfile(file)):
        raise FileNotFoundError(
            f"No model at {path!r}: expected a .keras file or a model_dir of sparta-train "
            f"that holds {MODEL} (written when its training has finished).")
    return file


def current_umask():
    """The process's umask (read without changing it for longer than a call)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path):
    """Yields a temporary path beside `path` to write; renames it onto `path` at the end.

    The temporary file is hidden (`.<name>.tmp-XXXX<ext>`, with `path`'s extension, which
    Keras's `save` needs), gets the mode a new file would get, and is flushed to disk
    before the rename. If the block raises, the temporary file is removed and `path` is
    left as it was.
    """
    path = os.fspath(path)
    folder, name = os.path.split(os.path.abspath(path))
    ext = os.path.splitext(name)[1]
    fd, tmp = tempfile.mkstemp(prefix=f".{name}{_TMP}", suffix=ext, dir=folder)
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp's 0600 would hide it from a server
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def write_text(path, text):
    """Writes `text` to `path` atomically (`atomic_path`)."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)


def write_json(path, value):
    """Writes `value` as indented JSON to `path` atomically (`atomic_path`)."""
    write_text(path, json.dumps(value, indent=2) + "\n")


def read_json(path):
    """The JSON value in `path`.

    Raises:
        ValueError: the file is not valid JSON; the message names it.
    """
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}).") from None


def is_temporary(name):
    """Whether `name` is a temporary file of `atomic_path` (left by a kill)."""
    return name.startswith(".") and _TMP in name


def check_deletable(path):
    """Raises unless `path` is a model_dir of sparta-train that --overwrite may delete.

    A model_dir holds a config.json and nothing but the names of `KNOWN` (with `.worker<i>`
    folders and temporary files). An empty folder or a missing one passes too, and so does
    one that holds only the lock and temporary files (a run that stopped before config.json).

    Raises:
        NotAModelDirError: naming what in `path` is not of a model_dir.
    """
    if not os.path.exists(path):
        return
    if not os.path.isdir(path):
        raise NotAModelDirError(f"--overwrite: {path} is a file, not a model_dir; it is "
                                "not deleted.")
    entries = sorted(os.listdir(path))
    foreign = [e for e in entries if e not in KNOWN and not is_temporary(e)
               and not e.startswith(".worker")]
    # The lock comes first (`lock` creates it), so a folder with only it counts as empty.
    held = [e for e in entries if e != LOCK and not is_temporary(e)]
    if foreign or (held and CONFIG not in entries):
        shown = ", ".join(foreign[:5] or entries[:5]) + (" ..." if len(entries) > 5 else "")
        raise NotAModelDirError(
            f"--overwrite deletes only a model_dir of sparta-train, and {path} is not one "
            f"({'it holds ' + shown if foreign else 'it has no ' + CONFIG + ': ' + shown}). "
            "Nothing was deleted; choose another --model_dir, or move those files away.")


def clear(path):
    """Deletes what a model_dir holds, except its lock (`check_deletable` first)."""
    check_deletable(path)
    for entry in os.listdir(path):
        if entry == LOCK:
            continue
        full = os.path.join(path, entry)
        if os.path.isdir(full) and not os.path.islink(full):
            shutil.rmtree(full)
        else:
            os.remove(full)


@contextlib.contextmanager
def lock(path):
    """Holds model_dir `path` for this process while the block runs (creating the folder).

    An exclusive `flock` on `path/.lock`, which holds the holder's process id and host. The
    kernel releases the lock when its process dies, however it dies, so a lock left by a
    kill is taken over by the next run; the file itself stays.

    Raises:
        LockedError: another live process holds it; the message names its process id.
    """
    os.makedirs(path, exist_ok=True)
    fd = os.open(os.path.join(path, LOCK), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            holder = os.pread(fd, 256, 0).decode(errors="replace").strip() or "unknown"
            raise LockedError(
                f"{path} is in use by another run (process {holder}). Wait for it to end, "
                "or use another --model_dir.") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} on {os.uname().nodename}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the flock
