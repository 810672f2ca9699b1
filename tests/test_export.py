"""Tests of sparta_tf/export.py and trainers/export.py, as TF Serving and its clients use them."""

import base64
import glob
import json
import os
import re
import stat
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import run_app_cases
from sparta_tf import archive, data, export, layers, models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
           "truck"]
SAVED_MODEL_CLI = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")


def _model(seed=0):
    keras.utils.set_random_seed(seed)
    return models.build("resnet10", 10, "sparta", 0.0625)


def _bundled_jpeg():
    """The bytes of one real test image of the bundled sample (a CIFAR-10 JPEG)."""
    folder = archive.extract(data.BUNDLED_ARCHIVE)
    return open(sorted(glob.glob(os.path.join(folder, "**", "test", "cat", "*.jpg"),
                                 recursive=True))[0], "rb").read()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    base = tmp_path_factory.mktemp("export")
    model = _model()
    path = export.export(model, str(base / "sparta"), CLASSES)
    jpeg = _bundled_jpeg()
    pixels = tf.io.decode_jpeg(jpeg).numpy()[None] / np.float32(255)
    return model, path, jpeg, pixels


def test_versions_are_never_overwritten(tmp_path):
    model = _model()
    base = str(tmp_path / "sparta")
    assert export.export(model, base, CLASSES) == os.path.join(base, "1")
    assert export.export(model, base, CLASSES) == os.path.join(base, "2")
    assert export.export(model, base, CLASSES, version=7) == os.path.join(base, "7")
    before = os.path.getmtime(os.path.join(base, "2", "saved_model.pb"))
    with pytest.raises(export.ExportError, match=r"Version 2 exists already.*leave out "
                                                 r"--version for 8"):
        export.export(_model(1), base, CLASSES, version=2)
    assert os.path.getmtime(os.path.join(base, "2", "saved_model.pb")) == before
    assert sorted(os.listdir(base)) == [".export.lock", "1", "2", "7"]  # no partial left
    assert export.versions(base) == [1, 2, 7]
    meta = export.metadata(os.path.join(base, "7"))
    assert meta["class_names"] == CLASSES and meta["input_shape"] == [32, 32, 3]
    assert meta["weights_sha256"] == export.weights_sha256(model)
    with pytest.raises(export.ExportError, match="10 logits, but 3 class names"):
        export.export(model, base, ["a", "b", "c"])


def _tiny():
    """A two-layer Sparta CNN on 32x32x3: exports in a second or two."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((32, 32, 3))
    h = layers.Sparta()(keras.layers.Conv2D(4, 3, strides=4, padding="same")(inputs))
    return keras.Model(inputs, keras.layers.Dense(10)(keras.layers.GlobalAveragePooling2D()(h)))


def test_the_next_version_skips_past_an_incomplete_folder(tmp_path):
    model, base = _tiny(), tmp_path / "sparta"
    assert export.export(model, str(base), CLASSES) == str(base / "1")
    os.makedirs(base / "2")  # an interrupted copy: no saved_model.pb
    assert export.export(model, str(base), CLASSES) == str(base / "3")
    with pytest.raises(export.ExportError, match=r"Version 2 at .* exists but is incomplete "
                                                 r"\(it holds no saved_model.pb.*Delete it if "
                                                 r"it is not needed, or leave out --version to "
                                                 r"export version 4"):
        export.export(model, str(base), CLASSES, version=2)
    with pytest.raises(export.ExportError, match=r"Version 3 exists already.*leave out "
                                                 r"--version for 4"):
        export.export(model, str(base), CLASSES, version=3)
    assert sorted(os.listdir(base)) == [".export.lock", "1", "2", "3"]
    assert not os.listdir(base / "2")


def test_a_killed_exports_partial_folder_is_removed_by_the_next_export(tmp_path):
    base = tmp_path / "sparta"
    left = base / ".partial-1-k1ll3d"  # as a kill during write_out leaves it
    (left / "variables").mkdir(parents=True)
    (left / "variables" / "variables.data-00000-of-00001").write_bytes(os.urandom(4096))
    (base / ".partial-link").symlink_to(tmp_path)  # a link is removed, not followed
    (tmp_path / "kept").write_text("mine")
    assert export.export(_tiny(), str(base), CLASSES) == str(base / "1")
    assert sorted(os.listdir(base)) == [".export.lock", "1"]
    assert (tmp_path / "kept").read_text() == "mine"


_EXPORTER = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[1])
    import test_export
    from sparta_tf import export
    model = test_export._tiny()  # the same weights in both processes
    for step in ("export", "export_if_changed"):
        print("ready", flush=True)
        sys.stdin.readline()  # both start at once
        print(getattr(export, step)(model, sys.argv[2 if step == "export" else 3],
                                    test_export.CLASSES), flush=True)
""")


def test_two_exports_at_once_give_two_versions_and_two_unchanged_ones_give_one(tmp_path):
    """Two processes export at the same moment: `export` gives versions 1 and 2 (the second
    waits for the lock), `export_if_changed` of the same weights one version, returned to
    both (its check and its write are one step). Without the lock one of the two failed
    ("Directory not empty")."""
    both, same = tmp_path / "both", tmp_path / "same"
    logs = [tmp_path / f"stderr{i}" for i in range(2)]
    procs = [subprocess.Popen([sys.executable, "-c", _EXPORTER, os.path.dirname(__file__),
                               str(both), str(same)], cwd=ROOT, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=open(log, "w"), text=True)
             for log in logs]

    def answer(p):  # its next line but the notice that it waits for the other
        line = p.stdout.readline()
        while line.startswith("Waiting for another export"):
            line = p.stdout.readline()
        return line.strip()

    try:
        answers = []
        for _ in range(2):
            for p, log in zip(procs, logs):
                assert answer(p) == "ready", log.read_text()[-3000:]
            for p in procs:
                p.stdin.write("go\n")
                p.stdin.flush()
            answers.append(sorted(answer(p) for p in procs))
        for p, log in zip(procs, logs):
            assert p.wait(timeout=300) == 0, log.read_text()[-3000:]
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert answers == [[str(both / "1"), str(both / "2")], [str(same / "1")] * 2], \
        [log.read_text()[-2000:] for log in logs]
    assert export.versions(both) == [1, 2] and export.versions(same) == [1]
    assert sorted(os.listdir(both)) == [".export.lock", "1", "2"]


def test_a_version_is_readable_by_a_server_of_another_user(tmp_path):
    old = os.umask(0o022)
    try:
        version = export.export(_tiny(), str(tmp_path / "sparta"), CLASSES)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(version).st_mode) == 0o755
    modes = {}
    for root, dirs, files in os.walk(version):
        for name in dirs + files:
            full = os.path.join(root, name)
            modes[os.path.relpath(full, version)] = stat.S_IMODE(os.stat(full).st_mode)
    assert modes["saved_model.pb"] == 0o644 and modes["variables"] == 0o755
    assert modes[export.METADATA] == 0o644
    assert {m for m in modes.values()} == {0o644, 0o755}, modes


def test_an_export_dir_that_is_a_file_is_one_clear_error(tmp_path):
    (tmp_path / "serving").write_text("")
    with pytest.raises(export.ExportError, match=f"The export_dir {tmp_path / 'serving'} is "
                                                 "a file, not a folder"):
        export.export(_tiny(), str(tmp_path / "serving"), CLASSES)


def test_export_if_changed_writes_a_version_only_for_new_weights(tmp_path):
    model, base = _model(), str(tmp_path / "sparta")
    first = export.export_if_changed(model, base, CLASSES)
    assert export.export_if_changed(model, base, CLASSES) == first  # nothing new
    model.get_layer("logits").bias.assign(np.ones(10, np.float32))
    assert export.export_if_changed(model, base, CLASSES) == os.path.join(base, "2")


def test_a_server_without_sparta_tf_predicts_as_keras_does(exported, tmp_path):
    model, path, jpeg, pixels = exported
    png = tf.io.encode_png(tf.io.decode_jpeg(jpeg)).numpy()
    (tmp_path / "cat.png").write_bytes(png)
    np.save(tmp_path / "pixels.npy", pixels)
    script = textwrap.dedent(f"""
        import json, sys
        import numpy as np
        import tensorflow as tf
        loaded = tf.saved_model.load({path!r})
        pixels = tf.constant(np.load({str(tmp_path / 'pixels.npy')!r}))
        png = open({str(tmp_path / 'cat.png')!r}, "rb").read()
        out = {{"pixels": loaded.signatures["serving_default"](images=pixels),
                "bytes": loaded.signatures["serve_image_bytes"](images=tf.constant([png]))}}
        assert not [m for m in sys.modules if m.startswith("sparta_tf")], "imported sparta_tf"
        print(json.dumps({{k: {{n: v.numpy().tolist() if v.dtype != tf.string else
                                 [s.decode() for s in v.numpy()] for n, v in o.items()}}
                           for k, o in out.items()}}))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=300, env=dict(os.environ, PYTHONPATH=""), cwd=str(tmp_path))
    assert out.returncode == 0, out.stderr[-3000:]
    answers = json.loads(out.stdout.strip().splitlines()[-1])
    expected = model(pixels, training=False).numpy()
    for answer in answers.values():
        np.testing.assert_allclose(answer["logits"], expected, rtol=0, atol=1e-5)
        np.testing.assert_allclose(answer["probabilities"], tf.nn.softmax(expected), atol=1e-6)
        assert answer["classes"] == [int(expected.argmax())]
        assert answer["class_names"] == [CLASSES[int(expected.argmax())]]


def test_bad_requests_are_refused_with_what_was_expected(exported):
    _, path, jpeg, pixels = exported
    loaded = tf.saved_model.load(path)
    pixels_fn = loaded.signatures["serving_default"]
    bytes_fn = loaded.signatures["serve_image_bytes"]
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"\[batch, 32, 32, 3\]"):
        pixels_fn(images=tf.zeros([1, 28, 28, 3]))  # the size the model was not trained on
    with pytest.raises(tf.errors.InvalidArgumentError, match="expected to be a float tensor"):
        pixels_fn(images=tf.zeros([1, 32, 32, 3], tf.float64))
    with pytest.raises(tf.errors.InvalidArgumentError, match="Unknown image file format"):
        bytes_fn(images=tf.constant([b"not an image"]))
    small = tf.io.encode_png(tf.zeros([28, 28, 3], tf.uint8))
    with pytest.raises(tf.errors.InvalidArgumentError, match="32 x 32 pixels"):
        bytes_fn(images=tf.stack([small]))


def test_the_saved_model_keeps_the_exact_input_gradient(exported):
    model, path, _, pixels = exported
    loaded = tf.saved_model.load(path)
    x = tf.constant(np.concatenate([pixels, pixels[:, ::-1]]))

    def gradient(fn):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(fn(x)[:, 3])
        return tape.gradient(loss, x)

    served = tf.function(gradient)(lambda v: loaded.signatures["serving_default"](images=v)
                                   ["logits"])
    reference = tf.function(gradient)(lambda v: model(v, training=False))
    assert float(tf.reduce_max(tf.abs(served))) > 0
    np.testing.assert_allclose(served, reference, rtol=0, atol=1e-5)


def test_saved_model_cli_shows_and_runs_both_signatures(exported, tmp_path):
    _, path, jpeg, _ = exported
    show = subprocess.run([SAVED_MODEL_CLI, "show", "--all", "--dir", path],
                          capture_output=True, text=True, timeout=300)
    assert show.returncode == 0, show.stderr[-2000:]
    text = show.stdout
    for signature, dtype in (("serving_default", "DT_FLOAT"), ("serve_image_bytes", "DT_STRING")):
        block = text.split(f"signature_def['{signature}']")[1].split("signature_def[")[0]
        assert re.search(rf"inputs\['images'\] tensor_info:\s+dtype: {dtype}", block)
        shape = "(-1, 32, 32, 3)" if dtype == "DT_FLOAT" else "(-1)"
        assert f"shape: {shape}" in block
        for name, out_dtype in (("logits", "DT_FLOAT"), ("probabilities", "DT_FLOAT"),
                                ("classes", "DT_INT64"), ("class_names", "DT_STRING")):
            assert re.search(rf"outputs\['{name}'\] tensor_info:\s+dtype: {out_dtype}", block)
    png = tf.io.encode_png(tf.io.decode_jpeg(jpeg)).numpy()
    np.save(tmp_path / "request.npy", np.array([png]))  # dtype S: no pickle needed
    run = subprocess.run([SAVED_MODEL_CLI, "run", "--dir", path, "--tag_set", "serve",
                          "--signature_def", "serve_image_bytes",
                          "--inputs", f"images={tmp_path / 'request.npy'}"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "class_names" in run.stdout and "logits" in run.stdout


def _build_md_json(heading):
    """The JSON block of BUILD.md that follows the line `heading`."""
    text = open(os.path.join(ROOT, "BUILD.md"), encoding="utf-8").read()
    block = text.split(heading, 1)[1].split("```json", 1)[1].split("```", 1)[0]
    return json.loads(block)


def test_build_md_shows_the_rest_request_and_answer_of_a_bundled_image(exported):
    """A client sends one bundled JPEG as {"b64": ...}; BUILD.md shows that exact request."""
    _, path, jpeg, _ = exported
    request = {"signature_name": "serve_image_bytes",
               "instances": [{"b64": base64.b64encode(jpeg).decode("ascii")}]}
    assert _build_md_json("Request (`request.json`)") == request
    answer = export.rest_predict(path, request)
    shown = _build_md_json("Response")
    for got in (answer, shown):  # this model's answer, and the trained one's in BUILD.md
        (row,) = got["predictions"]
        assert set(row) == {"logits", "probabilities", "classes", "class_names"}
        assert len(row["logits"]) == len(row["probabilities"]) == 10
        assert abs(sum(row["probabilities"]) - 1) < 1e-4
        assert row["classes"] == int(np.argmax(row["logits"]))
        assert row["class_names"] == CLASSES[row["classes"]]


def _app(name, *args):
    return subprocess.run([sys.executable, "-m", f"trainers.{name}", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


def test_trainer_exports_a_new_version_only_when_it_trained(tmp_path):
    tiny = ["--model=resnet10", "--max_train=64", "--max_test=8", "--width_multiplier=0.0625",
            "--batch_size=32", "--pgd_steps=1", "--eval_pgd_steps=0", f"--model_dir={tmp_path}"]
    for epochs, expected in ((1, [1]), (1, [1]), (2, [1, 2])):  # the rerun trains nothing
        out = _app("train", *tiny, f"--epochs={epochs}")
        assert out.returncode == 0, out.stderr[-3000:]
        assert export.versions(tmp_path / "export") == expected
        assert f"exported   {tmp_path / 'export' / str(expected[-1])}" in out.stdout
    assert json.load(open(tmp_path / "class_names.json")) == CLASSES
    assert export.metadata(tmp_path / "export" / "2")["class_names"] == CLASSES


def test_export_app(exported, tmp_path):
    model, _, _, _ = exported
    model.save(tmp_path / "model.keras")
    base = tmp_path / "serving"
    out = _app("export", f"--model_path={tmp_path / 'model.keras'}", f"--export_dir={base}")
    assert out.returncode != 0 and "--class_names" in out.stderr
    assert "Traceback" not in out.stderr
    (tmp_path / "class_names.json").write_text(json.dumps(CLASSES))  # as sparta-train writes
    exported, again, missing = run_app_cases("export", [  # one after the other, one process
        [f"--model_path={tmp_path}", f"--export_dir={base}"],
        [f"--model_path={tmp_path}", f"--export_dir={base}", "--version=1"],
        [f"--model_path={tmp_path / 'none'}", f"--export_dir={base}"]])
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert f"exported {base / '1'}" in exported.stdout
    assert again.returncode != 0 and "Version 1 exists already" in again.stderr
    assert "Traceback" not in again.stderr and export.versions(base) == [1]
    assert missing.returncode != 0 and "No model at" in missing.stderr


def test_export_app_refuses_a_corrupt_keras_file_in_one_line(tmp_path):
    (tmp_path / "model.keras").write_bytes(os.urandom(2048))
    out = _app("export", f"--model_path={tmp_path / 'model.keras'}", "--class_names=a,b",
               f"--export_dir={tmp_path / 'serving'}")
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert f"error: {tmp_path / 'model.keras'} is not a .keras file" in out.stderr
    assert not (tmp_path / "serving").exists()
