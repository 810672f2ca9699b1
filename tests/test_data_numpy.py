"""Tests of sparta_tf.data without TensorFlow: the Pillow reader, `numpy_batches`, and
`load` in a process where TensorFlow cannot be imported (the JAX backend)."""

import io
import itertools
import json
import os
import struct
import subprocess
import sys
import tarfile
import textwrap
import zlib

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from conftest import jax_without_tensorflow, needs_jax
from sparta_tf import archive, data, image_folder

CLASSES = ["ant", "cat", "dog"]


@pytest.fixture(name="pillow")
def _pillow(monkeypatch):
    """`data.load` as on a backend other than TensorFlow: images decoded by Pillow."""
    monkeypatch.setattr(data, "_keras_backend", lambda: "jax")


def _write_folder(root, per_split=(("train", 4), ("test", 2)), size=8):
    """A split/class/image folder of textured images, PNG and JPEG (and one grey PNG)."""
    rng = np.random.default_rng(0)
    for split, count in per_split:
        for name in reversed(CLASSES):
            os.makedirs(root / split / name)
            for i in range(count):
                pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                image = Image.fromarray(pixels)
                if i == 3:
                    image = image.convert("L")  # grey: three equal channels when read
                image.save(root / split / name / f"{i}.{'png' if i % 2 else 'jpg'}")
    return root


# --- the reader ---------------------------------------------------------------

def test_folder_order_and_tensorflow_pixels_are_tfds_image_folders():
    folder = image_folder.read(archive.extract(data.BUNDLED_ARCHIVE))
    builder = tfds.ImageFolder(folder.root)
    assert folder.class_names == builder.info.features["label"].names
    for split in ("train", "test"):
        examples = list(tfds.as_numpy(builder.as_dataset(split=split).batch(4096)))
        paths = [p.decode() for e in examples for p in e["image/filename"]]
        assert paths == folder.paths[split]  # the same images in the same order
        np.testing.assert_array_equal(np.concatenate([e["label"] for e in examples]),
                                      folder.labels[split])
        np.testing.assert_array_equal(image_folder.decode_tensorflow(folder.paths[split]),
                                      np.concatenate([e["image"] for e in examples]))


def test_pillow_differs_from_tensorflow_only_by_the_jpeg_dct():
    # The documented difference: TensorFlow decodes JPEG with the fast integer DCT, Pillow
    # with the accurate one; with the accurate DCT TensorFlow gives Pillow's pixels exactly.
    folder = image_folder.read(archive.extract(data.BUNDLED_ARCHIVE))
    paths = folder.paths["test"]
    ours, theirs = image_folder.decode_pillow(paths), image_folder.decode_tensorflow(paths)
    assert ours.shape == theirs.shape == (1000, 32, 32, 3) and ours.dtype == np.uint8
    difference = np.abs(ours.astype(int) - theirs)
    print(f"Pillow vs TensorFlow on the bundled test split: {np.mean(difference > 0):.3f} of "
          f"the values differ, by {difference.mean():.3f} on average, {difference.max()} at most")
    assert difference.max() <= 5 and 0.5 < np.mean(difference > 0) < 0.8
    assert difference.mean() < 1.1
    accurate = np.stack([tf.io.decode_jpeg(tf.io.read_file(p), channels=3,
                                           dct_method="INTEGER_ACCURATE").numpy()
                         for p in paths])
    np.testing.assert_array_equal(ours, accurate)


def test_pillow_reads_png_as_tensorflow_does(tmp_path, pillow):
    root = str(_write_folder(tmp_path / "images"))
    folder = image_folder.read(root)
    png = [p for p in folder.paths["train"] + folder.paths["test"] if p.endswith(".png")]
    np.testing.assert_array_equal(image_folder.decode_pillow(png),
                                  image_folder.decode_tensorflow(png))
    d = data.load(root)  # by Pillow
    assert d.class_names == CLASSES and d.x_train.shape == (12, 8, 8, 3)
    assert d.x_train.dtype == np.uint8 and d.y_train.dtype == np.int32
    np.testing.assert_array_equal(d.y_train, folder.labels["train"])
    grey = [i for i, p in enumerate(folder.paths["train"]) if p.endswith("3.png")]
    assert grey and all(np.ptp(d.x_train[i], axis=-1).max() == 0 for i in grey)


def test_pillow_names_a_bad_image(tmp_path, pillow):
    root = _write_folder(tmp_path / "images")
    (root / "train" / "cat" / "broken.png").write_bytes(b"not a png at all")
    with pytest.raises(data.BadDataError, match=r"Cannot decode image .*train/cat/broken\.png"):
        data.load(str(root))


def test_pillow_names_an_image_of_another_shape(tmp_path, pillow):
    root = _write_folder(tmp_path / "images")
    Image.new("RGB", (9, 8)).save(root / "test" / "dog" / "wide.png")
    with pytest.raises(data.BadDataError, match=r"Image .*test/dog/wide\.png has shape"):
        data.load(str(root))


def test_pillow_keeps_the_checks(tmp_path, pillow):
    root = _write_folder(tmp_path / "images")
    with pytest.raises(data.BadDataError, match="max_train=13 but the train split"):
        data.load(str(root), max_train=13)
    a, b = (data.load(str(root), max_train=6, max_test=3, seed=4) for _ in range(2))
    np.testing.assert_array_equal(a.x_train, b.x_train)
    np.testing.assert_array_equal(np.bincount(a.y_train), [2, 2, 2])
    os.makedirs(root / "train" / "emu")
    Image.new("RGB", (8, 8)).save(root / "train" / "emu" / "0.png")
    with pytest.raises(data.BadDataError, match="only in train/: \\['emu'\\]"):
        data.load(str(root))


def _png_chunk(kind, payload):
    """A PNG chunk: length, type, payload, CRC."""
    body = kind + payload
    return struct.pack(">I", len(payload)) + body + struct.pack(">I", zlib.crc32(body))


def _huge_png(path, side=23_000):
    """A valid grey PNG of side x side black pixels, in about 2 MB (the issue's had 514 KB)."""
    z = zlib.compressobj(1)
    row = bytes(side + 1)  # a filter byte and the pixels
    idat = b"".join(z.compress(row * 200) for _ in range(side // 200))
    idat += z.compress(row * (side % 200)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) +
                     _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b""))


def _hostile_folder(folder):
    """Files that one decoder or the other used to read differently: {path: what in the
    message both must give, or None where both must read the file}."""
    os.makedirs(folder)
    rng = np.random.default_rng(1)
    texture = [Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
               for _ in range(3)]
    files = {}

    def save(name, image, fmt, expected, **kwargs):
        image.save(folder / name, fmt, **kwargs)
        files[folder / name] = expected

    gif = "GIF content (the content decides, not the extension)"
    save("animated_gif.png", texture[0], "GIF", gif, save_all=True, append_images=texture[1:])
    save("gif.png", texture[0], "GIF", gif)
    save("bmp.png", texture[0], "BMP", "BMP content")
    save("webp.jpg", texture[0], "WEBP", "WebP or another RIFF content")
    (folder / "empty.png").write_bytes(b"")
    (folder / "text.jpg").write_bytes(b"just some text\n")
    files[folder / "empty.png"] = files[folder / "text.jpg"] = "neither PNG nor JPEG content"
    _huge_png(folder / "huge.png")
    files[folder / "huge.png"] = "is 23000 x 23000 pixels, more than the limit of 89,478,485"
    whole = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(whole, "PNG")
    broken = bytearray(whole.getvalue())
    broken[20] ^= 1  # the width, under the IHDR's checksum
    (folder / "bad_crc.png").write_bytes(bytes(broken))
    files[folder / "bad_crc.png"] = "its PNG header (IHDR) fails its checksum"
    (folder / "truncated.png").write_bytes(whole.getvalue()[:len(whole.getvalue()) // 2])
    files[folder / "truncated.png"] = "Cannot decode image"  # each decoder says it its way
    whole = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(whole, "JPEG")
    (folder / "truncated.jpg").write_bytes(whole.getvalue()[:len(whole.getvalue()) // 2])
    files[folder / "truncated.jpg"] = "Cannot decode image"
    (folder / "no_frame.jpg").write_bytes(b"\xff\xd8\xff\xd9")
    files[folder / "no_frame.jpg"] = "it is a JPEG with no frame header"
    # Read by both: the content decides the format, and the kinds of PNG and JPEG.
    save("jpeg_named.png", texture[0], "JPEG", None)
    save("png_named.jpg", texture[0], "PNG", None)
    save("progressive.jpg", texture[0], "JPEG", None, progressive=True)
    save("cmyk.jpg", texture[0].convert("CMYK"), "JPEG", None)
    save("animated.png", texture[0], "PNG", None, save_all=True, append_images=texture[1:])
    for mode in ("L", "LA", "P", "RGBA"):
        save(f"{mode}.png", texture[1].convert(mode), "PNG", None)
    grey16 = rng.integers(0, 2**16, (8, 8), dtype=np.uint16)
    save("grey16.png", Image.fromarray(grey16), "PNG", None)
    return files


def test_both_decoders_accept_and_refuse_the_same_files(tmp_path):
    good = tmp_path / "good.png"
    Image.new("RGB", (8, 8)).save(good)
    for path, expected in _hostile_folder(tmp_path / "hostile").items():
        results = []
        for decode in (image_folder.decode_tensorflow, image_folder.decode_pillow):
            try:
                results.append(decode([str(good), str(path)])[1])
            except data.BadDataError as e:
                message = str(e)
                assert "\n" not in message and str(path) in message, message
                assert expected and expected in message, (decode.__name__, message)
                results.append(None)
        if expected is None:
            assert results[0] is not None and results[1] is not None, path.name
            content = Image.open(path).format
            largest = 0 if content == "PNG" else 5  # JPEG: the documented DCT difference
            assert np.abs(results[0].astype(int) - results[1]).max() <= largest, path.name
        else:
            assert results == [None, None], path.name


@pytest.mark.parametrize("backend", ["tensorflow", "jax"])
def test_a_gif_named_png_in_a_folder_is_one_line(backend, tmp_path, monkeypatch):
    monkeypatch.setattr(data, "_keras_backend", lambda: backend)  # jax: Pillow decodes
    root = _write_folder(tmp_path / "images")
    frames = [Image.new("RGB", (8, 8), (i, 0, 0)) for i in range(3)]
    frames[0].save(root / "train" / "cat" / "1.png", "GIF", save_all=True,
                   append_images=frames[1:])
    with pytest.raises(data.BadDataError) as info:
        data.load(str(root))
    assert str(info.value) == (f"Cannot decode image {root}/train/cat/1.png: it holds GIF "
                               "content (the content decides, not the extension); convert "
                               "it to PNG or JPEG.")


def test_tfds_name_refused_on_another_backend(pillow):
    with pytest.raises(data.BadDataError) as info:
        data.load("cifar10")
    message = str(info.value)
    for part in ["'cifar10'", "needs TensorFlow", "the Keras backend is 'jax'",
                 "folder or .tar.gz", "top/train/airplane/0001.jpg", "--dataset=bundled"]:
        assert part in message, message


# --- numpy_batches ------------------------------------------------------------

# Image i is a texture; FLAT[i] is flat with grey level i + 1.
N, BATCH = 70, 16
TEXTURES = np.random.default_rng(0).integers(0, 256, (N, 32, 32, 3), dtype=np.uint8)
FLAT = np.repeat(np.arange(1, N + 1, dtype=np.uint8), 32 * 32 * 3).reshape(N, 32, 32, 3)
Y = np.arange(N, dtype=np.int32) % 7


def _epoch(x=TEXTURES, **kwargs):
    kwargs = {"batch_size": BATCH, "seed": 3, "epoch": 0, **kwargs}
    batches = list(data.numpy_batches(x, Y, **kwargs))
    return [b[0] for b in batches], [b[1] for b in batches]


def test_numpy_batches_are_train_datasets_order():
    images, labels = _epoch(FLAT, augment=False)
    assert len(images) == data.steps_per_epoch(N, BATCH) == 4  # the partial batch dropped
    assert all(b.shape == (BATCH, 32, 32, 3) and b.dtype == np.float32 for b in images)
    assert all(b.shape == (BATCH,) and b.dtype == np.int32 for b in labels)
    theirs = list(tfds.as_numpy(data.train_dataset(FLAT, Y, BATCH, 3, 0, augment=False)))
    for ours_x, ours_y, (their_x, their_y) in zip(images, labels, theirs):
        np.testing.assert_array_equal(ours_x, their_x)
        np.testing.assert_array_equal(ours_y, their_y)
    index = np.round(np.concatenate(images).max(axis=(1, 2, 3)) * 255).astype(int) - 1
    np.testing.assert_array_equal(np.concatenate(labels), Y[index])  # labels aligned
    assert not np.array_equal(images[0], _epoch(FLAT, augment=False, epoch=1)[0][0])
    assert not np.array_equal(images[0], _epoch(FLAT, augment=False, seed=4)[0][0])


def test_numpy_batches_are_deterministic_and_resume():
    images, labels = _epoch(epoch=2)
    again, _ = _epoch(epoch=2)
    for a, b in zip(images, again):
        np.testing.assert_array_equal(a, b)
    for k in (1, 3, 4):
        rest_images, rest_labels = _epoch(epoch=2, skip_batches=k)
        assert len(rest_images) == 4 - k
        for got, want in zip(rest_images + rest_labels, images[k:] + labels[k:]):
            np.testing.assert_array_equal(got, want)
    # Keyed by the position in the epoch, not by the batch: halved batches, same epoch.
    halves, _ = _epoch(epoch=2, batch_size=BATCH // 2)
    np.testing.assert_array_equal(np.concatenate(halves), np.concatenate(images))
    assert not np.array_equal(np.concatenate(images), np.concatenate(_epoch(epoch=3)[0]))


def test_numpy_augmentation_is_a_padded_crop_and_flip():
    augmented = np.concatenate(_epoch()[0])
    plain = np.concatenate(_epoch(augment=False)[0])
    assert augmented.min() >= 0.0 and augmented.max() <= 1.0
    changed = (augmented != plain).any(axis=(1, 2, 3))
    assert changed.mean() > 0.8  # the unchanged are no shift and no flip: 1 in 162
    assert (augmented == 0).all(axis=(2, 3)).any()  # some rows of zero padding
    pad = data.PAD
    seen = set()
    for got, source in zip(augmented, plain):
        padded = np.pad(source, [(pad, pad), (pad, pad), (0, 0)])
        matches = [(top, left, flip)
                   for top, left, flip in itertools.product(range(2 * pad + 1), repeat=3)
                   if flip < 2 and np.array_equal(
                       got, (padded[top:top + 32, left:left + 32])[:, ::-1 if flip else 1])]
        assert matches, "not a crop of the padded image, flipped or not"
        seen.update(matches)
    assert len({m[2] for m in seen}) == 2 and len({m[0] for m in seen}) >= 6


# --- without TensorFlow ---------------------------------------------------------

_WITHOUT_TF = textwrap.dedent("""
    import json, sys
    import numpy as np
    from sparta_tf import archive, data, image_folder
    bundled = data.load(data_dir=sys.argv[1], max_train=200, max_test=50, seed=0)
    tiny = data.load(sys.argv[2], data_dir=sys.argv[1])
    try:
        data.load("cifar10", data_dir=sys.argv[1])
        refused = None
    except data.BadDataError as e:
        refused = str(e)
    batches = list(data.numpy_batches(tiny.x_train, tiny.y_train, 4, seed=0, epoch=0))
    np.savez(sys.argv[3], x_train=bundled.x_train, y_train=bundled.y_train)
    print("RESULT" + json.dumps({
        "tensorflow_imported": "tensorflow" in sys.modules,
        "bundled": [list(bundled.x_train.shape), list(bundled.x_test.shape),
                    np.bincount(bundled.y_train).tolist(), bundled.class_names],
        "tiny": [list(tiny.x_train.shape), list(tiny.x_test.shape), tiny.class_names],
        "batches": [len(batches), list(batches[0][0].shape), str(batches[0][0].dtype)],
        "refused": refused,
    }))
""")


@needs_jax
def test_load_without_tensorflow(tmp_path):
    archive = str(tmp_path / "tiny.tar.gz")
    with tarfile.open(archive, "w:gz") as tar:  # the CIFAR-10 archive layout: a top folder
        tar.add(_write_folder(tmp_path / "tiny"), arcname="tiny")
    env = jax_without_tensorflow(tmp_path / "blocked")
    arrays = str(tmp_path / "bundled.npz")
    out = subprocess.run([sys.executable, "-c", _WITHOUT_TF, str(tmp_path / "cache"), archive,
                          arrays], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    line = [l for l in out.stdout.splitlines() if l.startswith("RESULT")][-1]
    r = json.loads(line[len("RESULT"):])
    assert not r["tensorflow_imported"]
    assert r["bundled"] == [[200, 32, 32, 3], [50, 32, 32, 3], [20] * 10,
                            ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
                             "horse", "ship", "truck"]]
    assert r["tiny"] == [[12, 8, 8, 3], [6, 8, 8, 3], CLASSES]
    assert r["batches"] == [3, [4, 8, 8, 3], "float32"]
    assert "TFDS dataset 'cifar10' needs TensorFlow" in r["refused"]
    assert "the Keras backend is 'jax'" in r["refused"]
    assert "top/train/airplane/0001.jpg" in r["refused"]
    # The same class-balanced sample as on TensorFlow: the same images, decoded by Pillow.
    on_tf = data.load(max_train=200, max_test=50, seed=0)
    without = np.load(arrays)
    np.testing.assert_array_equal(without["y_train"], on_tf.y_train)
    assert np.abs(without["x_train"].astype(int) - on_tf.x_train).max() <= 5
