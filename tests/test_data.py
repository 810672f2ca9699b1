"""Tests of sparta_tf.data: the bundled sample, TFDS, image folders and archives, pipelines."""

import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from sparta_tf import data, image_folder

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck"]
FOLDER_CLASSES = ["ant", "cat", "dog"]  # written unsorted below; labels follow sorted order
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _shade(label):
    """The grey level of every pixel of a test image of class `label`."""
    return 60 * label + 30


def _write_folder(root, per_split=(("train", 4), ("test", 2))):
    """A split/class/image folder of 8x8 images, PNG and JPEG, each a flat `_shade(label)`."""
    for split, count in per_split:
        for label, name in reversed(list(enumerate(FOLDER_CLASSES))):
            os.makedirs(root / split / name)
            image = tf.fill([8, 8, 3], tf.constant(_shade(label), tf.uint8))
            for i in range(count):
                encoded = tf.io.encode_png(image) if i % 2 else tf.io.encode_jpeg(image)
                ext = "png" if i % 2 else "jpg"
                tf.io.write_file(str(root / split / name / f"{i}.{ext}"), encoded)
    return root


def _check_shades(x, y):
    """Each image is flat and has its label's shade (JPEG may be off by a little)."""
    assert np.abs(x.astype(int) - _shade(y)[:, None, None, None]).max() <= 2


def test_bundled_sample_is_balanced_cifar10():
    assert os.path.getsize(data.BUNDLED_ARCHIVE) <= 10 * 2**20
    d = data.load()
    assert d.name == "bundled" and d.class_names == CIFAR10_CLASSES and d.num_classes == 10
    assert d.x_train.shape == (5000, 32, 32, 3) and d.x_test.shape == (1000, 32, 32, 3)
    assert d.x_train.dtype == np.uint8 and d.y_train.dtype == np.int32
    assert d.y_test.dtype == np.int32
    np.testing.assert_array_equal(np.bincount(d.y_train), [500] * 10)
    np.testing.assert_array_equal(np.bincount(d.y_test), [100] * 10)
    assert d.x_train.std() > 30  # real pictures, not blanks


def test_max_examples_are_class_balanced_and_seeded():
    a = data.load(max_train=95, max_test=20, seed=1)
    b = data.load(max_train=95, max_test=20, seed=1)
    c = data.load(max_train=95, max_test=20, seed=2)
    assert len(a.y_train) == 95 and set(np.bincount(a.y_train)) == {9, 10}
    np.testing.assert_array_equal(np.bincount(a.y_test), [2] * 10)
    np.testing.assert_array_equal(a.x_train, b.x_train)
    assert not np.array_equal(a.x_train, c.x_train)


def test_image_folder(tmp_path):
    d = data.load(str(_write_folder(tmp_path / "images")))
    assert d.class_names == FOLDER_CLASSES
    assert d.x_train.shape == (12, 8, 8, 3) and d.x_train.dtype == np.uint8
    assert d.y_train.dtype == np.int32 and d.x_test.shape == (6, 8, 8, 3)
    np.testing.assert_array_equal(np.bincount(d.y_train), [4, 4, 4])
    _check_shades(d.x_train, d.y_train)
    _check_shades(d.x_test, d.y_test)


def test_the_test_split_alone_is_read_without_the_training_images(tmp_path):
    root = _write_folder(tmp_path / "images")
    both = data.load(str(root), max_test=4, seed=3)
    (root / "train" / "cat" / "broken.png").write_bytes(b"not a png at all")  # never decoded
    test = data.load(str(root), max_train=5, max_test=4, seed=3, splits=("test",))
    np.testing.assert_array_equal(test.x_test, both.x_test)
    np.testing.assert_array_equal(test.y_test, both.y_test)
    assert test.x_train.shape == (0, 8, 8, 3) and test.y_train.shape == (0,)
    assert test.x_train.dtype == np.uint8 and test.y_train.dtype == np.int32
    assert test.class_names == FOLDER_CLASSES
    for splits in ((), ("validation",)):
        with pytest.raises(ValueError, match="splits must be some of"):
            data.load(str(root), splits=splits)


def test_a_sample_decodes_only_its_images_and_is_the_sample_of_all(tmp_path, monkeypatch):
    root = str(_write_folder(tmp_path / "images"))
    everything = data.load(root)
    decoded = []
    decode = image_folder.decode_tensorflow
    monkeypatch.setattr(image_folder, "decode_tensorflow",
                        lambda paths: decoded.append(len(paths)) or decode(paths))
    sample = data.load(root, max_train=5, max_test=4, seed=3)
    assert decoded == [5, 4]
    for split, count in (("train", 5), ("test", 4)):
        y_all = getattr(everything, f"y_{split}")
        keep = data.balanced_subset(y_all, count, 3)
        np.testing.assert_array_equal(getattr(sample, f"x_{split}"),
                                      getattr(everything, f"x_{split}")[keep])
        np.testing.assert_array_equal(getattr(sample, f"y_{split}"), y_all[keep])
    for flag in ("max_train", "max_test"):
        with pytest.raises(ValueError, match=f"{flag} must be at least 1"):
            data.load(root, **{flag: 0})


def test_corrupt_image_is_named(tmp_path):
    root = _write_folder(tmp_path / "images")
    (root / "train" / "cat" / "broken.png").write_bytes(b"not a png at all")
    with pytest.raises(ValueError, match="broken.png"):
        data.load(str(root))


def _entries(cache):
    """The folders of the archives extracted in the cache folder `cache`."""
    return sorted(p for p in (cache / "sparta_tf_extracted").iterdir()
                  if not p.name.startswith("."))


def _add_hidden(root):
    """Hidden files and folders at every level of the image folder `root`, images among
    them (a notebook's checkpoints, macOS's files): none may become a class or an image."""
    image = tf.io.encode_png(tf.fill([8, 8, 3], tf.constant(255, tf.uint8)))
    for folder in (root / ".ipynb_checkpoints", root / "train" / ".ipynb_checkpoints",
                   root / "test" / ".ipynb_checkpoints",
                   root / "train" / "ant" / ".ipynb_checkpoints"):
        os.makedirs(folder)
        tf.io.write_file(str(folder / "0.png"), image)
    for folder in (root, root / "train", root / "test" / "dog"):
        (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
        tf.io.write_file(str(folder / "._0.png"), image)  # AppleDouble: a hidden "PNG"
    return root


def test_hidden_files_and_folders_are_skipped_in_folders_and_archives(tmp_path):
    root = _add_hidden(_write_folder(tmp_path / "images"))
    archive = str(tmp_path / "images.tar.gz")
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(root, arcname="images")
        tar.add(root / ".DS_Store", arcname="._images")  # beside the top folder, hidden
    for dataset in (str(root), archive):
        d = data.load(dataset, data_dir=str(tmp_path / "cache"))
        assert d.class_names == FOLDER_CLASSES, dataset
        np.testing.assert_array_equal(np.bincount(d.y_train), [4, 4, 4])
        np.testing.assert_array_equal(np.bincount(d.y_test), [2, 2, 2])
        _check_shades(d.x_train, d.y_train)  # no white image of a hidden file among them
        _check_shades(d.x_test, d.y_test)


def test_archive_is_extracted_once_per_content(tmp_path):
    archive = str(tmp_path / "images.tar.gz")
    with tarfile.open(archive, "w:gz") as tar:  # one top folder, as `tar czf` makes it
        tar.add(_write_folder(tmp_path / "images"), arcname="images")
    cache = tmp_path / "cache"
    assert len(data.load(archive, data_dir=str(cache)).y_train) == 12
    (entry,) = _entries(cache)
    image = entry / "files" / "images" / "train" / "ant" / "0.jpg"
    reused = image.stat().st_ino
    assert len(data.load(archive, data_dir=str(cache)).y_train) == 12
    assert image.stat().st_ino == reused  # the cache was read, not extracted again
    os.utime(archive, ns=(0, 0))  # the same content, another time: the same entry
    assert len(data.load(archive, data_dir=str(cache)).y_train) == 12
    assert _entries(cache) == [entry] and image.stat().st_ino == reused
    with tarfile.open(archive, "w:gz") as tar:  # another content: another entry
        tar.add(tmp_path / "images", arcname="images")
        tar.add(tmp_path / "images" / "train" / "ant" / "0.jpg", arcname="images/train/ant/9.jpg")
    assert len(data.load(archive, data_dir=str(cache)).y_train) == 13
    assert len(_entries(cache)) == 2


def test_archive_of_files_and_folders_extracts_with_plain_modes(tmp_path):
    archive = str(tmp_path / "images.tgz")
    with tarfile.open(archive, "w:gz") as tar:  # "." and "./train/..." members, as `tar -C`
        tar.add(_write_folder(tmp_path / "images"), arcname=".")
    d = data.load(archive, data_dir=str(tmp_path / "cache"))
    assert d.class_names == FOLDER_CLASSES and len(d.y_train) == 12 and len(d.y_test) == 6
    (entry,) = _entries(tmp_path / "cache")
    image = entry / "files" / "train" / "ant" / "0.jpg"
    assert image.stat().st_mode & 0o777 == 0o644 & ~_umask()
    assert image.parent.stat().st_mode & 0o777 == 0o755 & ~_umask()
    for folder in (entry, entry.parent):  # only its owner can reach the files
        assert folder.stat().st_mode & 0o777 == 0o700


def _umask():
    """The process's file mode creation mask."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_empty_class_folder_is_refused(tmp_path):
    root = _write_folder(tmp_path / "images")
    os.makedirs(root / "test" / "emu")
    os.makedirs(root / "train" / "emu")
    (root / "train" / "emu" / "notes.txt").write_text("not an image")
    with pytest.raises(data.BadDataError, match=r"Class folder .*train/emu holds no PNG or JPEG"):
        data.load(str(root))


def test_different_class_sets_are_refused(tmp_path):
    root = _write_folder(tmp_path / "images")
    os.makedirs(root / "train" / "emu")
    tf.io.write_file(str(root / "train" / "emu" / "0.png"),
                     tf.io.encode_png(tf.zeros([8, 8, 3], tf.uint8)))
    with pytest.raises(data.BadDataError) as info:
        data.load(str(root))
    message = str(info.value)
    assert str(root) in message and "only in train/: ['emu']; only in test/: none" in message


@pytest.mark.parametrize("split", ["train", "test"])
def test_missing_split_is_refused(split, tmp_path):
    root = _write_folder(tmp_path / "images", ((split, 2),))
    other = {"train": "test", "test": "train"}[split]
    with pytest.raises(data.BadDataError, match=f"{root} has no {other}/ folder"):
        data.load(str(root))


@pytest.mark.parametrize("flag,count", [("max_train", 13), ("max_test", 7)])
def test_max_examples_beyond_the_split_are_refused(flag, count, tmp_path):
    root = str(_write_folder(tmp_path / "images"))
    split, size = flag[4:], count - 1
    with pytest.raises(data.BadDataError) as info:
        data.load(root, **{flag: count})
    assert str(info.value) == (f"{flag}={count} but the {split} split of {root} has {size} "
                               "images; leave it out to use all of them.")
    assert len(getattr(data.load(root, **{flag: size}), f"y_{split}")) == size  # all: fine


def test_unknown_dataset():
    with pytest.raises(ValueError, match="bundled.*cifar10.*tar.gz"):
        data.load("no_such_dataset")


def test_tfds_unavailable_offline(tmp_path, monkeypatch):
    def no_download(self, *args, **kwargs):  # never fetch for real, even where online
        raise ConnectionError("no network")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", no_download)
    with pytest.raises(data.DatasetUnavailableError) as info:
        data.load("cifar10", data_dir=str(tmp_path))
    message = str(info.value)
    for part in ["'cifar10'", str(tmp_path), "tfds.load", "--dataset=bundled",
                 "--dataset=/path/to/folder_or.tar.gz"]:
        assert part in message
    assert info.value.__cause__ is None and info.value.__suppress_context__


@pytest.mark.parametrize("name,num_classes", [("cifar10", 10), ("cifar100", 100),
                                              ("svhn_cropped", 10)])
def test_tfds_reading(name, num_classes, tmp_path, monkeypatch):
    monkeypatch.setattr(tfds.core.DatasetBuilder, "is_prepared", lambda self: True)
    with tfds.testing.mock_data(num_examples=6):
        d = data.load(name, data_dir=str(tmp_path), max_test=4)
    assert d.x_train.shape == (6, 32, 32, 3) and d.x_train.dtype == np.uint8
    assert d.x_test.shape == (4, 32, 32, 3) and d.num_classes == num_classes
    assert d.y_train.dtype == np.int32 and 0 <= d.y_train.min() <= d.y_train.max() < num_classes
    with tfds.testing.mock_data(num_examples=6):
        test = data.load(name, data_dir=str(tmp_path), max_test=4, splits=("test",))
    np.testing.assert_array_equal(test.x_test, d.x_test)
    assert test.x_train.shape == (0, 32, 32, 3) and test.num_classes == num_classes


# Pipelines: image i is flat with grey level i + 1, and its label is i % 7.
N, BATCH = 70, 16
X = np.repeat(np.arange(1, N + 1, dtype=np.uint8), 32 * 32 * 3).reshape(N, 32, 32, 3)
Y = np.arange(N, dtype=np.int32) % 7
TEXTURES = np.random.default_rng(0).integers(0, 256, (N, 32, 32, 3), dtype=np.uint8)


def _epoch(x=X, **kwargs):
    """A train_dataset epoch as lists of numpy image and label batches."""
    kwargs = {"batch_size": BATCH, "seed": 3, "epoch": 0, **kwargs}
    batches = list(tfds.as_numpy(data.train_dataset(x, Y, **kwargs)))
    return [b[0] for b in batches], [b[1] for b in batches]


def _indices(images):
    """The index of each (possibly augmented) flat image: its brightest pixel, less one."""
    return np.round(images.max(axis=(1, 2, 3)) * 255).astype(int) - 1


def test_train_epoch_is_a_reproducible_permutation_with_aligned_labels():
    images, labels = _epoch()
    assert len(images) == data.steps_per_epoch(N, BATCH) == 4
    assert all(b.shape == (BATCH, 32, 32, 3) and b.dtype == np.float32 for b in images)
    assert all(b.dtype == np.int32 for b in labels)
    index = _indices(np.concatenate(images))
    assert len(set(index)) == 4 * BATCH  # no repeats; the last 6 examples are dropped
    np.testing.assert_array_equal(np.concatenate(labels), Y[index])
    again_images, again_labels = _epoch()
    np.testing.assert_array_equal(np.concatenate(images), np.concatenate(again_images))
    np.testing.assert_array_equal(np.concatenate(labels), np.concatenate(again_labels))
    assert not np.array_equal(index, _indices(np.concatenate(_epoch(epoch=1)[0])))
    assert not np.array_equal(index, _indices(np.concatenate(_epoch(seed=4)[0])))


def test_skip_batches_resumes_the_same_epoch():
    images, labels = _epoch(x=TEXTURES, epoch=2)
    for k in (1, 3, 4):
        rest_images, rest_labels = _epoch(x=TEXTURES, epoch=2, skip_batches=k)
        assert len(rest_images) == 4 - k
        for got, want in zip(rest_images + rest_labels, images[k:] + labels[k:]):
            np.testing.assert_array_equal(got, want)


def test_augmentation_changes_images_within_range():
    augmented = np.concatenate(_epoch(x=TEXTURES)[0])
    plain = np.concatenate(_epoch(x=TEXTURES, augment=False)[0])
    assert augmented.min() >= 0.0 and augmented.max() <= 1.0
    changed = (augmented != plain).any(axis=(1, 2, 3))
    assert changed.mean() > 0.8  # the unchanged are no shift and no flip: 1 in 162
    assert (augmented == 0).all(axis=(2, 3)).any()  # some rows of zero padding
    sources = {t.tobytes() for t in TEXTURES}  # unaugmented: the images themselves
    assert all(np.round(p * 255).astype(np.uint8).tobytes() in sources for p in plain)


def test_make_bundled_subset_tool(tmp_path):
    source = str(tmp_path / "source.tar.gz")
    with tarfile.open(source, "w:gz") as tar:
        tar.add(_write_folder(tmp_path / "images", (("train", 4), ("test", 3))), arcname=".")
    tool = os.path.join(REPO, "tools", "make_bundled_subset.py")
    outputs = [str(tmp_path / name) for name in ("a.tar.gz", "b.tar.gz")]
    for out in outputs:
        subprocess.run([sys.executable, tool, source, out, "--train_per_class", "2",
                        "--test_per_class", "1", "--seed", "5"], check=True)
    with open(outputs[0], "rb") as a, open(outputs[1], "rb") as b:
        assert a.read() == b.read()  # reproducible to the byte
    with tarfile.open(source) as src, tarfile.open(outputs[0]) as out:
        names = out.getnames()
        assert len(names) == 3 * 2 + 3 * 1
        for name in names:
            assert out.extractfile(name).read() == src.extractfile(name).read()
    d = data.load(outputs[0])
    np.testing.assert_array_equal(np.bincount(d.y_train), [2, 2, 2])


def test_shards_split_every_global_batch_between_the_workers():
    whole, _ = _epoch(TEXTURES, seed=5, epoch=2)
    shards = [_epoch(TEXTURES, seed=5, epoch=2, num_shards=2, shard=s)[0] for s in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == len(whole)
    for k, batch in enumerate(whole):  # shard 0 the first half of each global batch
        np.testing.assert_array_equal(np.concatenate([shards[0][k], shards[1][k]]), batch)
    resumed, _ = _epoch(TEXTURES, seed=5, epoch=2, num_shards=2, shard=1, skip_batches=2)
    np.testing.assert_array_equal(np.stack(resumed), np.stack(shards[1][2:]))
    with pytest.raises(ValueError, match="not a multiple of the 3 workers"):
        _epoch(num_shards=3)
