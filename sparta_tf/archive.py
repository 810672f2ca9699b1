"""Safe extraction of a `.tar.gz` of an image folder, once, into a cache folder.

The archive may hold only files and folders below its top (no links, devices, absolute names
or `..`). It is extracted into a temporary folder that is renamed into place only when
complete, so a refused, truncated or corrupt archive leaves nothing behind.

This module imports nothing of `sparta_tf` but `image_folder` (for `BadDataError`).
"""

import gzip
import hashlib
import os
import shutil
import tarfile
import tempfile
import zlib

from sparta_tf.image_folder import BadDataError


def extract(archive, data_dir=None):
    """Extract `archive` once into a cache folder, and return that folder.

    The folder, under `data_dir` (or the system's temp folder), is named after the archive's
    path, size and modification time, so a changed archive is extracted anew. The archive is
    extracted into a temporary folder beside it, renamed into place when complete and removed
    on any failure: the cache never holds half an archive.

    Raises:
      BadDataError: the archive is truncated or corrupt, or a member is not a file or a folder
        or would land outside the extraction folder (see `_extract_members`).
    """
    stat = os.stat(archive)
    key = f"{os.path.abspath(archive)}|{stat.st_size}|{stat.st_mtime_ns}"
    name = os.path.basename(archive).split(".")[0]
    cache = os.path.join(data_dir or tempfile.gettempdir(), "sparta_tf_extracted")
    target = os.path.join(cache, f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}")
    if not os.path.isdir(target):
        os.makedirs(cache, exist_ok=True)
        partial = tempfile.mkdtemp(prefix=f"{name}-partial-", dir=cache)
        try:
            try:
                _extract_members(archive, partial)
            except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as e:
                cause = " ".join(str(e).split())  # on one line
                raise BadDataError(f"{archive} is not a readable .tar.gz ({type(e).__name__}: "
                                   f"{cause}): it may be truncated or corrupt.") from None
            try:
                os.rename(partial, target)
            except OSError:
                if not os.path.isdir(target):  # else another process got there first
                    raise
        finally:
            shutil.rmtree(partial, ignore_errors=True)  # gone already if renamed
    return target


_MEMBER_KINDS = {tarfile.SYMTYPE: "a symbolic link", tarfile.LNKTYPE: "a hard link",
                 tarfile.CHRTYPE: "a character device", tarfile.BLKTYPE: "a block device",
                 tarfile.FIFOTYPE: "a FIFO"}


def _extract_members(archive, dest):
    """Write the files and folders of `archive` under the folder `dest`.

    Hand-written rather than `TarFile.extractall`: its filters differ from one Python version
    to the next, and the "data" filter of Python 3.11.7 lets a chain of symbolic links write
    outside `dest` (CVE-2025-4517). Image folders need only files and folders, so nothing else
    is accepted, and each file is created anew (never through an existing path).

    Raises:
      BadDataError: a member is not a regular file or a folder, has an absolute name or a
        `..` in it, would land outside `dest`, or clashes with an earlier member.
      tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile: the archive cannot be read.
    """
    dest = os.path.realpath(dest)
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:
            path = _member_path(archive, member, dest)
            try:
                if member.isdir():
                    os.makedirs(path, 0o755, exist_ok=True)
                else:
                    os.makedirs(os.path.dirname(path), 0o755, exist_ok=True)
                    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                    with os.fdopen(fd, "wb") as out, tar.extractfile(member) as source:
                        shutil.copyfileobj(source, out)
            except (FileExistsError, NotADirectoryError):
                raise BadDataError(f"Refusing archive {archive}: member {member.name!r} "
                                   "clashes with an earlier member (the same name twice, or a "
                                   "file where a folder goes).") from None
        while tar.fileobj.read(1 << 20):  # read to the end, so gzip checks its CRC
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
