"""Safe extraction of a `.tar.gz` of an image folder, once, into a cache that only its
owner writes.

Where. The cache is per user, as Keras's and TFDS's are: `$XDG_CACHE_HOME/sparta_tf/
extracted` (`~/.cache/sparta_tf/extracted` without it), or `<data_dir>/sparta_tf_extracted`
when a data_dir is given. Its folders are created with mode 0700 and checked before each
use, with `lstat` (a link is not followed): a folder owned by this user that no group or
other user can write to. A symbolic link, a folder of another user or one others can write
to is refused in one line, never read or written through. The world-shared
`$TMPDIR/sparta_tf_extracted` of earlier versions is never read.

What. One entry per archive content, `<name>-<sha256 of the archive>`: the archive is read
whole (and hashed) on every use, so a changed archive gets a new entry, and no one can
guess an entry's name before the archive exists. An entry holds `files/` (the archive's
files) and `manifest.json` (the size and modification time of every file, and every
folder, written last). On reuse, the entry is checked against its manifest: an entry that
has no manifest or differs from it (a file deleted, added, resized or rewritten, a link
where a file was) is extracted again into a fresh folder, which then replaces it. The
manifest holds no hash of each file's content: hashing would read the whole dataset on
every load (CIFAR-10: 60,000 files), and the owner and mode checks already keep other users
out; what is left to catch is a cache damaged by accident (a deletion, a truncation, a
killed clean-up), which the sizes and times catch for one `lstat` a file.

Safety. The archive may hold only files and folders below its top (no links, devices,
absolute names or `..`), each file created anew, never through an existing path. Its
expanded size is bounded: `max_bytes` (default `MAX_EXTRACT_GB` GB) and `max_ratio` times
the archive's size (default `MAX_EXTRACT_RATIO`), counting 512 bytes a member (its tar
header) plus its file's bytes, checked against each member's header before its bytes are
written and counted again as they are written. It is extracted into a temporary folder
that is renamed into place only when complete, under the cache's lock (`.lock`); on any
failure the folder is removed, so a refused, truncated, corrupt, oversized or changed
archive, or a full disk, leaves nothing behind. The next extraction removes what a killed
one left.

This module imports nothing of `sparta_tf` but `image_folder` (for `BadDataError`).
"""

import contextlib
import fcntl
import gzip
import hashlib
import json
import os
import re
import shutil
import stat
import tarfile
import tempfile
import zlib

from sparta_tf.image_folder import BadDataError

MAX_EXTRACT_GB = 16.0  # default cap on an archive's expanded size, in GB (10**9 bytes)
MAX_EXTRACT_RATIO = 100.0  # default cap on an archive's expanded size / its own size
GB = 10**9
_MEMBER_HEADER = 512  # bytes counted for each member, besides its file's bytes
_MANIFEST = "manifest.json"
_FILES = "files"
_LOCK = ".lock"
_LEFTOVERS = (".partial-", ".stale-")  # prefixes of what a killed extraction leaves
_BAD_ARCHIVE = (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile)


def cache_root(data_dir=None):
    """The cache folder of this user (see the module docstring), created if need be, and
    every folder of it that sparta_tf creates checked (`_check_own_folder`).

    Raises:
      BadDataError: a cache folder cannot be created, is a symbolic link or not a folder,
        is owned by another user, or can be written by the group or others.
    """
    if data_dir is not None:
        base, parts = os.fspath(data_dir), ["sparta_tf_extracted"]
    else:
        base = os.environ.get("XDG_CACHE_HOME", "")
        if not os.path.isabs(base):  # unset, or relative: the XDG spec says to ignore it
            base = os.path.join(os.path.expanduser("~"), ".cache")
        parts = ["sparta_tf", "extracted"]
    folder = base
    try:
        os.makedirs(base, 0o700, exist_ok=True)
        for part in parts:
            folder = os.path.join(folder, part)
            with contextlib.suppress(FileExistsError):
                os.mkdir(folder, 0o700)
            _check_own_folder(folder)
    except OSError as e:
        raise BadDataError(f"Cannot create the cache folder {folder}: {e.strerror or e}; "
                           "pass another --data_dir.") from None
    return folder


def _check_own_folder(path):
    """Check with `lstat` that `path` is a folder of this user that no one else can write to.

    Raises:
      BadDataError: it is a symbolic link or not a folder, is owned by another user, or its
        mode lets the group or others write to it.
    """
    st = os.lstat(path)
    refuse = f"Refusing the cache folder {path}:"
    if stat.S_ISLNK(st.st_mode):
        raise BadDataError(f"{refuse} it is a symbolic link, and nothing is extracted "
                           "through one; remove the link, or pass another --data_dir.")
    if not stat.S_ISDIR(st.st_mode):
        raise BadDataError(f"{refuse} it is not a folder; remove it, or pass another "
                           "--data_dir.")
    if st.st_uid != os.geteuid():
        raise BadDataError(f"{refuse} it belongs to user id {st.st_uid}, not to you "
                           f"({os.geteuid()}), who could change what it holds; remove it, "
                           "or pass another --data_dir.")
    if st.st_mode & 0o022:
        raise BadDataError(f"{refuse} its mode {stat.S_IMODE(st.st_mode):04o} lets other "
                           "users write to it; run `chmod go-w` on it, or pass another "
                           "--data_dir.")


def extract(path, data_dir=None, max_bytes=MAX_EXTRACT_GB * GB, max_ratio=MAX_EXTRACT_RATIO):
    """Extract the archive `path` once into the cache, and return the folder of its files.

    The entry is found by the archive's sha256; a valid entry (it matches its manifest) is
    reused, anything else is extracted anew (see the module docstring).

    Args:
      path: the `.tar.gz` (or `.tgz`) of an image folder.
      data_dir: the folder to keep the cache under (None: the user's cache folder).
      max_bytes: the most bytes the archive may expand to (the flag --max_extract_gb gives
        it in GB, 10**9 bytes).
      max_ratio: the most its expanded size may be, as a multiple of its own size (the flag
        --max_extract_ratio).

    Raises:
      ValueError: `max_bytes` or `max_ratio` is not above 0 (or NaN), naming its flag.
      BadDataError: the cache folder is refused (`cache_root`); the archive cannot be read,
        is truncated or corrupt, changed while it was read, holds a member that is not a
        file or a folder or would land outside the extraction folder (`_member_path`),
        expands past `max_bytes` or `max_ratio`; or the disk refuses a write (full,
        read-only).
    """
    if not max_bytes > 0:  # NaN too
        raise ValueError(f"--max_extract_gb must be above 0; got {max_bytes / GB:g}.")
    if not max_ratio > 0:
        raise ValueError(f"--max_extract_ratio must be above 0; got {max_ratio:g}.")
    root = cache_root(data_dir)
    try:
        with open(path, "rb") as archive:
            size = os.fstat(archive.fileno()).st_size
            sha = _sha256(archive)
            name = re.sub(r"[^A-Za-z0-9_-]", "_", os.path.basename(path).split(".")[0])[:64]
            entry = os.path.join(root, f"{name}-{sha[:32]}")
            if _is_valid(entry):
                return os.path.join(entry, _FILES)
            with _locked(root):
                if _is_valid(entry):  # another process extracted it while this one waited
                    return os.path.join(entry, _FILES)
                archive.seek(0)
                limits = _Limits(path, size, max_bytes, max_ratio)
                _extract_entry(path, archive, sha, limits, root, entry)
    except OSError as e:  # cannot read the archive, or write the cache (full, read-only)
        where = f" {e.filename}" if e.filename else ""
        raise BadDataError(f"Cannot extract {path} into {root}:{where} "
                           f"{e.strerror or e}.") from None
    return os.path.join(entry, _FILES)


@contextlib.contextmanager
def _locked(root):
    """Hold an exclusive `flock` on the cache's lock file while the block runs, after
    removing what killed extractions left (no one else extracts while it is held)."""
    fd = os.open(os.path.join(root, _LOCK), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        for leftover in os.listdir(root):
            if leftover.startswith(_LEFTOVERS):
                _remove(os.path.join(root, leftover))
        yield
    finally:
        os.close(fd)  # releases the flock


def _remove(path):
    """Remove the file, link or folder `path` (a folder with all it holds), never
    following a link."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)


def _extract_entry(path, archive, sha, limits, root, entry):
    """Extract the open `archive` (of `path`, whose sha256 is `sha`) into a fresh folder in
    `root`, write its manifest, and rename it onto `entry`, replacing an invalid one. The
    fresh folder is removed on any failure."""
    partial = tempfile.mkdtemp(prefix=_LEFTOVERS[0], dir=root)  # mode 0700
    stale = None
    try:
        files = os.path.join(partial, _FILES)
        os.mkdir(files, 0o755)
        reader = _HashingReader(archive)
        try:
            _extract_members(path, reader, files, limits)
        except _BAD_ARCHIVE as e:
            cause = " ".join(str(e).split())  # on one line
            raise BadDataError(f"{path} is not a readable .tar.gz ({type(e).__name__}: "
                               f"{cause}): it may be truncated or corrupt.") from None
        if reader.finish() != sha:
            raise BadDataError(f"{path} changed while it was extracted; run again once "
                               "nothing writes to it.")
        manifest = {"archive_sha256": sha, **_inventory(files)}
        with open(os.path.join(partial, _MANIFEST), "x", encoding="utf-8") as f:
            json.dump(manifest, f)
        if os.path.lexists(entry):  # invalid (checked under the lock): moved aside first
            stale = tempfile.mkdtemp(prefix=_LEFTOVERS[1], dir=root)
            os.rename(entry, os.path.join(stale, "entry"))
        os.rename(partial, entry)
    finally:
        for folder in (partial, stale):  # `partial` is gone already if renamed
            if folder:
                shutil.rmtree(folder, ignore_errors=True)


def _is_valid(entry):
    """Whether the cache entry `entry` exists and matches its manifest.

    Raises:
      BadDataError: it exists but is not a folder of this user that only it can write to
        (`_check_own_folder`).
    """
    if not os.path.lexists(entry):
        return False
    _check_own_folder(entry)
    try:
        fd = os.open(os.path.join(entry, _MANIFEST), os.O_RDONLY | os.O_NOFOLLOW)
        with open(fd, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError):  # none (killed before it was written), or damaged
        return False
    files = os.path.join(entry, _FILES)
    if not (os.path.isdir(files) and not os.path.islink(files)):
        return False
    try:
        return {"archive_sha256": manifest.get("archive_sha256"), **_inventory(files)} == \
            manifest
    except (OSError, _NotPlain):  # a file removed meanwhile, or a link or device in it
        return False


class _NotPlain(Exception):
    """A cache entry holds something that is neither a regular file nor a folder."""


def _inventory(folder):
    """{"folders": [relative paths], "files": {relative path: [size, mtime in ns]}} of all
    under `folder`, read with `lstat`, in sorted order.

    Raises:
      _NotPlain: something under it is neither a regular file nor a folder.
    """
    folders, files = [], {}
    pending = [""]
    while pending:
        relative = pending.pop()
        with os.scandir(os.path.join(folder, relative)) as entries:
            for item in entries:
                name = f"{relative}/{item.name}" if relative else item.name
                st = item.stat(follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode):
                    folders.append(name)
                    pending.append(name)
                elif stat.S_ISREG(st.st_mode):
                    files[name] = [st.st_size, st.st_mtime_ns]
                else:
                    raise _NotPlain(name)
    return {"folders": sorted(folders), "files": dict(sorted(files.items()))}


def _sha256(file):
    """The hex sha256 of the rest of the open binary `file` (`hashlib.file_digest` needs
    Python 3.11)."""
    digest = hashlib.sha256()
    for chunk in iter(lambda: file.read(1 << 20), b""):
        digest.update(chunk)
    return digest.hexdigest()


class _HashingReader:
    """A file read in order, its bytes hashed (sha256) as they are read."""

    def __init__(self, file):
        self._file, self._hash = file, hashlib.sha256()

    def read(self, size=-1):
        """Read and hash up to `size` bytes (all that is left if negative)."""
        chunk = self._file.read(size)
        self._hash.update(chunk)
        return chunk

    def finish(self):
        """Hash the rest of the file, and return the hex sha256 of all of it."""
        while self.read(1 << 20):
            pass
        return self._hash.hexdigest()


class _Limits:
    """The bounds on an archive's expanded size, and the bytes counted so far."""

    def __init__(self, path, archive_size, max_bytes, max_ratio):
        self.path, self.archive_size = path, archive_size
        self.max_bytes, self.max_ratio = max_bytes, max_ratio
        self.counted = 0

    def add(self, count, ahead=0):
        """Count `count` more bytes, and check them and `ahead` bytes still to come.

        Raises:
          BadDataError: the bytes counted and `ahead` pass `max_bytes` or `max_ratio` times
            the archive's size; it names the archive, the limit and the flag that raises it.
        """
        self.counted += count
        total = self.counted + ahead
        refuse = f"Refusing archive {self.path}: it expands to more than"
        if total > self.max_bytes:
            raise BadDataError(f"{refuse} {self.max_bytes / GB:g} GB (--max_extract_gb="
                               f"{self.max_bytes / GB:g}); raise it if you trust the "
                               "archive.")
        if total > self.max_ratio * self.archive_size:
            raise BadDataError(f"{refuse} {self.max_ratio:g} times its own "
                               f"{self.archive_size:,} bytes (--max_extract_ratio="
                               f"{self.max_ratio:g}); raise it if you trust the archive.")


_MEMBER_KINDS = {tarfile.SYMTYPE: "a symbolic link", tarfile.LNKTYPE: "a hard link",
                 tarfile.CHRTYPE: "a character device", tarfile.BLKTYPE: "a block device",
                 tarfile.FIFOTYPE: "a FIFO"}


def _extract_members(archive, source, dest, limits):
    """Write the files and folders of the `.tar.gz` read from `source` (the file object of
    `archive`) under the folder `dest`, counting their bytes against `limits`.

    Hand-written rather than `TarFile.extractall`: its filters differ from one Python version
    to the next, and the "data" filter of Python 3.11.7 lets a chain of symbolic links write
    outside `dest` (CVE-2025-4517). Image folders need only files and folders, so nothing else
    is accepted, and each file is created anew (never through an existing path). The archive
    is read once, in order (a tar stream), to its end, so that gzip checks its CRC.

    Raises:
      BadDataError: a member is not a regular file or a folder, has an absolute name or a
        `..` in it, would land outside `dest`, or clashes with an earlier member; or the
        archive expands past `limits`.
      tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile: the archive cannot be read.
    """
    dest = os.path.realpath(dest)
    with gzip.GzipFile(fileobj=source, mode="rb") as unzipped, \
            tarfile.open(fileobj=unzipped, mode="r|") as tar:
        while (member := tar.next()) is not None:
            tar.members.clear()  # a stream's members are not needed again: bounded memory
            path = _member_path(archive, member, dest)
            limits.add(_MEMBER_HEADER, ahead=member.size)  # its header's size, before its bytes
            try:
                if member.isdir():
                    os.makedirs(path, 0o755, exist_ok=True)
                else:
                    os.makedirs(os.path.dirname(path), 0o755, exist_ok=True)
                    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                    with os.fdopen(fd, "wb") as out, tar.extractfile(member) as data:
                        while chunk := data.read(1 << 20):
                            limits.add(len(chunk))
                            out.write(chunk)
            except (FileExistsError, NotADirectoryError):
                raise BadDataError(f"Refusing archive {archive}: member {member.name!r} "
                                   "clashes with an earlier member (the same name twice, or a "
                                   "file where a folder goes).") from None
        while unzipped.read(1 << 20):  # read to the end, so gzip checks its CRC
            pass


def _member_path(archive, member, dest):
    """Where `member` of `archive` goes under the folder `dest` (a real path).

    Raises:
      BadDataError: it is not a regular file or a folder, or its name is absolute, has a `..`
        in it, or resolves to outside `dest`.
    """
    refuse = f"Refusing archive {archive}: member {member.name!r}"
    if not (member.isfile() or member.isdir()):
        kind = _MEMBER_KINDS.get(member.type, f"of type {member.type!r}")
        raise BadDataError(f"{refuse} is {kind}; an image folder archive holds only files "
                           "and folders.")
    if os.path.isabs(member.name) or ".." in member.name.split("/"):
        problem = "an absolute name" if os.path.isabs(member.name) else "'..' in its name"
        raise BadDataError(f"{refuse} has {problem}; an image folder archive holds only "
                           "names below its top folder.")
    path = os.path.realpath(os.path.join(dest, member.name))
    if os.path.commonpath([path, dest]) != dest:
        raise BadDataError(f"{refuse} would be written outside the extraction folder.")
    return path
