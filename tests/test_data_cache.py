"""Tests of the extraction cache of .tar.gz datasets (sparta_tf/archive.py): per user, only
its owner writes it, keyed by the archive's content, checked against its manifest.

Each test keeps the cache in its own temporary folder (XDG_CACHE_HOME or data_dir).
"""

import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile

import numpy as np
import pytest
from PIL import Image

from sparta_tf import archive, data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck"]
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root, to chown to another user")


@pytest.fixture(name="xdg")
def _xdg(tmp_path, monkeypatch):
    """A fresh XDG_CACHE_HOME: the cache of `data.load` without a data_dir goes under it."""
    folder = tmp_path / "xdg"
    monkeypatch.setenv("XDG_CACHE_HOME", str(folder))
    return folder


def _images_archive(tmp_path, train=64, classes=("ant", "bee")):
    """A .tar.gz of 8x8 PNGs in one top folder: `train` per class in train/, 2 in test/,
    each image a different texture."""
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    for split, count in (("train", train), ("test", 2)):
        for name in classes:
            os.makedirs(root / split / name)
            for i in range(count):
                pixels = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")
    path = tmp_path / "images.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        tar.add(root, arcname="images")
    return str(path)


def _entry(cache_root):
    """The only archive entry of the cache folder `cache_root`."""
    (entry,) = [p for p in cache_root.iterdir() if not p.name.startswith(".")]
    return entry


def test_a_folder_at_the_old_shared_cache_path_changes_nothing(tmp_path, xdg, monkeypatch):
    # What any local user could plant: the bundled sample's folder of the old cache,
    # $TMPDIR/sparta_tf_extracted/<name>-<sha of path|size|mtime>, with classes of its own.
    shared = tmp_path / "tmp"
    monkeypatch.setenv("TMPDIR", str(shared))
    monkeypatch.setattr(tempfile, "tempdir", str(shared))
    stat = os.stat(data.BUNDLED_ARCHIVE)
    key = f"{os.path.abspath(data.BUNDLED_ARCHIVE)}|{stat.st_size}|{stat.st_mtime_ns}"
    planted = (shared / "sparta_tf_extracted" /
               f"cifar10_sample-{hashlib.sha256(key.encode()).hexdigest()[:16]}")
    for split in ("train", "test"):
        for name in ("pwned_a", "pwned_b"):
            os.makedirs(planted / split / name)
            for i in range(20):
                Image.new("RGB", (32, 32), (255, 0, 0)).save(planted / split / name / f"{i}.png")
    before = sorted(str(p) for p in planted.parent.rglob("*"))
    d = data.load(max_train=20, max_test=10)
    assert d.class_names == CIFAR10_CLASSES
    assert d.x_train.std() > 30  # CIFAR-10's pictures, not the planted red squares
    assert sorted(str(p) for p in planted.parent.rglob("*")) == before  # nothing written there
    entry = _entry(xdg / "sparta_tf" / "extracted")
    assert entry.name.startswith("cifar10_sample-")


def _one_line_refusal(dataset, *parts, **kwargs):
    """The BadDataError of `data.load(dataset, **kwargs)`: one line, holding each of `parts`."""
    with pytest.raises(data.BadDataError) as info:
        data.load(dataset, **kwargs)
    message = str(info.value)
    assert "\n" not in message, message
    for part in parts:
        assert part in message, message
    return message


@needs_root
@pytest.mark.parametrize("where", ["sparta_tf", "sparta_tf/extracted", "data_dir"])
def test_a_cache_folder_of_another_user_is_refused(where, tmp_path, xdg):
    dataset = _images_archive(tmp_path)
    if where == "data_dir":  # a shared data_dir, where another user made the folder first
        kwargs, folder = {"data_dir": str(tmp_path / "shared")}, tmp_path / "shared"
        folder = folder / "sparta_tf_extracted"
    else:
        kwargs, folder = {}, xdg / where
    os.makedirs(folder, 0o755)
    planted = folder / "planted"
    os.mkdir(planted)
    os.chown(folder, 12345, 12345)
    _one_line_refusal(dataset, f"Refusing the cache folder {folder}:",
                      "belongs to user id 12345, not to you (0)", "--data_dir", **kwargs)
    assert [p.name for p in folder.iterdir()] == ["planted"]  # nothing written in it
    os.chown(folder, 0, 0)
    os.chmod(folder, 0o777)  # ours, but anyone may write to it
    _one_line_refusal(dataset, f"Refusing the cache folder {folder}:", "mode 0777",
                      "chmod go-w", **kwargs)
    os.chmod(folder, 0o755)
    assert data.load(dataset, **kwargs).class_names == ["ant", "bee"]


@needs_root
def test_a_cache_entry_of_another_user_is_refused(tmp_path, xdg):
    dataset = _images_archive(tmp_path)
    data.load(dataset)
    entry = _entry(xdg / "sparta_tf" / "extracted")
    os.chown(entry, 12345, 12345)
    _one_line_refusal(dataset, f"Refusing the cache folder {entry}:", "user id 12345")


@pytest.mark.parametrize("where", ["extracted", "data_dir", "entry"])
def test_a_cache_folder_reached_through_a_symlink_is_refused(where, tmp_path, xdg):
    dataset = _images_archive(tmp_path)
    target = tmp_path / "target"  # this user's own folder, mode 0700: only the link is wrong
    os.mkdir(target, 0o700)
    kwargs = {}
    if where == "extracted":
        os.makedirs(xdg / "sparta_tf", 0o700)
        link = xdg / "sparta_tf" / "extracted"
    elif where == "data_dir":
        kwargs = {"data_dir": str(tmp_path / "data")}
        os.mkdir(tmp_path / "data")
        link = tmp_path / "data" / "sparta_tf_extracted"
    else:  # the entry the archive's sha names, as a link to a copy of a valid entry
        entry = archive.extract(dataset)[:-len("/files")]
        os.rename(entry, target / "copy")
        link = entry
        target = target / "copy"
    os.symlink(target, link)
    before = sorted(str(p) for p in target.rglob("*"))
    _one_line_refusal(dataset, f"Refusing the cache folder {link}:", "is a symbolic link",
                      **kwargs)
    assert sorted(str(p) for p in target.rglob("*")) == before  # nothing extracted through it


def test_a_changed_or_incomplete_entry_is_extracted_again(tmp_path, xdg):
    dataset = _images_archive(tmp_path)
    first = data.load(dataset)
    assert first.x_train.shape == (128, 8, 8, 3)
    files = _entry(xdg / "sparta_tf" / "extracted") / "files"
    train = files / "images" / "train"

    def damage_images():
        for path in (train / "ant" / "3.png", train / "bee" / "60.png"):
            os.remove(path)

    def truncate_an_image():
        with open(train / "ant" / "5.png", "r+b") as f:
            f.truncate(10)

    def add_an_image():
        Image.new("RGB", (8, 8)).save(train / "bee" / "64.png")

    def link_an_image():
        os.remove(train / "ant" / "7.png")
        os.symlink(train / "ant" / "8.png", train / "ant" / "7.png")

    def drop_the_manifest():  # as a kill before it was written would leave it
        os.remove(files.parent / "manifest.json")

    for damage in (damage_images, truncate_an_image, add_an_image, link_an_image,
                   drop_the_manifest):
        damage()
        again = data.load(dataset)
        np.testing.assert_array_equal(again.x_train, first.x_train, err_msg=damage.__name__)
        np.testing.assert_array_equal(again.y_train, first.y_train)
        assert [p.name for p in (xdg / "sparta_tf" / "extracted").iterdir()
                if p.name != ".lock"] == [files.parent.name]  # replaced, nothing else left


def test_what_a_killed_extraction_left_is_removed_by_the_next(tmp_path, xdg):
    dataset = _images_archive(tmp_path, train=2)
    root = archive.cache_root()
    for leftover in (".partial-k1ll3d", ".stale-k1ll3d"):
        os.makedirs(os.path.join(root, leftover, "files", "train"))
    archive.extract(dataset)
    assert sorted(os.listdir(root)) == [".lock", _entry(xdg / "sparta_tf" / "extracted").name]


def test_the_cache_is_the_users_own(tmp_path, monkeypatch):
    dataset = _images_archive(tmp_path, train=2)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    files = archive.extract(dataset)
    assert files.startswith(str(tmp_path / "home" / ".cache" / "sparta_tf" / "extracted") + "/")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")  # not absolute: ignored (XDG spec)
    assert archive.extract(dataset) == files
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert archive.extract(dataset).startswith(str(tmp_path / "xdg" / "sparta_tf" / "extracted"))
    for folder in (tmp_path / "xdg" / "sparta_tf", tmp_path / "xdg" / "sparta_tf" / "extracted"):
        assert folder.stat().st_mode & 0o777 == 0o700


def test_two_processes_extracting_at_once_share_one_entry(tmp_path, xdg):
    dataset = _images_archive(tmp_path)
    code = f"from sparta_tf import archive; print(archive.extract({dataset!r}))"
    runs = [subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [run.communicate(timeout=120) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outs
    assert outs[0][0] == outs[1][0]
    root = xdg / "sparta_tf" / "extracted"
    assert sorted(p.name for p in root.iterdir()) == [".lock", _entry(root).name]
    assert data.load(dataset).x_train.shape == (128, 8, 8, 3)
