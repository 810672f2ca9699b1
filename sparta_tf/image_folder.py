"""Image folders on disk: the split/class/image files of a dataset, read into arrays.

A folder of `train/<class>/<image>` and `test/<class>/<image>` files (PNG or JPEG), with the
same classes in both splits and at least one image in each class folder. `read` lists
it (and checks its class folders), `decode_tensorflow` and `decode_pillow` decode a list of
its files. `sparta_tf.data.load` uses them; the module docstring there says how the two
decoders' JPEG pixels differ.

This module imports nothing else of `sparta_tf`, and TensorFlow only in `decode_tensorflow`.
"""

import concurrent.futures
import dataclasses
import os
import random

import numpy as np

READ_BATCH = 4096  # images per batch when a split is read into arrays


class BadDataError(ValueError):
    """An unknown dataset name, or an image file, folder or archive that cannot be read."""


@dataclasses.dataclass
class ImageFolder:
    """The images of a split/class/image folder: `paths[split]` (a list) and
    `labels[split]` (int32 [N]) for "train" and "test", in `tfds.ImageFolder`'s order."""

    root: str
    class_names: list
    paths: dict
    labels: dict


def read(root):
    """The `ImageFolder` of the split/class/image files under `root` (or under its only
    folder, an archive's top folder), its class folders checked.

    The class names are the sorted folder names (for CIFAR-10, its label order), and the
    order of a split's images is `tfds.ImageFolder`'s, which `sparta_tf.data` used before it
    could read without TensorFlow, so that `data.balanced_subset` picks the same images:
    class by class in that order, each class's file names sorted, then the whole list
    shuffled by `random.Random(split).shuffle` (a seed of the split's name).
    """
    entries = os.listdir(root)
    if len(entries) == 1 and entries[0] not in ("train", "test"):  # an archive's top folder
        root = os.path.join(root, entries[0])
    _check_class_folders(root)
    class_names = sorted(_subfolders(os.path.join(root, "train")))
    paths, labels = {}, {}
    for split in ("train", "test"):
        examples = []
        for label, name in enumerate(class_names):
            folder = os.path.join(root, split, name)
            examples += [(os.path.join(folder, f), label) for f in sorted(os.listdir(folder))
                         if f.lower().endswith(_IMAGE_EXTENSIONS)]
        random.Random(split).shuffle(examples)
        paths[split] = [path for path, _ in examples]
        labels[split] = np.array([label for _, label in examples], np.int32)
    return ImageFolder(root, class_names, paths, labels)


_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")  # those tfds.ImageFolder reads


def _check_class_folders(root):
    """Check that `root` has train/ and test/ folders, and that every split folder holds the
    same class folders, each with at least one image.

    A class folder missing from a split, or one with no images, would quietly give a class
    that is never trained or tested.

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


def decode_tensorflow(paths):
    """The images of `paths` as uint8 [N, H, W, 3], decoded as `tfds.ImageFolder` decodes them
    (`tf.image.decode_image`, 3 channels), in parallel.

    Raises:
      BadDataError: naming the first file that cannot be decoded or has another shape than
        the first.
    """
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    def decode(path):
        image = tf.image.decode_image(tf.io.read_file(path), channels=3, dtype=tf.uint8)
        image.set_shape((None, None, 3))
        return image

    ds = tf.data.Dataset.from_tensor_slices(paths)
    ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE).batch(READ_BATCH)  # in order
    try:
        return np.concatenate(list(ds.as_numpy_iterator()))
    except tf.errors.OpError:  # its message does not say which file failed: find it
        first_shape = None
        for path in paths:
            try:
                shape = tuple(decode(path).shape)
            except tf.errors.OpError as e:
                raise BadDataError(f"Cannot decode image {path}: {e.message}") from None
            if first_shape is None:
                first_shape = shape
            elif shape != first_shape:
                raise BadDataError(f"Image {path} has shape {shape}, the others "
                                   f"{first_shape}") from None
        raise


_DECODE_CHUNK = 512  # images per task of the Pillow decoder's threads


def decode_pillow(paths):
    """The images of `paths` as uint8 [N, H, W, 3], decoded by Pillow (converted to RGB as
    TensorFlow's 3-channel decoding does: grey repeated, alpha dropped), by a few threads
    (Pillow's decoders release the GIL).

    Raises:
      BadDataError: naming the first file that cannot be decoded or has another shape than
        the first.
    """
    from PIL import Image  # pylint: disable=import-outside-toplevel

    def read(path):
        try:
            with Image.open(path) as image:
                return np.asarray(image.convert("RGB"))
        except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError, ...
            cause = " ".join(str(e).split())
            raise BadDataError(f"Cannot decode image {path}: {type(e).__name__}: "
                               f"{cause}") from None

    first = read(paths[0])
    out = np.empty((len(paths),) + first.shape, np.uint8)

    def fill(start):
        for i in range(start, min(start + _DECODE_CHUNK, len(paths))):
            image = read(paths[i])
            if image.shape != first.shape:
                raise BadDataError(f"Image {paths[i]} has shape {image.shape}, the others "
                                   f"{first.shape}")
            out[i] = image

    workers = min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                  else os.cpu_count() or 1)
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        for done in [pool.submit(fill, start) for start in range(0, len(paths), _DECODE_CHUNK)]:
            done.result()  # in order: the first bad file (in order) is the one named
    return out
