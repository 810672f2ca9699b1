"""The model_dir of `sparta-train`: one layout, written by training, read by the rest.

    model_dir/
        config.json         the TrainConfig of the run, marked as sparta-train's
                            (config.WRITTEN_BY)
        checkpoints/        resumed from: `ckpt-N/` folders (state.npz, or on JAX
                            state.weights.h5 before it, and position.json;
                            sparta_tf.checkpoints), `ckpt-N_temp*` while one is saved;
                            the tf.train files of sparta-tf 0.1's TensorFlow trainer
                            (`checkpoint`, `ckpt-N.index`, `ckpt-N.data-*`) are refused
        metrics.jsonl       one row per epoch; logs/ holds the same for TensorBoard
        model.keras         the trained network (MODEL), written when training ends
        class_names.json    its class names in label order (CLASS_NAMES)
        results.json        clean and PGD accuracy on the test images
        eval.json, eval.md  sparta-evaluate's report; compare_eval.json, sparta-compare's
        export/VERSION/     the SavedModel for TF Serving (sparta_tf.export); export/ also
                            holds `.partial-*` folders while one is written, and the lock
                            of the exports (EXPORT_LOCK)
        .worker<i>/         a multi-worker job's other workers' share of the model's save
        .lock               held by the run that trains in it (`lock`)

What a reader trusts is never seen half-written: every file is written whole to a hidden
temporary file beside it, then renamed onto its name (`atomic_path`, `write_text`,
`write_json`), so a kill or a full disk leaves the old file or the new one, never a
truncated one. `keras_file(path)` finds the model of a model_dir or a `.keras` path, for
every reader (evaluation, transfer, export). --overwrite deletes a folder only if all in
it, at every depth, is of this layout, and its config.json is sparta-train's
(`check_deletable`). This module imports nothing else of `sparta_tf`.
"""

import contextlib
import errno
import fcntl
import json
import os
import re
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
EXPORT_LOCK = ".export.lock"  # in an export_dir: held while an export writes (sparta_tf.export)
PARTIAL = ".partial-"  # the prefix of a version being written in an export_dir
# The files that sparta-train and the apps reading a model_dir write at its top (the
# folders' content is in `_MODEL_DIR`, below).
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


def class_names_beside(model_path):
    """The class names that `sparta-train` wrote beside a model.keras (or in a model_dir).

    Returns: the list, or None where there is none.
    """
    folder = model_path if os.path.isdir(model_path) else os.path.dirname(model_path)
    path = os.path.join(folder, CLASS_NAMES)
    if not os.path.isfile(path):
        return None
    return read_json(path)


def versions(export_dir):
    """The complete numbered versions of a SavedModel under `export_dir` (with a
    saved_model.pb), ascending (none if it does not exist)."""
    if not os.path.isdir(export_dir):
        return []
    return sorted(int(d) for d in os.listdir(export_dir)
                  if d.isdigit() and os.path.isfile(os.path.join(export_dir, d, "saved_model.pb")))


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


# What --overwrite may delete: for each folder, (pattern of a name, what it must be) in
# order, the first that fits counts. FILE: a file; ANY: a file or a folder of anything (what
# an unfinished write left); a list: a folder holding only what that list allows. A hidden
# temporary file of `atomic_path` may be in any of them; a link is never of the layout.
FILE, ANY = "file", "any"
_SAVED_MODEL = [(r"saved_model\.pb|fingerprint\.pb", FILE),
                (r"variables", [(r"variables\.(index|data-\d+-of-\d+)", FILE)]),
                (r"assets", []), (r"assets\.extra", [(r"sparta_tf\.json", FILE)])]
_CHECKPOINTS = [(r"checkpoint|checkpoint\.tmp[0-9a-f]+", FILE),  # TensorFlow's
                (r"ckpt-\d+\.(index|data-\d+-of-\d+)", FILE),
                (r"ckpt-\d+", [(r"state\.(npz|weights\.h5)|position\.json", FILE)]),  # JAX's
                (r"ckpt-\d+_temp.*", ANY)]  # a save that did not finish
_LOGS = [(r"events\.out\.tfevents\..+", FILE)]
_LOGS.append((r"[^.].*", _LOGS))  # TensorBoard's subfolders, of event files too
_EXPORT = [(r"\d+", _SAVED_MODEL), (re.escape(PARTIAL) + ".*", ANY),
           (re.escape(EXPORT_LOCK), FILE)]
_MODEL_DIR = [(r"\.worker\d+", [(re.escape(CHECKPOINTS), _CHECKPOINTS),
                                (re.escape(MODEL), FILE)]),
              (re.escape(CHECKPOINTS), _CHECKPOINTS), (re.escape(LOGS), _LOGS),
              (re.escape(EXPORT), _EXPORT),
              *((re.escape(name), FILE) for name in sorted(KNOWN - {CHECKPOINTS, LOGS, EXPORT}))]


def _foreign(folder, allowed):
    """The path (relative to `folder`) of the first thing in it that `allowed` does not
    let it hold, at any depth; None if there is none."""
    for name in sorted(os.listdir(folder)):
        full = os.path.join(folder, name)
        if os.path.islink(full):
            return name
        for pattern, kind in allowed:
            fits = kind == ANY or (os.path.isfile(full) if kind == FILE else os.path.isdir(full))
            if not (fits and re.fullmatch(pattern, name)):
                continue
            inside = _foreign(full, kind) if isinstance(kind, list) else None
            if inside is not None:
                return os.path.join(name, inside)
            break
        else:
            if not (is_temporary(name) and os.path.isfile(full)):
                return name + ("/" if os.path.isdir(full) else "")
    return None


def check_deletable(path, read_config):
    """Raises unless `path` is a model_dir of sparta-train that --overwrite may delete.

    A model_dir holds a config.json that `read_config(path/config.json)` reads without an
    error (sparta-train's), and nothing but the layout above, at every depth. An empty
    folder or a missing one passes too, and so does one that holds only the lock and
    temporary files (a run that stopped before config.json).

    Raises:
        NotAModelDirError: naming what in `path` is not of a model_dir, or why its
            config.json is not sparta-train's.
    """
    if not os.path.exists(path):
        return
    if not os.path.isdir(path):
        raise NotAModelDirError(f"--overwrite: {path} is a file, not a model_dir; it is "
                                "not deleted.")
    entries = sorted(os.listdir(path))
    # The lock comes first (`lock` creates it), so a folder with only it counts as empty.
    held = [e for e in entries if e != LOCK and not is_temporary(e)]
    try:
        foreign = _foreign(path, _MODEL_DIR)
        if foreign is not None:
            raise ValueError(f"it holds {foreign}, which sparta-train does not write.")
        if held and CONFIG not in entries:
            raise ValueError(f"it has no {CONFIG}, and holds "
                             + ", ".join(held[:5]) + " ..." * (len(held) > 5) + ".")
        if held:
            read_config(os.path.join(path, CONFIG))
    except (OSError, ValueError) as e:
        raise NotAModelDirError(
            f"--overwrite deletes only a model_dir of sparta-train, and {path} is not one: "
            f"{e} Nothing was deleted; choose another --model_dir, or move it away.") from None


def clear(path, read_config):
    """Deletes what a model_dir holds, except its lock (`check_deletable` first)."""
    check_deletable(path, read_config)
    for entry in os.listdir(path):
        if entry == LOCK:
            continue
        full = os.path.join(path, entry)
        if os.path.isdir(full) and not os.path.islink(full):
            shutil.rmtree(full)
        else:
            os.remove(full)


def try_flock(fd):
    """Takes an exclusive `flock` on the open file `fd` without waiting: True, or False
    where another process holds it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as e:
        if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            raise
        return False


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
    # Not through a link: the lock's file is truncated and written.
    fd = os.open(os.path.join(path, LOCK), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    try:
        if not try_flock(fd):
            holder = os.pread(fd, 256, 0).decode(errors="replace").strip() or "unknown"
            raise LockedError(
                f"{path} is in use by another run (process {holder}). Wait for it to end, "
                "or use another --model_dir.") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} on {os.uname().nodename}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the flock
