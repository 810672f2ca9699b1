"""Tests that data.load refuses hostile, broken or oversized .tar.gz archives, and leaves
nothing behind.

Each archive is refused with a BadDataError naming its member or the limit it passes;
nothing is written outside the cache folder, and the cache holds no half-extracted folder
afterwards (only its lock file).
"""

import base64
import gzip
import hashlib
import io
import os
import subprocess
import sys
import tarfile

import pytest

from sparta_tf import archive as archives, data

VICTIM_TEXT = b"the victim's own bytes\n"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


def _check_refused(archive, tmp_path, *parts, **limits):
    """data.load(archive, **limits) raises a BadDataError naming the archive and each of
    `parts`, leaves tmp_path unchanged outside the cache, and leaves no folder in the
    cache."""
    cache = tmp_path / "cache"
    before = _tree(tmp_path, cache)
    with pytest.raises(data.BadDataError) as info:
        data.load(str(archive), data_dir=str(cache), **limits)
    message = str(info.value)
    assert "\n" not in message and str(archive) in message, message
    for part in parts:
        assert part in message, message
    assert _tree(tmp_path, cache) == before
    assert os.listdir(cache / "sparta_tf_extracted") == [".lock"]  # no partial folder left
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


def _bomb(path, zeros):
    """A .tar.gz of a tiny image folder (a real PNG per split) and a file of `zeros` zero
    bytes, which gzip shrinks about a thousandfold."""
    png = base64.b64decode(_PNG_1X1)
    with tarfile.open(path, "w:gz") as tar:
        for split in ("train", "test"):
            _add(tar, f"{split}/ant/0.png", content=png)
        info = tarfile.TarInfo("train/ant/zeros.bin")
        info.size = zeros
        tar.addfile(info, io.BytesIO(bytes(zeros)))
    return path


_PNG_1X1 = ("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGNgYGAAAAAEAAH2FzhVAAAAAE"
            "lFTkSuQmCC")  # a black pixel


def test_archive_over_the_ratio_limit_is_refused_and_raising_it_reads_it(tmp_path):
    archive = _bomb(tmp_path / "bomb.tar.gz", 10 * 2**20)  # 10 MB in about 10 KB
    message = _check_refused(archive, tmp_path, "more than 100 times its own",
                             "--max_extract_ratio=100")
    assert f"{archive.stat().st_size:,} bytes" in message
    _check_refused(archive, tmp_path, "more than 500 times", "--max_extract_ratio=500",
                   max_extract_ratio=500)
    d = data.load(str(archive), data_dir=str(tmp_path / "cache"), max_extract_ratio=5000)
    assert d.class_names == ["ant"] and d.x_train.shape == (1, 1, 1, 3)


def test_archive_over_the_size_limit_is_refused(tmp_path):
    archive = tmp_path / "big.tar.gz"
    _valid_archive(archive)  # 400 KB of incompressible files
    _check_refused(archive, tmp_path, "more than 0.0002 GB", "--max_extract_gb=0.0002",
                   max_extract_gb=0.0002)
    assert os.path.isdir(archives.extract(str(archive), str(tmp_path / "cache"),
                                          max_bytes=500_000))  # under it: fine


def test_a_members_size_is_checked_from_its_header_before_its_bytes(tmp_path):
    # A header that claims 20 GB, and 1 KB of data: refused for its size, before any of it
    # is read (reading would find the archive truncated instead).
    info = tarfile.TarInfo("train/ant/huge.bin")
    info.size = 20 * 10**9
    archive = tmp_path / "claims.tar.gz"
    archive.write_bytes(gzip.compress(info.tobuf(tarfile.GNU_FORMAT) + bytes(1024)))
    _check_refused(archive, tmp_path, "more than 16 GB", "--max_extract_gb=16",
                   max_extract_ratio=1e12)
    for limit, flag in (("max_extract_gb", "--max_extract_gb"),
                        ("max_extract_ratio", "--max_extract_ratio")):
        for value in (float("nan"), -1, 0):
            with pytest.raises(ValueError, match=f"^{flag} must be above 0; got {value:g}.$"):
                data.load(str(archive), data_dir=str(tmp_path / "cache"), **{limit: value})


def test_a_full_disk_while_extracting_is_one_line_and_leaves_nothing(tmp_path):
    archive = tmp_path / "images.tar.gz"
    _valid_archive(archive)  # 8 files of 50 KB; a file may have 20 KB (`ulimit -f`)
    code = ("import resource, sys\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))\n"
            "from sparta_tf import archive\n"
            "try:\n"
            f"    archive.extract({str(archive)!r}, {str(tmp_path / 'cache')!r})\n"
            "except archive.BadDataError as e:\n"
            "    sys.exit(f'error: {e}')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    # `import sparta_tf` loads Keras, and on TensorFlow TF logs its start to stderr first.
    last = out.stderr.strip().splitlines()[-1]
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert last.startswith(f"error: Cannot extract {archive} into "), out.stderr
    assert "File too large" in out.stderr
    assert os.listdir(tmp_path / "cache" / "sparta_tf_extracted") == [".lock"]


def test_an_archive_that_changes_while_it_is_extracted_is_refused(tmp_path, monkeypatch):
    # Its sha256 names the cache entry; the bytes extracted are hashed again as they are
    # read, and must give the same sha256 (here they seem not to: another writer).
    archive = tmp_path / "images.tar.gz"
    _valid_archive(archive)
    monkeypatch.setattr(archives._HashingReader, "finish", lambda self: "0" * 64)
    _check_refused(archive, tmp_path, "changed while it was extracted")
