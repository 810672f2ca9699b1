"""Datasets as uint8 arrays, and the tf.data pipelines that feed them to training.

`load(dataset)` reads one of:

- `"bundled"` (the default): a class-balanced random sample of the CIFAR-10 JPEGs that ships
  inside the package (500 train and 100 test images per class; `bundled/README.md`);
- a TFDS name from `TFDS_NAMES`, prepared in (or downloaded into) `data_dir`;
- a folder of `train/<class>/<image>` and `test/<class>/<image>` files (PNG or JPEG), with
  the same classes in both splits and at least one image in each class folder;
- a `.tar.gz` of such a folder, extracted once into a cache folder and reused. It may hold
  only files and folders below its top (no links, devices, absolute names or `..`), and is
  extracted into a temporary folder that is renamed into place only when complete, so a
  refused, truncated or corrupt archive leaves nothing behind.

`max_train` and `max_test` take a class-balanced random sample of a split; asking for more
images than the split has is an error, not a silent "all of them".

`train_dataset` gives one epoch of augmented batches that depends only on (seed, epoch), and
can start at any batch of that epoch, so a killed run resumes on exactly the same data.
Images go out as float32 pixels in [0, 1]: models normalise inside themselves.

This module imports nothing else of `sparta_tf`.
"""

import dataclasses
import gzip
import hashlib
import os
import shutil
import socket
import tarfile
import tempfile
import urllib.parse
import zlib

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

TFDS_NAMES = ("cifar10", "cifar100", "svhn_cropped")
BUNDLED_ARCHIVE = os.path.join(os.path.dirname(__file__), "bundled", "cifar10_sample.tar.gz")
PAD = 4  # pixels of zero padding before the random crop
_READ_BATCH = 4096  # images per batch when a split is read into arrays
_CONNECT_TIMEOUT_S = 5


class DatasetUnavailableError(RuntimeError):
    """A dataset is neither on disk nor downloadable from here."""


class BadDataError(ValueError):
    """An unknown dataset name, or an image file that cannot be read."""


@dataclasses.dataclass
class Data:
    """A dataset held in memory: uint8 images [N, H, W, C] and int32 labels [N]."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: list

    @property
    def num_classes(self):
        """The number of classes, `len(class_names)`."""
        return len(self.class_names)


def load(dataset="bundled", data_dir=None, max_train=None, max_test=None, seed=0):
    """Read a dataset into a `Data`.

    Args:
      dataset: "bundled", a name in `TFDS_NAMES`, or the path of a folder or .tar.gz of
        `train/<class>/<image>` and `test/<class>/<image>` files.
      data_dir: TFDS's data folder for a TFDS name (None: TFDS's default); for "bundled" or
        a .tar.gz, the folder to extract it under (None: the system's temp folder).
      max_train, max_test: keep this many examples of the split, a class-balanced random
        sample drawn with `seed` (None: keep all).
      seed: the seed of those samples.

    Raises:
      DatasetUnavailableError: a TFDS dataset is not prepared and cannot be downloaded.
      BadDataError: `dataset` is none of the above; an image cannot be decoded; an image
        folder lacks train/ or test/, has a class folder with no images, or has different
        classes in its splits; an archive is unreadable or holds anything but files and
        folders below its top; or `max_train` or `max_test` is more than its split has.
    """
    if dataset in TFDS_NAMES:
        builder = _tfds_builder(dataset, data_dir)
    elif dataset == "bundled":
        builder = _image_folder(_extract(BUNDLED_ARCHIVE, data_dir))
    elif os.path.isdir(dataset):
        builder = _image_folder(dataset)
    elif os.path.isfile(dataset) and dataset.endswith((".tar.gz", ".tgz")):
        builder = _image_folder(_extract(dataset, data_dir))
    else:
        raise BadDataError(
            f"Unknown dataset {dataset!r}: use 'bundled' (the CIFAR-10 sample in the package), "
            f"a TFDS name in {TFDS_NAMES}, or the path of an existing folder or .tar.gz of "
            "train/<class>/<image> and test/<class>/<image> files.")
    x_train, y_train = _read_split(builder, "train")
    x_test, y_test = _read_split(builder, "test")
    train = _sample(y_train, max_train, seed, "train", dataset)
    test = _sample(y_test, max_test, seed, "test", dataset)
    return Data(name=dataset, x_train=x_train[train], y_train=y_train[train],
                x_test=x_test[test], y_test=y_test[test],
                class_names=list(builder.info.features["label"].names))


def _sample(labels, max_examples, seed, split, dataset):
    """`balanced_subset(labels, max_examples, seed)`, if the split has `max_examples` labels.

    Raises:
      BadDataError: `max_examples` is more than the split has.
    """
    if max_examples is not None and max_examples > len(labels):
        raise BadDataError(f"max_{split}={max_examples} but the {split} split of {dataset} has "
                           f"{len(labels)} images; leave it out to use all of them.")
    return balanced_subset(labels, max_examples, seed)


def _tfds_builder(name, data_dir):
    """The TFDS builder of `name`, its data downloaded and prepared if need be."""
    builder = tfds.builder(name, data_dir=data_dir)
    if not builder.is_prepared():
        try:
            _check_download_hosts(builder)
            builder.download_and_prepare()
        except Exception as e:  # whatever the cause, the user's options are the same
            raise DatasetUnavailableError(
                f"TFDS dataset {name!r} is not prepared in {builder.data_dir} and could not "
                f"be downloaded ({type(e).__name__}: {e}).\n"
                f"To get it, run `tfds.load({name!r}, data_dir=DIR)` (or `tfds build {name} "
                "--data_dir=DIR`) on a machine with internet access, then copy DIR here and "
                "pass it as data_dir.\n"
                "Offline options: the bundled CIFAR-10 sample (--dataset=bundled, the "
                "default), or a folder or .tar.gz of train/<class>/<image> and "
                "test/<class>/<image> files (--dataset=/path/to/folder_or.tar.gz).") from None
    return builder


def _check_download_hosts(builder):
    """Raise OSError within seconds if a host that `builder` downloads from does not answer.

    Offline, TFDS's own download retries for minutes before it gives up.
    """
    for url in builder.url_infos or ():
        parts = urllib.parse.urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            socket.create_connection((parts.hostname, port), _CONNECT_TIMEOUT_S).close()
        except OSError as e:
            raise OSError(f"cannot reach {parts.hostname}:{port}: {e}") from None


def _image_folder(root):
    """A TFDS builder that reads the split/class/image files under `root`.

    Image folders are read with `tfds.ImageFolder` rather than
    `keras.utils.image_dataset_from_directory`: it decodes each image as it is (Keras resizes
    every image to a given size) and gives the same builder interface as the TFDS datasets.
    Its class names are the sorted folder names; for CIFAR-10 that is its label order.
    """
    entries = os.listdir(root)
    if len(entries) == 1 and entries[0] not in ("train", "test"):  # an archive's top folder
        root = os.path.join(root, entries[0])
    _check_class_folders(root)
    return tfds.ImageFolder(root)


_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")  # those tfds.ImageFolder reads


def _check_class_folders(root):
    """Check that `root` has train/ and test/ folders, and that every split folder holds the
    same class folders, each with at least one image.

    `tfds.ImageFolder` takes the classes of all splits together: a class folder missing from a
    split, or one with no images, would quietly give a class that is never trained or tested.

    Raises:
      BadDataError: naming the split or class folder that breaks the rule.
    """
    for split in ("train", "test"):
        if not os.path.isdir(os.path.join(root, split)):
            raise BadDataError(f"Image folder {root} has no {split}/ folder: it needs "
                               "train/<class>/<image> and test/<class>/<image> files.")
    splits = {split: _subfolders(os.path.join(root, split)) for split in _subfolders(root)}
    for split, classes in sorted(splits.items(), key=lambda item: (item[0] != "train", item)):
        if not classes:
            raise BadDataError(f"{os.path.join(root, split)} holds no class folders.")
        for name in classes:
            folder = os.path.join(root, split, name)
            if not any(f.lower().endswith(_IMAGE_EXTENSIONS) for f in os.listdir(folder)):
                raise BadDataError(f"Class folder {folder} holds no PNG or JPEG images: every "
                                   "class needs images in every split.")
        if classes != splits["train"]:
            only = [sorted(a - b) or "none" for a, b in ((splits["train"], classes),
                                                         (classes, splits["train"]))]
            raise BadDataError(f"Image folder {root}: train/ and {split}/ have different class "
                               f"folders (only in train/: {only[0]}; only in {split}/: "
                               f"{only[1]}): every split needs the same classes.")


def _subfolders(folder):
    """The set of names of the folders in `folder`."""
    return {e.name for e in os.scandir(folder) if e.is_dir()}


def _read_split(builder, split):
    """All of a split as (uint8 images [N, H, W, C], int32 labels [N]) arrays."""
    ds = builder.as_dataset(split=split, as_supervised=True).batch(_READ_BATCH)
    try:
        images, labels = zip(*tfds.as_numpy(ds))
    except tf.errors.OpError:
        if isinstance(builder, tfds.ImageFolder):
            _raise_for_bad_image(builder, split)
        raise
    return np.concatenate(images), np.concatenate(labels).astype(np.int32)


def _raise_for_bad_image(builder, split):
    """Decode an image folder's split one by one; raise BadDataError naming the first bad file.

    The TFDS pipeline's error does not say which file failed.
    """
    raw = builder.as_dataset(split=split, decoders={"image": tfds.decode.SkipDecoding()})
    first_shape = None
    for example in tfds.as_numpy(raw):
        filename = example["image/filename"].decode()
        try:
            shape = tf.io.decode_image(example["image"], channels=3).shape
        except tf.errors.OpError as e:
            raise BadDataError(f"Cannot decode image {filename}: {e.message}") from None
        if first_shape is None:
            first_shape = shape
        elif shape != first_shape:
            raise BadDataError(f"Image {filename} has shape {shape}, the others {first_shape}")


def _extract(archive, data_dir=None):
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


def balanced_subset(labels, max_examples, seed):
    """Sorted indices of at most `max_examples` labels, drawn at random class by class.

    Every class gets the same count (give or take one); a class with too few examples gives
    all it has and the others make up the rest. None or a large enough `max_examples`: all.
    """
    if max_examples is None or max_examples >= len(labels):
        return np.arange(len(labels))
    order = np.random.default_rng(seed).permutation(len(labels))
    rank = np.empty(len(labels), np.int64)  # rank[i]: i's place among its class in `order`
    for c in np.unique(labels):
        members = order[labels[order] == c]
        rank[members] = np.arange(len(members))
    return np.sort(order[np.argsort(rank[order], kind="stable")][:max_examples])


def steps_per_epoch(num_examples, batch_size):
    """The number of full batches in an epoch (the last partial batch is dropped)."""
    return num_examples // batch_size


def train_dataset(x, y, batch_size, seed, epoch, skip_batches=0, augment=True, num_shards=1,
                  shard=0):
    """One epoch of shuffled training batches: (float32 images in [0, 1], int32 labels).

    The order is a permutation drawn from (seed, epoch) alone, and the augmentation of each
    example (zero padding by `PAD`, a random crop back to the image size, a random horizontal
    flip) uses stateless random ops keyed by (seed, epoch, position in the epoch). The epoch
    is therefore the same on every run, and `skip_batches=k` gives exactly its batches k, k+1,
    ... without reading the first k. The last partial batch is dropped.

    With `num_shards` > 1 (one shard per worker of a multi-worker job), `batch_size` is the
    global batch: shard `shard` gets its `batch_size / num_shards` slice of every global
    batch, so the workers together see exactly the batches of one machine.
    """
    if batch_size % num_shards:
        raise ValueError(f"The global batch size {batch_size} is not a multiple of the "
                         f"{num_shards} workers.")
    end = steps_per_epoch(len(x), batch_size) * batch_size
    start = min(skip_batches * batch_size, end)
    order = np.random.default_rng([seed, epoch]).permutation(len(x))[start:end]
    positions = np.arange(start, end)
    local = batch_size // num_shards
    if num_shards > 1:  # [batch, shard, example] -> this shard's examples, batch by batch
        mine = np.arange(len(order)).reshape(-1, num_shards, local)[:, shard].ravel()
        order, positions = order[mine], positions[mine]
    epoch_key = tf.constant([seed, epoch], tf.int64)

    def prepare(image, label, position):
        if augment:
            image = _augment(image, tf.random.fold_in(epoch_key, position))
        return _to_float(image), label

    ds = tf.data.Dataset.from_tensor_slices((x[order], y[order].astype(np.int32), positions))
    ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE)  # keeps the order
    return ds.batch(local, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


def _augment(image, key):
    """Pad by `PAD` zeros, crop back to the image's size at random, flip left-right at random.

    `key` is a stateless seed (int64 [2]); the same key gives the same result.
    """
    crop_key, flip_key = tf.unstack(tf.random.split(key))
    padded = tf.pad(image, [[PAD, PAD], [PAD, PAD], [0, 0]])
    image = tf.image.stateless_random_crop(padded, image.shape, seed=crop_key)
    return tf.image.stateless_random_flip_left_right(image, seed=flip_key)


def _to_float(image):
    """uint8 pixels to float32 in [0, 1]."""
    return tf.cast(image, tf.float32) / 255.0


def pixels(x):
    """Float32 pixels in [0, 1] (a NumPy array) from uint8 images or floats."""
    x = np.asarray(x)
    return (x / 255.0 if x.dtype == np.uint8 else x).astype(np.float32)
