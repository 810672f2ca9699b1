"""Datasets as uint8 arrays, and the pipelines that feed them to training.

`load(dataset)` reads one of:

- `"bundled"` (the default): a class-balanced random sample of the CIFAR-10 JPEGs that ships
  inside the package (500 train and 100 test images per class; `bundled/README.md`);
- a TFDS name from `TFDS_NAMES`, prepared in (or downloaded into) `data_dir`;
- a folder of `train/<class>/<image>` and `test/<class>/<image>` files (PNG or JPEG), the
  same classes in both splits, an image or more in each class folder, hidden files and
  folders skipped (`sparta_tf/image_folder.py` lists and decodes it);
- a `.tar.gz` of such a folder, extracted once into a per-user cache that only its owner
  writes, keyed by its sha256 and checked on reuse; its members and its expanded size are
  bounded, and a refused archive leaves nothing behind (`sparta_tf/archive.py`).

`max_train` and `max_test` take a class-balanced random sample of a split; asking for more
images than the split has is an error, not a silent "all of them". `splits=("test",)` reads
the test split alone (evaluation needs no training images).

`train_dataset` (a tf.data pipeline, for TensorFlow) and `numpy_batches` (NumPy, for the
other Keras backends) give one epoch of augmented batches that depends only on (seed, epoch),
and can start at any batch of that epoch, so a killed run resumes on exactly the same data.
Images go out as float32 pixels in [0, 1]: models normalise inside themselves.

Without TensorFlow. Image folders, archives and the bundled sample need no TensorFlow: when
the Keras backend is not TensorFlow they are decoded with Pillow. TensorFlow and
tensorflow_datasets are imported only by what needs them (a TFDS name, `train_dataset`, the
TensorFlow decoder), so this module imports, and `load` reads image folders, on a machine
without them. The two decoders give the same PNG pixels and the same images, labels, class
names and order, but not the same JPEG pixels: TensorFlow's JPEG decoder uses libjpeg's fast
integer DCT (`tf.io.decode_jpeg`'s default), Pillow the accurate one, so a JPEG pixel may
differ by a few grey levels (on CIFAR-10's JPEGs and the bundled sample: 65% of the values
differ, by 0.99 on average and 5 at most). Pillow's pixels are exactly TensorFlow's with
`dct_method="INTEGER_ACCURATE"`. TensorFlow keeps its decoder, so its numbers do not move.
Both accept and refuse the same files (`image_folder.check_header`).

This module imports nothing of `sparta_tf` but `image_folder` and `archive`, which read
image folders and archives for it.
"""

import dataclasses
import os
import socket
import urllib.parse

import numpy as np

from sparta_tf import archive, image_folder
from sparta_tf.image_folder import BadDataError  # noqa: F401  (raised by load; users catch it here)

TFDS_NAMES = ("cifar10", "cifar100", "svhn_cropped")
BUNDLED_ARCHIVE = os.path.join(os.path.dirname(__file__), "bundled", "cifar10_sample.tar.gz")
SPLITS = ("train", "test")
PAD = 4  # pixels of zero padding before the random crop
_CONNECT_TIMEOUT_S = 5


class DatasetUnavailableError(RuntimeError):
    """A dataset is neither on disk nor downloadable from here."""


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


def load(dataset="bundled", data_dir=None, max_train=None, max_test=None, seed=0,
         splits=SPLITS, max_extract_gb=archive.MAX_EXTRACT_GB,
         max_extract_ratio=archive.MAX_EXTRACT_RATIO):
    """Read a dataset into a `Data`.

    Image folders, archives and "bundled" need no TensorFlow: with the TensorFlow Keras
    backend their images are decoded by TensorFlow, with any other by Pillow (the module
    docstring says how their JPEG pixels differ). A TFDS name needs TensorFlow.

    Args:
      dataset: "bundled", a name in `TFDS_NAMES`, or the path of a folder or .tar.gz of
        `train/<class>/<image>` and `test/<class>/<image>` files.
      data_dir: TFDS's data folder for a TFDS name (None: TFDS's default); for "bundled" or
        a .tar.gz, the folder to keep its cache under (None: `archive.cache_root`'s).
      max_train, max_test: keep this many examples of the split, a class-balanced random
        sample drawn with `seed` (None: keep all). Of an image folder or archive, only the
        kept images are decoded (and so checked).
      seed: the seed of those samples.
      splits: the splits to read, of `SPLITS`; a split left out is not read and is empty
        in the `Data` (0 images of the read split's shape), so `splits=("test",)` reads the
        test images alone. What is read is the same as with both splits.
      max_extract_gb, max_extract_ratio: an archive's expansion limits (`archive.extract`).

    Raises:
      ValueError: `splits` is empty or names a split not in `SPLITS`, `max_train` or
        `max_test` is less than 1, or an archive's max_extract_* limit is not above 0.
      DatasetUnavailableError: a TFDS dataset is not prepared and cannot be downloaded.
      BadDataError: `dataset` is none of the above; it is a TFDS name and TensorFlow is not
        the Keras backend or cannot be imported; an image is refused by
        `image_folder.check_header`, cannot be decoded or has another shape than the first;
        an image folder lacks train/ or test/, has a class folder with no images, or has
        different classes in its splits; the archive or its cache folder is refused
        (`archive.extract`); or `max_train` or `max_test` is more than its split has.
    """
    if not splits or not set(splits) <= set(SPLITS):
        raise ValueError(f"splits must be some of {SPLITS}; got {splits!r}.")
    for name, value in (("max_train", max_train), ("max_test", max_test)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be at least 1 (None: all); got {value}.")
    limits = dict(zip(SPLITS, (max_train, max_test)))
    out = {}
    if dataset in TFDS_NAMES:
        arrays, class_names = _read_tfds(dataset, data_dir, splits)
        for split, (x, y) in arrays.items():
            keep = _sample(y, limits[split], seed, split, dataset)
            out[split] = x[keep], y[keep]
    else:  # only the sampled images are decoded
        bounds = {"max_bytes": max_extract_gb * archive.GB, "max_ratio": max_extract_ratio}
        folder = image_folder.read(_folder(dataset, data_dir, bounds))
        decode = (image_folder.decode_tensorflow if _keras_backend() == "tensorflow"
                  else image_folder.decode_pillow)
        for split in (s for s in SPLITS if s in splits):
            y = folder.labels[split]
            keep = _sample(y, limits[split], seed, split, dataset)
            out[split] = decode([folder.paths[split][i] for i in keep]), y[keep]
        class_names = folder.class_names
    shape = next(iter(out.values()))[0].shape[1:]
    empty = np.zeros((0, *shape), np.uint8), np.zeros((0,), np.int32)
    out = {split: out.get(split, empty) for split in SPLITS}
    return Data(name=dataset, x_train=out["train"][0], y_train=out["train"][1],
                x_test=out["test"][0], y_test=out["test"][1], class_names=list(class_names))


def _folder(dataset, data_dir, limits):
    """The image folder of "bundled", a folder or a .tar.gz (`archive.extract`, `limits`).

    Raises:
      BadDataError: `dataset` is none of them, or an archive cannot be extracted.
    """
    if dataset == "bundled":
        return archive.extract(BUNDLED_ARCHIVE, data_dir, **limits)
    if os.path.isdir(dataset):
        return dataset
    if os.path.isfile(dataset) and dataset.endswith((".tar.gz", ".tgz")):
        return archive.extract(dataset, data_dir, **limits)
    raise BadDataError(
        f"Unknown dataset {dataset!r}: use 'bundled' (the CIFAR-10 sample in the "
        f"package), a TFDS name in {TFDS_NAMES}, or the path of an existing folder or "
        ".tar.gz of train/<class>/<image> and test/<class>/<image> files.")


def _keras_backend():
    """The name of the Keras backend ("tensorflow", "jax", ...), or None where Keras cannot
    be imported (image folders are then read with Pillow)."""
    try:
        import keras  # pylint: disable=import-outside-toplevel
    except ImportError:
        return None
    return keras.backend.backend()


def _sample(labels, max_examples, seed, split, dataset):
    """`balanced_subset(labels, max_examples, seed)`, if the split has `max_examples` labels.

    Raises:
      BadDataError: `max_examples` is more than the split has.
    """
    if max_examples is not None and max_examples > len(labels):
        raise BadDataError(f"max_{split}={max_examples} but the {split} split of {dataset} has "
                           f"{len(labels)} images; leave it out to use all of them.")
    return balanced_subset(labels, max_examples, seed)


def _read_tfds(name, data_dir, splits):
    """{split: (images, labels)} for the TFDS dataset `name`'s `splits`, and its class names.

    Raises:
      BadDataError: the Keras backend is not TensorFlow, or TensorFlow or tensorflow_datasets
        cannot be imported.
      DatasetUnavailableError: see `_tfds_builder`.
    """
    backend = _keras_backend()
    why = None
    if backend is None:
        why = "Keras cannot be imported here"
    elif backend != "tensorflow":
        why = f"the Keras backend is {backend!r}"
    else:
        try:
            import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
        except ImportError as e:
            why = f"tensorflow_datasets cannot be imported here ({type(e).__name__}: {e})"
    if why:
        raise BadDataError(
            f"TFDS dataset {name!r} needs TensorFlow (the Keras backend) and "
            f"tensorflow_datasets, and {why}. Without TensorFlow, use a folder or .tar.gz of "
            "train/<class>/<image> and test/<class>/<image> files (--dataset=/path/to/"
            "folder_or.tar.gz), e.g. the CIFAR-10 archive layout top/train/airplane/0001.jpg, "
            "or the bundled CIFAR-10 sample (--dataset=bundled).")
    builder = _tfds_builder(tfds, name, data_dir)
    arrays = {split: _read_tfds_split(tfds, builder, split) for split in splits}
    return arrays, builder.info.features["label"].names


def _tfds_builder(tfds, name, data_dir):
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


def _read_tfds_split(tfds, builder, split):
    """All of a TFDS split as (uint8 images [N, H, W, C], int32 labels [N]) arrays."""
    ds = builder.as_dataset(split=split, as_supervised=True).batch(image_folder.READ_BATCH)
    x, y = zip(*tfds.as_numpy(ds))
    return np.concatenate(x), np.concatenate(y).astype(np.int32)


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


def _epoch_order(num_examples, batch_size, seed, epoch, skip_batches):
    """The example indices of an epoch's batches from `skip_batches` on, and their positions
    in the epoch: a permutation drawn from (seed, epoch) alone, its last partial batch
    dropped."""
    end = steps_per_epoch(num_examples, batch_size) * batch_size
    start = min(skip_batches * batch_size, end)
    order = np.random.default_rng([seed, epoch]).permutation(num_examples)[start:end]
    return order, np.arange(start, end)


def train_dataset(x, y, batch_size, seed, epoch, skip_batches=0, augment=True, num_shards=1,
                  shard=0):
    """One epoch of shuffled training batches: (float32 images in [0, 1], int32 labels), as
    a `tf.data.Dataset` (TensorFlow; `numpy_batches` is the same without it).

    The order is a permutation drawn from (seed, epoch) alone, and the augmentation of each
    example (zero padding by `PAD`, a random crop back to the image size, a random horizontal
    flip) uses stateless random ops keyed by (seed, epoch, position in the epoch). The epoch
    is therefore the same on every run, and `skip_batches=k` gives exactly its batches k, k+1,
    ... without reading the first k. The last partial batch is dropped.

    With `num_shards` > 1 (one shard per worker of a multi-worker job), `batch_size` is the
    global batch: shard `shard` gets its `batch_size / num_shards` slice of every global
    batch, so the workers together see exactly the batches of one machine.
    """
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    if batch_size % num_shards:
        raise ValueError(f"The global batch size {batch_size} is not a multiple of the "
                         f"{num_shards} workers.")
    order, positions = _epoch_order(len(x), batch_size, seed, epoch, skip_batches)
    local = batch_size // num_shards
    if num_shards > 1:  # [batch, shard, example] -> this shard's examples, batch by batch
        mine = np.arange(len(order)).reshape(-1, num_shards, local)[:, shard].ravel()
        order, positions = order[mine], positions[mine]
    epoch_key = tf.constant([seed, epoch], tf.int64)

    def prepare(image, label, position):
        if augment:
            image = _augment(image, tf.random.fold_in(epoch_key, position))
        return tf.cast(image, tf.float32) / 255.0, label

    ds = tf.data.Dataset.from_tensor_slices((x[order], y[order].astype(np.int32), positions))
    ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE)  # keeps the order
    return ds.batch(local, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


def _augment(image, key):
    """Pad by `PAD` zeros, crop back to the image's size at random, flip left-right at random.

    `key` is a stateless seed (int64 [2]); the same key gives the same result.
    """
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    crop_key, flip_key = tf.unstack(tf.random.split(key))
    padded = tf.pad(image, [[PAD, PAD], [PAD, PAD], [0, 0]])
    image = tf.image.stateless_random_crop(padded, image.shape, seed=crop_key)
    return tf.image.stateless_random_flip_left_right(image, seed=flip_key)


def numpy_batches(x, y, batch_size, seed, epoch, skip_batches=0, augment=True):
    """One epoch of shuffled training batches as NumPy arrays: (float32 images [B, H, W, C]
    in [0, 1], int32 labels [B]), for the Keras backends other than TensorFlow.

    `train_dataset`'s epoch without TensorFlow: the same order (the permutation drawn from
    (seed, epoch) alone, so the same examples in the same batches), the same augmentation
    (zero padding by `PAD`, a random crop back to the image size, a random horizontal flip),
    `skip_batches=k` gives exactly batches k, k+1, ... of the epoch, and the last partial
    batch is dropped. The random crop and flip of each example are not TensorFlow's
    stateless ops but a hash of (seed, epoch, position in the epoch), see `_crop_and_flip`:
    deterministic, and the same whatever the batch size or `skip_batches`.

    A generator: each batch is gathered, augmented and converted when it is asked for.
    """
    x = np.asarray(x)
    order, positions = _epoch_order(len(x), batch_size, seed, epoch, skip_batches)
    for start in range(0, len(order), batch_size):
        index = order[start:start + batch_size]
        images = x[index]
        if augment:
            images = _crop_and_flip(images, seed, epoch, positions[start:start + batch_size])
        yield pixels(images), np.asarray(y)[index].astype(np.int32)


_MASK64 = (1 << 64) - 1


def _mix64(values):
    """SplitMix64's finaliser on uint64 values: a bijection that scatters every input bit
    over every output bit (Steele, Lea and Flood, OOPSLA 2014)."""
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps, as intended
        values = (values ^ (values >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        values = (values ^ (values >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return values ^ (values >> np.uint64(31))


def _crop_and_flip(images, seed, epoch, positions):
    """`images` [B, H, W, C] (uint8) zero-padded by `PAD`, cropped back at random and flipped
    left-right at random, example i keyed by (seed, epoch, positions[i]) alone.

    The key: h = mix64(mix64(mix64(seed) + epoch) + position) with SplitMix64's finaliser
    (64-bit wrapping arithmetic; seed and epoch taken modulo 2**64). The crop's row offset
    is (h mod 2**21) mod (2 PAD + 1), its column offset ((h >> 21) mod 2**21) mod (2 PAD +
    1), and the image is flipped when bit 42 of h is set. One gather per batch does it all.
    """
    images = np.asarray(images)
    count, height, width = images.shape[:3]
    with np.errstate(over="ignore"):
        key = _mix64(np.uint64(int(seed) & _MASK64))
        key = _mix64(key + np.uint64(int(epoch) & _MASK64))
        h = _mix64(key + np.asarray(positions).astype(np.uint64))
    span = np.uint64(2 * PAD + 1)
    bits21 = np.uint64((1 << 21) - 1)
    top = ((h & bits21) % span).astype(np.intp)
    left = (((h >> np.uint64(21)) & bits21) % span).astype(np.intp)
    flip = ((h >> np.uint64(42)) & np.uint64(1)).astype(bool)
    padded = np.pad(images, [(0, 0), (PAD, PAD), (PAD, PAD), (0, 0)])
    rows = top[:, None] + np.arange(height)                        # [B, H]
    columns = np.where(flip[:, None], np.arange(width)[::-1], np.arange(width))
    columns = left[:, None] + columns                              # [B, W]
    return padded[np.arange(count)[:, None, None], rows[:, :, None], columns[:, None, :]]


def pixels(x):
    """Float32 pixels in [0, 1] (a NumPy array) from uint8 images or floats."""
    x = np.asarray(x)
    return (x / 255.0 if x.dtype == np.uint8 else x).astype(np.float32)
