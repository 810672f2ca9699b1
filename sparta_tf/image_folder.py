"""Image folders on disk: the split/class/image files of a dataset, read into arrays.

A folder of `train/<class>/<image>` and `test/<class>/<image>` files (PNG or JPEG), with the
same classes in both splits and at least one image in each class folder. Hidden files and
folders (names starting with ".", such as `.ipynb_checkpoints/` or `.DS_Store`) are skipped
at every level, as Keras's `image_dataset_from_directory` skips them. `read` lists it (and
checks its class folders), `decode_tensorflow` and `decode_pillow` decode a list of its
files. `sparta_tf.data.load` uses them; the module docstring there says how the two
decoders' JPEG pixels differ.

The two decoders accept and refuse the same files: both first read each file's header
(`check_header`), so a file is decoded only if its content is PNG or JPEG (the content
decides, not the extension, as `tf.image.decode_image` does: a JPEG named `.png` is read,
a GIF named `.png` is refused), and has at most `MAX_IMAGE_PIXELS` pixels (Pillow's
default limit; TensorFlow has none), so a small file that would decode to gigabytes is
refused before anything is allocated.

This module imports nothing else of `sparta_tf`, and TensorFlow only in `decode_tensorflow`.
"""

import concurrent.futures
import dataclasses
import os
import random
import re
import stat
import struct
import zlib

import numpy as np

READ_BATCH = 4096  # images per batch when a split is read into arrays
MAX_IMAGE_PIXELS = 89_478_485  # width x height at most: PIL.Image.MAX_IMAGE_PIXELS's default


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
    shuffled by `random.Random(split).shuffle` (a seed of the split's name). Hidden files
    and folders are skipped.
    """
    entries = _visible(os.listdir(root))
    if (len(entries) == 1 and entries[0] not in ("train", "test")
            and os.path.isdir(os.path.join(root, entries[0]))):  # an archive's top folder
        root = os.path.join(root, entries[0])
    _check_class_folders(root)
    class_names = sorted(_subfolders(os.path.join(root, "train")))
    paths, labels = {}, {}
    for split in ("train", "test"):
        examples = []
        for label, name in enumerate(class_names):
            folder = os.path.join(root, split, name)
            examples += [(os.path.join(folder, f), label)
                         for f in sorted(os.listdir(folder)) if _is_image_name(f)]
        random.Random(split).shuffle(examples)
        paths[split] = [path for path, _ in examples]
        labels[split] = np.array([label for _, label in examples], np.int32)
    return ImageFolder(root, class_names, paths, labels)


_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")  # those tfds.ImageFolder reads


def _visible(names):
    """The names of `names` that are not hidden (do not start with ".")."""
    return [name for name in names if not name.startswith(".")]


def _is_image_name(name):
    """Whether the file `name` is read as an image: not hidden, and a PNG or JPEG extension."""
    return not name.startswith(".") and name.lower().endswith(_IMAGE_EXTENSIONS)


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
            if not any(_is_image_name(f) for f in os.listdir(folder)):
                raise BadDataError(f"Class folder {folder} holds no PNG or JPEG images: every "
                                   "class needs images in every split.")
        if classes != splits["train"]:
            only = [sorted(a - b) or "none" for a, b in ((splits["train"], classes),
                                                         (classes, splits["train"]))]
            raise BadDataError(f"Image folder {root}: train/ and {split}/ have different class "
                               f"folders (only in train/: {only[0]}; only in {split}/: "
                               f"{only[1]}): every split needs the same classes.")


def _subfolders(folder):
    """The set of names of the folders in `folder`, hidden ones left out."""
    return {e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith(".")}


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}
# JPEG frame markers: baseline, extended and progressive Huffman coding, which both
# decoders read; the others (lossless, arithmetic coding, hierarchical) are refused by both.
_JPEG_FRAMES = (0xC0, 0xC1, 0xC2)
_JPEG_OTHER_FRAMES = (0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF)
_JPEG_NO_LENGTH = (0x01, *range(0xD0, 0xD9))  # TEM, RST0-7, SOI: markers without a segment
_OTHER_FORMATS = ((b"GIF8", "GIF"), (b"BM", "BMP"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"),
                  (b"RIFF", "WebP or another RIFF"), (b"\x00\x00\x01\x00", "ICO"))


def check_header(path):
    """The format ("PNG" or "JPEG"), width and height of the image file `path`, read from
    its header alone (a few bytes, whatever the file's size).

    Both decoders call it first, so that they accept and refuse the same files.

    Raises:
      BadDataError: the file cannot be read or is not a regular file, its content is
        neither PNG nor JPEG (whatever its extension), its header is broken or names a
        kind of PNG or JPEG that not both decoders read, or it has more than
        `MAX_IMAGE_PIXELS` pixels.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO would block an open
        with open(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise _Broken("it is not a regular file (a device, FIFO or socket)")
            start = f.read(8)
            if start == _PNG_SIGNATURE:
                kind, (width, height) = "PNG", _png_size(f)
            elif start[:3] == b"\xff\xd8\xff":
                kind, (width, height) = "JPEG", _jpeg_size(f)
            else:
                other = next((name for magic, name in _OTHER_FORMATS
                              if start.startswith(magic)), None)
                what = f"{other} content" if other else "neither PNG nor JPEG content"
                raise _Broken(f"it holds {what} (the content decides, not the extension); "
                              "convert it to PNG or JPEG")
    except OSError as e:
        raise BadDataError(f"Cannot read image {path}: {e.strerror or e}.") from None
    except _Broken as e:
        raise BadDataError(f"Cannot decode image {path}: {e}.") from None
    if width * height > MAX_IMAGE_PIXELS:
        raise BadDataError(f"Image {path} is {width} x {height} pixels, more than the limit "
                           f"of {MAX_IMAGE_PIXELS:,} (Pillow's): it is refused, not decoded; "
                           "shrink it first.")
    return kind, width, height


class _Broken(Exception):
    """An image header that the decoders would not read: the message says why."""


def _png_size(f):
    """(width, height) of the PNG file `f`, read past its signature, from its IHDR chunk."""
    chunk = f.read(25)  # length, "IHDR", 13 bytes of data, CRC
    if len(chunk) < 25 or chunk[:8] != b"\x00\x00\x00\x0dIHDR":
        raise _Broken("its PNG header is truncated or has no IHDR chunk first")
    if zlib.crc32(chunk[4:21]) != struct.unpack(">I", chunk[21:25])[0]:
        raise _Broken("its PNG header (IHDR) fails its checksum")
    width, height, depth, colour = struct.unpack(">IIBB", chunk[8:18])
    if not (0 < width < 2**31 and 0 < height < 2**31):
        raise _Broken(f"its PNG header gives an invalid size of {width} x {height} pixels")
    if depth not in _PNG_DEPTHS.get(colour, ()):
        raise _Broken(f"its PNG header gives an invalid colour type {colour} with bit "
                      f"depth {depth}")
    return width, height


def _jpeg_size(f):
    """(width, height) of the JPEG file `f`, from its frame header (SOF): the segments
    before it are skipped by their lengths, so a large EXIF block costs no reading."""
    f.seek(2)  # past SOI
    while True:
        head = f.read(2)
        while head[:1] == b"\xff" and head[1:] == b"\xff":  # fill bytes before a marker
            head = head[1:] + f.read(1)
        if len(head) < 2:
            raise _Broken("it is a JPEG that ends before its frame header (truncated)")
        if head[0] != 0xFF:
            raise _Broken(f"it is a JPEG with bytes that are not a marker at offset "
                          f"{f.tell() - 2}")
        marker = head[1]
        if marker in _JPEG_NO_LENGTH:
            continue
        if marker in (0xD9, 0xDA):  # EOI, SOS: image data with no frame header before it
            raise _Broken("it is a JPEG with no frame header")
        length = f.read(2)
        if len(length) < 2 or struct.unpack(">H", length)[0] < 2:
            raise _Broken("it is a JPEG with a truncated or invalid segment")
        length = struct.unpack(">H", length)[0]
        if marker in _JPEG_OTHER_FRAMES:
            raise _Broken(f"it is a JPEG of coding process 0x{marker:02X} (lossless, "
                          "arithmetic or hierarchical); only baseline, extended and "
                          "progressive JPEG are read")
        if marker in _JPEG_FRAMES:
            frame = f.read(6)
            if len(frame) < 6:
                raise _Broken("it is a JPEG whose frame header is truncated")
            precision, height, width, components = struct.unpack(">BHHB", frame)
            if precision != 8 or components not in (1, 3, 4) or not (width and height):
                raise _Broken(f"it is a JPEG of {precision}-bit samples, {components} "
                              f"components and {width} x {height} pixels; only 8-bit "
                              "samples, 1, 3 or 4 components and a size in the header "
                              "are read")
            return width, height
        f.seek(length - 2, os.SEEK_CUR)


def decode_tensorflow(paths):
    """The images of `paths` as uint8 [N, H, W, 3], decoded as `tfds.ImageFolder` decodes them
    (`tf.image.decode_image`, 3 channels), in parallel, each file's header checked first
    (`check_header`).

    Raises:
      BadDataError: naming the first file that `check_header` refuses, that cannot be
        decoded, or that has another shape than the first.
    """
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    _check_headers(paths)

    def decode(path):
        image = tf.image.decode_image(tf.io.read_file(path), channels=3, dtype=tf.uint8,
                                      expand_animations=False)
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
                cause = re.sub(r"\{\{[^}]*\}\}|\[Op:\w+\]( name:)?", "", e.message)
                cause = " ".join(cause.split())  # on one line, without TensorFlow's tags
                raise BadDataError(f"Cannot decode image {path}: {cause}") from None
            if first_shape is None:
                first_shape = shape
            elif shape != first_shape:
                raise BadDataError(f"Image {path} has shape {shape}, the others "
                                   f"{first_shape}") from None
        raise


_DECODE_CHUNK = 512  # images per task of the decoders' threads


def _workers():
    """The number of threads that read or decode images: the usable cores, at most 8."""
    return min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
               else os.cpu_count() or 1)


def _check_headers(paths):
    """`check_header` of every path, by a few threads.

    Raises:
      BadDataError: naming the first file (in order) that `check_header` refuses.
    """
    def check(start):
        for path in paths[start:start + _DECODE_CHUNK]:
            check_header(path)

    with concurrent.futures.ThreadPoolExecutor(_workers()) as pool:
        for done in [pool.submit(check, start) for start in range(0, len(paths), _DECODE_CHUNK)]:
            done.result()  # in order: the first bad file (in order) is the one named


def decode_pillow(paths):
    """The images of `paths` as uint8 [N, H, W, 3], decoded by Pillow (converted to RGB as
    TensorFlow's 3-channel decoding does: grey repeated, alpha dropped, 16-bit grey cut to
    its high byte), by a few threads (Pillow's decoders release the GIL), each file's
    header checked first (`check_header`).

    Raises:
      BadDataError: naming the first file that `check_header` refuses, that cannot be
        decoded, or that has another shape than the first.
    """
    from PIL import Image  # pylint: disable=import-outside-toplevel

    def read(path):
        kind = check_header(path)[0]
        try:
            with Image.open(path, formats=(kind,)) as image:
                if image.mode.startswith("I"):  # 16-bit grey: TensorFlow keeps the high byte
                    grey = (np.asarray(image).astype(np.uint32) >> 8).astype(np.uint8)
                    return np.repeat(grey[..., None], 3, axis=-1)
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

    with concurrent.futures.ThreadPoolExecutor(_workers()) as pool:
        for done in [pool.submit(fill, start) for start in range(0, len(paths), _DECODE_CHUNK)]:
            done.result()  # in order: the first bad file (in order) is the one named
    return out
