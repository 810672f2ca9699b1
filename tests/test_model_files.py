"""Model files that cannot be loaded: one clear error naming the file, never a traceback.

A corrupt or truncated `.keras` file, one refused by Keras's safe_mode (a Lambda layer), and
a corrupt or incomplete exported SavedModel, through every reader: `transfer.load` (what
`sparta-train --sparta_from` calls), `evaluation.load_model` (`sparta-evaluate`) and
`export.export` (`sparta-export`); a `.keras` file whose config.json would expand to more
than `transfer.MAX_JSON_BYTES`; and `evaluation.check_fits`, which refuses a model that does
not fit the data. Tiny models built here keep it fast.
"""

import json
import os
import tracemalloc
import zipfile

import keras
import numpy as np
import pytest
import tensorflow as tf

from sparta_tf import evaluation, export, layers, transfer

SHAPE = (8, 8, 3)
CLASSES = [str(i) for i in range(4)]


def _tiny(lambda_layer=False):
    keras.utils.set_random_seed(0)
    inputs = keras.Input(SHAPE)
    h = layers.Sparta()(keras.layers.Conv2D(4, 3, padding="same")(inputs))
    if lambda_layer:
        h = keras.layers.Lambda(lambda t: t * 2)(h)
    return keras.Model(inputs, keras.layers.Dense(4)(keras.layers.GlobalAveragePooling2D()(h)))


def _loaders(tmp_path):
    """Each reader of a `.keras` file, as a function of its path."""
    return {"transfer.load": transfer.load,
            "evaluation.load_model": evaluation.load_model,
            "export.export": lambda p: export.export(p, str(tmp_path / "serving"), CLASSES)}


@pytest.fixture(scope="module")
def good_keras(tmp_path_factory):
    path = tmp_path_factory.mktemp("good") / "model.keras"
    _tiny().save(path)
    return path


def _corrupt_files(folder, good):
    data = good.read_bytes()
    files = {"random": os.urandom(4096), "truncated": data[:len(data) // 2], "empty": b""}
    paths = {}
    for name, content in files.items():
        paths[name] = folder / f"{name}.keras"
        paths[name].write_bytes(content)
    # A zip archive whose config.json is not JSON: Keras's own error, under one line.
    paths["bad_config"] = folder / "bad_config.keras"
    with zipfile.ZipFile(good) as zin, zipfile.ZipFile(paths["bad_config"], "w") as zout:
        for item in zin.namelist():
            zout.writestr(item, b"{not json" if item == "config.json" else zin.read(item))
    return paths


def test_a_corrupt_keras_file_is_one_clear_error_naming_it(tmp_path, good_keras):
    for kind, path in _corrupt_files(tmp_path, good_keras).items():
        for reader, load in _loaders(tmp_path).items():
            with pytest.raises(transfer.ModelFileError) as raised:
                load(str(path))
            message = str(raised.value)
            assert str(path) in message, (kind, reader, message)
            assert "File not found" not in message and "\n" not in message, (kind, reader)
            if kind == "bad_config":
                assert "could not be loaded as a Keras model" in message, (reader, message)
            else:
                assert "is not a .keras file" in message, (kind, reader, message)
    assert isinstance(transfer.ModelFileError("x"), ValueError)  # the apps catch ValueError
    assert evaluation.ModelFileError is transfer.ModelFileError
    assert not (tmp_path / "serving").exists()  # nothing exported


def test_a_lambda_layer_is_refused_under_safe_mode(tmp_path):
    path = tmp_path / "lambda.keras"
    _tiny(lambda_layer=True).save(path)
    for reader, load in _loaders(tmp_path).items():
        with pytest.raises(transfer.ModelFileError) as raised:
            load(str(path))
        message = str(raised.value)
        assert str(path) in message and "refused" in message, (reader, message)
        assert "arbitrary Python code" in message and "safe_mode on" in message, reader
        assert "\n" not in message, reader


def test_a_model_dir_with_a_corrupt_model_keras_is_one_clear_error(tmp_path):
    (tmp_path / "model.keras").write_bytes(b"PK\x03\x04 cut short")
    for load in (transfer.load, evaluation.load_model):
        with pytest.raises(transfer.ModelFileError, match="model.keras is not a .keras file"):
            load(str(tmp_path))


def test_load_model_takes_the_highest_complete_version_or_says_none_is(tmp_path, good_keras):
    model = keras.models.load_model(good_keras)
    base = tmp_path / "export"
    os.makedirs(base / "2")  # empty: an interrupted copy
    with pytest.raises(FileNotFoundError, match=r"numbered versions \(2\) hold no "
                                                r"saved_model.pb; they are incomplete"):
        evaluation.load_model(base)
    assert export.export(model, str(base), CLASSES, version=1) == str(base / "1")
    os.makedirs(base / "3" / "variables")  # no saved_model.pb
    x = np.random.default_rng(0).uniform(0, 1, (2,) + SHAPE).astype(np.float32)
    loaded = evaluation.load_model(base)  # version 1, the highest complete one
    np.testing.assert_allclose(loaded(x, training=False), model(x, training=False), atol=1e-5)
    os.makedirs(base / "4")
    pb = (base / "1" / "saved_model.pb").read_bytes()
    (base / "4" / "saved_model.pb").write_bytes(pb[:len(pb) // 2])  # truncated
    for path in (base, base / "4"):
        with pytest.raises(transfer.ModelFileError) as raised:
            evaluation.load_model(path)
        message = str(raised.value)
        assert f"The SavedModel {base / '4'} could not be loaded" in message, message
        assert "\n" not in message


def test_check_writable_creates_the_folder_or_says_why_it_cannot(tmp_path):
    evaluation.check_writable(tmp_path / "new" / "out")
    assert os.listdir(tmp_path / "new" / "out") == []  # created, and the probe removed
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match=f"Cannot write to {tmp_path / 'file' / 'out'}"):
        evaluation.check_writable(tmp_path / "file" / "out")
    if os.geteuid() != 0:  # root writes into a read-only folder
        (tmp_path / "ro").mkdir(mode=0o555)
        with pytest.raises(ValueError, match="Permission denied"):
            evaluation.check_writable(tmp_path / "ro")


def test_load_model_says_what_runs_when_a_model_loads():
    doc = " ".join(evaluation.load_model.__doc__.split())
    assert "a `.keras` file loads under Keras's safe_mode, which refuses arbitrary Python " \
           "code (a `Lambda` layer is refused, not run)" in doc
    assert "An exported SavedModel runs its own graph" in doc
    assert "Only evaluate SavedModels you trust." in doc


def _with_huge_config(good, path):
    """A copy of the .keras file `good` whose config.json, still valid JSON, is padded with
    spaces past `transfer.MAX_JSON_BYTES`: a few hundred KB on disk."""
    with zipfile.ZipFile(good) as zin, \
            zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zout:
        for item in zin.infolist():
            if item.filename != "config.json":
                zout.writestr(item, zin.read(item))
                continue
            with zout.open("config.json", "w", force_zip64=True) as f:
                f.write(zin.read(item))
                pad = b" " * 2**20
                for _ in range(transfer.MAX_JSON_BYTES // len(pad) + 1):
                    f.write(pad)
    return path


def test_a_huge_config_json_is_refused_before_it_is_read(tmp_path, good_keras):
    """The issue's was a 2 GiB config.json in a 2 MB .keras file, which took evaluate to
    5 GB. Its size is read off the zip directory (Python's zip reader reads no more than
    it says), and the file is refused before Keras reads a byte of it, by every reader."""
    path = _with_huge_config(good_keras, tmp_path / "huge_config.keras")
    assert path.stat().st_size < 2**20
    size = zipfile.ZipFile(path).getinfo("config.json").file_size
    assert size > transfer.MAX_JSON_BYTES
    for reader, load in _loaders(tmp_path).items():
        tracemalloc.start()
        with pytest.raises(transfer.ModelFileError) as raised:
            load(str(path))
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < 8 * 2**20, (reader, peak)  # the config was not read
        message = str(raised.value)
        assert f"{path} is refused: its 'config.json' holds {size:,} bytes, more than the " \
               "64 MiB" in message, (reader, message)
        assert "\n" not in message
    assert not (tmp_path / "serving").exists()


def test_check_fits_refuses_a_model_of_other_images_or_classes(tmp_path, good_keras):
    model = transfer.load(str(good_keras))  # 8x8x3 images, 4 logits
    x = np.zeros((2,) + SHAPE, np.uint8)
    evaluation.check_fits(model, x, CLASSES, str(good_keras))  # fits
    refused = [
        (x, CLASSES + ["4"], "has 4 classes (logits), and the data has 5 classes ('0', '1', "
                             "'2', '3', ... (5 in all))"),
        (x[..., :1], CLASSES, "takes images of 8x8x3 (height x width x channels), and the "
                              "data's are 8x8x1"),
        (np.zeros((2, 16, 16, 3), np.uint8), CLASSES, "takes images of 8x8x3"),
    ]
    for images, names, message in refused:
        with pytest.raises(evaluation.ModelMismatchError) as raised:
            evaluation.check_fits(model, images, names, str(good_keras))
        assert f"The model {good_keras} {message}" in str(raised.value), str(raised.value)
        assert "\n" not in str(raised.value)
    # A network that takes any size is run on the data's images.
    inputs = keras.Input((None, None, 3))
    logits = keras.layers.Dense(4)(keras.layers.GlobalAveragePooling2D()(
        keras.layers.Conv2D(4, 3)(inputs)))
    any_size = keras.Model(inputs, logits)
    evaluation.check_fits(any_size, np.zeros((2, 16, 16, 3), np.uint8), CLASSES, "any")
    with pytest.raises(evaluation.ModelMismatchError, match="cannot run on the data's images "
                                                           r"\(2x2x3\): "):
        evaluation.check_fits(any_size, np.zeros((2, 2, 2, 3), np.uint8), CLASSES, "any")


def test_check_fits_compares_the_class_names_written_beside_the_model(tmp_path, good_keras):
    run = tmp_path / "run"
    run.mkdir()
    (run / "model.keras").write_bytes(good_keras.read_bytes())
    model = evaluation.load_model(run)
    x = np.zeros((2,) + SHAPE, np.uint8)
    names = ["cat", "dog", "frog", "ship"]
    (run / "class_names.json").write_text(json.dumps(names))
    for path in (run, run / "model.keras"):  # the model_dir, or the file in it
        evaluation.check_fits(model, x, names, str(path))
        with pytest.raises(evaluation.ModelMismatchError) as raised:
            evaluation.check_fits(model, x, CLASSES, str(path))
        assert str(raised.value) == (
            f"The model {path} was trained on 4 classes ('cat', 'dog', 'frog', 'ship', in its "
            "class_names.json), and the data has 4 classes ('0', '1', '2', '3'): evaluate it "
            "on the data it was trained on (--dataset).")
    (run / "class_names.json").write_text('{"cat": 0}')
    with pytest.raises(ValueError, match="class_names.json beside .* holds no JSON list"):
        evaluation.check_fits(model, x, names, str(run))


def test_a_savedmodel_is_checked_for_its_logits_its_images_and_its_classes(tmp_path,
                                                                           good_keras):
    path = export.export(keras.models.load_model(good_keras), str(tmp_path / "serving"),
                         CLASSES, version=1)
    served = evaluation.load_model(path)
    x = np.zeros((2,) + SHAPE, np.uint8)
    evaluation.check_fits(served, x, CLASSES, path)
    with pytest.raises(evaluation.ModelMismatchError, match="takes images of 8x8x3"):
        evaluation.check_fits(served, np.zeros((2, 8, 8, 1), np.uint8), CLASSES, path)
    with pytest.raises(evaluation.ModelMismatchError, match="has 4 classes"):
        evaluation.check_fits(served, x, CLASSES[:2], path)
    # A SavedModel whose serving_default returns no logits.
    module = tf.Module()
    module.serve = tf.function(
        lambda images: {"probabilities": tf.nn.softmax(tf.reduce_mean(images, [1, 2]))},
        input_signature=[tf.TensorSpec([None, *SHAPE], tf.float32, name="images")])
    tf.saved_model.save(module, str(tmp_path / "other" / "1"),
                        signatures={"serving_default": module.serve})
    for where in (tmp_path / "other", tmp_path / "other" / "1"):
        with pytest.raises(transfer.ModelFileError) as raised:
            evaluation.load_model(where)
        assert str(raised.value) == (
            f"The SavedModel {tmp_path / 'other' / '1'} has no `logits` output in its "
            "serving_default signature (it has: probabilities); evaluate a SavedModel that "
            "sparta-export wrote, or the .keras model.")
