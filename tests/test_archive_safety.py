"""Tests that data.load refuses hostile or broken .tar.gz archives, and leaves nothing behind.

Each archive is refused with a BadDataError naming its member; nothing is written outside the
cache folder, and the cache holds no half-extracted folder afterwards.
"""

import gzip
import hashlib
import io
import os
import tarfile

import pytest

from sparta_tf import data

VICTIM_TEXT = b"the victim's own bytes\n"


def _add(tar, name, kind=tarfile.REGTYPE, linkname="", content=b""):
    """Add a member `name` of type `kind` (with `content` for a regular file) to `tar`."""
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size = kind, linkname, len(content)
    tar.addfile(info, io.BytesIO(content) if kind == tarfile.REGTYPE else None)


def _symlink_chain(tar, tmp_path):
    """CVE-2025-4517: symlinks through folders of long names, so that the resolved path runs
    past PATH_MAX and `os.path.realpath` stops resolving it; a last symlink then points three
    folders above the extraction folder (the cache's parent, tmp_path), and a file is written
    through it. `tarfile`'s "data" filter of Python before 3.11.13 lets all of it through."""
    long_name, steps, path = "d" * 247, "abcdefghijklmnop", ""
    for step in steps:
        _add(tar, os.path.join(path, long_name), tarfile.DIRTYPE)
        _add(tar, os.path.join(path, step), tarfile.SYMTYPE, linkname=long_name)
        path = os.path.join(path, long_name)
    deep_link = os.path.join(*steps, "l" * 254)
    _add(tar, deep_link, tarfile.SYMTYPE, linkname=os.path.join(*[".."] * len(steps)))
    _add(tar, "escape", tarfile.SYMTYPE, linkname=deep_link + "/../../..")
    _add(tar, "escape/escaped.txt", content=b"written through the symlinks\n")
    return "a"  # the first member that is not a file or a folder


def _dotdot(tar, tmp_path):
    """A member that climbs out of the extraction folder with `..`."""
    _add(tar, "train/../../../../dotdot.txt", content=b"outside\n")
    return "train/../../../../dotdot.txt"


def _absolute(tar, tmp_path):
    """A member with an absolute name, inside tmp_path."""
    name = str(tmp_path / "absolute.txt")
    _add(tar, name, content=b"outside\n")
    return name


def _hard_link(tar, tmp_path):
    """A hard link to a file outside, then a file of the same name to overwrite it through."""
    _add(tar, "train/link", tarfile.LNKTYPE, linkname=str(tmp_path / "victim.txt"))
    _add(tar, "train/link", content=b"overwritten\n")
    return "train/link"


def _char_device(tar, tmp_path):
    """A character device (/dev/null's numbers)."""
    info = tarfile.TarInfo("train/null")
    info.type, info.devmajor, info.devminor = tarfile.CHRTYPE, 1, 3
    tar.addfile(info)
    return "train/null"


def _clash(tar, tmp_path):
    """A second file of the first member's name: it would overwrite the first."""
    _add(tar, "train/ant/0.png", content=b"a second file of the same name")
    return "train/ant/0.png"


def _tree(root, skip):
    """{relative path: (kind, sha256 of a file's bytes or a link's target)} of all under `root`,
    not following links, leaving out the folder `skip`."""
    tree = {}
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if os.path.join(folder, d) != str(skip)]
        for name in dirs + files:
            path = os.path.join(folder, name)
            if os.path.islink(path):
                entry = ("link", os.readlink(path))
            elif os.path.isfile(path):
                with open(path, "rb") as f:
                    entry = ("file", hashlib.sha256(f.read()).hexdigest())
            else:
                entry = ("dir", "")
            tree[os.path.relpath(path, root)] = entry
    return tree


def _check_refused(archive, tmp_path, *parts):
    """data.load(archive) raises a BadDataError naming the archive and each of `parts`, leaves
    tmp_path unchanged outside the cache, and leaves no folder in the cache."""
    cache = tmp_path / "cache"
    before = _tree(tmp_path, cache)
    with pytest.raises(data.BadDataError) as info:
        data.load(str(archive), data_dir=str(cache))
    message = str(info.value)
    assert "\n" not in message and str(archive) in message, message
    for part in parts:
        assert part in message, message
    assert _tree(tmp_path, cache) == before
    assert not os.listdir(cache / "sparta_tf_extracted")  # no partial folder left
    return message


@pytest.mark.parametrize("build,kind", [
    (_symlink_chain, "is a symbolic link"), (_dotdot, ".."), (_absolute, "absolute"),
    (_hard_link, "is a hard link"), (_char_device, "is a character device"),
    (_clash, "clashes with an earlier member")])
def test_hostile_archive_is_refused(build, kind, tmp_path):
    (tmp_path / "victim.txt").write_bytes(VICTIM_TEXT)
    archive = tmp_path / "hostile.tar.gz"
    with tarfile.open(archive, "w:gz", format=tarfile.GNU_FORMAT) as tar:
        _add(tar, "train/ant/0.png", content=b"a harmless first member")
        member = build(tar, tmp_path)
    _check_refused(archive, tmp_path, f"member {member!r}", kind)
    assert (tmp_path / "victim.txt").read_bytes() == VICTIM_TEXT
    assert not (tmp_path / "escaped.txt").exists()  # where _symlink_chain's file would go


def _valid_archive(path):
    """A .tar.gz of a few hundred KB of incompressible files, and its bytes."""
    with tarfile.open(path, "w:gz") as tar:
        for i in range(8):
            _add(tar, f"train/ant/{i}.png", content=os.urandom(50_000))
    return path.read_bytes()


def test_truncated_archive_is_refused(tmp_path):
    archive = tmp_path / "truncated.tar.gz"
    whole = _valid_archive(archive)
    archive.write_bytes(whole[:len(whole) // 2])
    for _ in range(2):  # and again: no half-extracted folder is taken for the archive
        message = _check_refused(archive, tmp_path, "is not a readable .tar.gz", "truncated")
        assert "Traceback" not in message


def test_corrupt_archive_is_refused(tmp_path):
    archive = tmp_path / "corrupt.tar.gz"
    whole = bytearray(_valid_archive(archive))
    # A run of zeros mid-stream, in the data of a stored deflate block: only the CRC at the
    # end of the gzip stream tells.
    whole[len(whole) // 2:len(whole) // 2 + 1000] = bytes(1000)
    archive.write_bytes(bytes(whole))
    _check_refused(archive, tmp_path, "is not a readable .tar.gz")


def test_not_a_gzip_is_refused(tmp_path):
    archive = tmp_path / "text.tar.gz"
    archive.write_bytes(gzip.compress(b"")[:5] + b"no gzip here")
    _check_refused(archive, tmp_path, "is not a readable .tar.gz")
