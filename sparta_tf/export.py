"""Versioned SavedModels for TF Serving, with signatures a client can use as they are.

`export(model, export_dir, class_names)` writes `export_dir/<version>`, the layout that TF
Serving watches (`--model_base_path=export_dir`). A version is never overwritten: asking for
an existing one is an `ExportError` that names it. The SavedModel is written to a hidden
temporary folder beside it (`.partial-*`) and renamed into place, so a server never sees
half a model; the version gets the permissions of a folder made under the umask (0755 and
0644 under 022), so that a server running as another user can read it. An export holds
`export_dir/.export.lock` (a `flock`) from choosing its version to the rename: a second
export at the same time waits for it, then writes the next version, and the `.partial-*`
folders that a killed export left are removed under it (no live export is writing then).

Signatures (H, W, C fixed to the model's input; K classes):

- `serving_default`: `images`, float32 `[batch, H, W, C]`, pixels in [0, 1];
- `serve_image_bytes`: `images`, string `[batch]`, each an encoded JPEG or PNG of H x W
  pixels with C channels (TF Serving's REST API takes them as `{"b64": "..."}`), decoded
  and scaled to [0, 1] inside the graph.

Both return `logits` (float32 `[batch, K]`), `probabilities` (their softmax), `classes`
(int64 `[batch]`, the argmax) and `class_names` (string `[batch]`, the name of that class in
the training data). A wrong shape or dtype is refused by the signature with the expected
`TensorSpec` in the message; an undecodable image or one of another size is an
InvalidArgumentError that says what was expected. The graph holds only standard TensorFlow
ops: the server needs neither sparta_tf nor a custom op, and the SavedModel keeps Sparta's
exact gradient, so an attacker of the served model sees the true one.

Each version holds `assets.extra/sparta_tf.json`: the class names, the input shape, the
sha256 of the weights and the TensorFlow and Keras versions that wrote it.
"""

import base64
import contextlib
import fcntl
import hashlib
import os
import shutil
import tempfile

import keras
import numpy as np
import tensorflow as tf

from sparta_tf import layers, model_dir, transfer  # noqa: F401  (layers registers Sparta)

METADATA = os.path.join("assets.extra", "sparta_tf.json")


class ExportError(ValueError):
    """The export would overwrite a version, or its inputs do not fit the model."""


versions = model_dir.versions  # the complete versions under an export_dir


def _next_version(export_dir):
    """One more than every numbered name in `export_dir`, complete version or not."""
    names = [int(d) for d in os.listdir(export_dir) if d.isdigit()] \
        if os.path.isdir(export_dir) else []
    return max(names, default=0) + 1


def _chmod_as_created(folder):
    """Gives `folder` and all in it the modes of a new folder or file under the umask."""
    mask = model_dir.current_umask()
    os.chmod(folder, 0o777 & ~mask)
    for root, dirs, files in os.walk(folder):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o777 & ~mask)
        for f in files:
            os.chmod(os.path.join(root, f), 0o666 & ~mask)


def weights_sha256(model):
    """sha256 (hex) of every weight of `model`, in order."""
    digest = hashlib.sha256()
    for weight in model.weights:
        digest.update(np.ascontiguousarray(keras.ops.convert_to_numpy(weight)).tobytes())
    return digest.hexdigest()


def metadata(version_dir):
    """The `assets.extra/sparta_tf.json` of an exported version, or None."""
    path = os.path.join(version_dir, METADATA)
    if not os.path.isfile(path):
        return None
    return model_dir.read_json(path)


def _serving_functions(model, class_names):
    """The two signature functions: pixels -> outputs, encoded images -> outputs."""
    height, width, channels = model.input_shape[1:]
    names = tf.constant(class_names)

    def outputs(images):
        # A signature's static shape is not enforced when the SavedModel is called, and the
        # network (convolutions, then global pooling) would answer any size: check it.
        check = tf.debugging.assert_equal(
            tf.shape(images)[1:], [height, width, channels],
            message=f"images must have shape [batch, {height}, {width}, {channels}] (the "
                    "size the model was trained on), float32 pixels in [0, 1]")
        with tf.control_dependencies([check]):  # the check runs first, not beside the model
            images = tf.identity(images)
        logits = tf.cast(model(images, training=False), tf.float32)
        classes = tf.argmax(logits, axis=-1)
        return {"logits": logits, "probabilities": tf.nn.softmax(logits),
                "classes": classes, "class_names": tf.gather(names, classes)}

    def decode(encoded):
        image = tf.io.decode_image(encoded, channels=channels, expand_animations=False)
        check = tf.debugging.assert_equal(
            tf.shape(image)[:2], [height, width],
            message=f"serve_image_bytes expects JPEG or PNG images of {height} x {width} "
                    f"pixels ({channels} channels); got another size")
        # The result depends on the check, so that no op can meet the wrong size first
        # (map_fn's write of a 28x28 image into its 32x32 list raced it now and then).
        with tf.control_dependencies([check]):
            return tf.image.convert_image_dtype(image, tf.float32)  # uint8 -> [0, 1]

    def from_bytes(images):
        pixels = tf.map_fn(decode, images, fn_output_signature=tf.TensorSpec(
            [height, width, channels], tf.float32))
        return outputs(pixels)

    return outputs, from_bytes


@contextlib.contextmanager
def _holding(export_dir):
    """Holds `export_dir`'s lock (`model_dir.EXPORT_LOCK`) while the block runs, creating the
    folder; waits while another export holds it. Removes the `.partial-*` folders there
    first: under the lock, they are what a killed export left.

    Raises:
        OSError: the folder or its lock cannot be written.
    """
    os.makedirs(export_dir, exist_ok=True)
    # Read-only: another user's export may take it too; not through a link.
    fd = os.open(os.path.join(export_dir, model_dir.EXPORT_LOCK),
                 os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    try:
        if not model_dir.try_flock(fd):
            print(f"Waiting for another export to {export_dir} to finish...")
            fcntl.flock(fd, fcntl.LOCK_EX)
        for name in os.listdir(export_dir):
            full = os.path.join(export_dir, name)
            if not name.startswith(model_dir.PARTIAL):
                continue
            if os.path.isdir(full) and not os.path.islink(full):
                shutil.rmtree(full)
            else:
                os.remove(full)
        yield
    finally:
        os.close(fd)  # releases the flock


def _loaded(model, export_dir, class_names):
    """`(model, class names)` checked for an export to `export_dir`: the model loaded if
    it is a path, the names as strings.

    Raises:
        ExportError: `export_dir` is a file, or the model and names do not fit.
        ModelFileError: `model` is a path of a file that cannot be loaded.
    """
    export_dir = os.fspath(export_dir)
    if os.path.exists(export_dir) and not os.path.isdir(export_dir):
        raise ExportError(f"The export_dir {export_dir} is a file, not a folder: give the "
                          "folder that TF Serving watches (--model_base_path).")
    if isinstance(model, (str, os.PathLike)):
        model = transfer.load(model)
    class_names = [str(name) for name in class_names]
    if len(class_names) != model.output_shape[-1]:
        raise ExportError(f"The model has {model.output_shape[-1]} logits, but "
                          f"{len(class_names)} class names were given.")
    if None in model.input_shape[1:]:
        raise ExportError(f"The model's input shape {model.input_shape} is not fixed; "
                          "the serving signature needs (height, width, channels).")
    return model, class_names


def export(model, export_dir, class_names, version=None):
    """Writes `export_dir/<version>`, a SavedModel with the signatures above.

    Holds the export_dir's lock while it writes: another export to it waits.

    Args:
        model: a Keras model from pixels in [0, 1] to logits, with a fixed
            input shape `(H, W, C)`, or the path of a `.keras` file of one.
        export_dir: the base path that TF Serving watches.
        class_names: the K class names, in label order.
        version: a positive int; None for one more than the highest version
            in `export_dir` (1 in an empty one).

    Returns: the path of the version written.

    Raises:
        ExportError: the version exists already, is not a positive int,
            `export_dir` is a file or cannot be written, or `class_names` does
            not have one name per logit.
        ModelFileError: `model` is a path of a file that cannot be loaded
            (`transfer.load`).
    """
    export_dir = os.fspath(export_dir)
    model, class_names = _loaded(model, export_dir, class_names)
    if version is not None and (not isinstance(version, int) or version < 1):
        raise ExportError(f"version must be a positive int; got {version!r}.")
    try:
        with _holding(export_dir):
            return _write(model, export_dir, class_names, version)
    except OSError as e:
        raise ExportError(f"Could not write to the export_dir {export_dir}: {e}") from None


def _write(model, export_dir, class_names, version):
    """`export`'s work, under the export_dir's lock."""
    following = _next_version(export_dir)
    if version is None:
        version = following
    final = os.path.join(export_dir, str(version))
    if os.path.exists(final) and version not in versions(export_dir):
        raise ExportError(
            f"Version {version} at {final} exists but is incomplete (it holds no "
            "saved_model.pb: an interrupted copy?); it is not overwritten. Delete it if it "
            f"is not needed, or leave out --version to export version {following}.")
    if os.path.exists(final):
        raise ExportError(
            f"Version {version} exists already at {final}: TF Serving does not reload a "
            "changed version, so it is never overwritten. Export as a new version (leave "
            f"out --version for {following}).")
    outputs, from_bytes = _serving_functions(model, class_names)
    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint("serving_default", outputs, input_signature=[
        tf.TensorSpec([None, *model.input_shape[1:]], tf.float32, name="images")])
    archive.add_endpoint("serve_image_bytes", from_bytes, input_signature=[
        tf.TensorSpec([None], tf.string, name="images")])
    partial = None
    try:
        partial = tempfile.mkdtemp(prefix=f"{model_dir.PARTIAL}{version}-", dir=export_dir)
        archive.write_out(partial, verbose=False)
        os.makedirs(os.path.join(partial, "assets.extra"), exist_ok=True)
        model_dir.write_json(os.path.join(partial, METADATA), {
            "class_names": class_names, "input_shape": list(model.input_shape[1:]),
            "weights_sha256": weights_sha256(model),
            "tensorflow": tf.__version__, "keras": keras.__version__})
        _chmod_as_created(partial)  # mkdtemp's 0700 would hide it from a server
        os.rename(partial, final)  # atomic
    except OSError as e:
        raise ExportError(f"Could not write version {version} to {final}: {e}") from None
    finally:
        if partial:
            shutil.rmtree(partial, ignore_errors=True)
    return final


def export_if_changed(model, export_dir, class_names):
    """`export` as a new version, unless the highest version holds the same weights and
    class names; the check and the write are one step, under the export_dir's lock.

    What `sparta-train` calls: a rerun that trains nothing writes no new version.
    Returns the path of the new version, or of the unchanged highest one.

    Raises:
        ExportError, ModelFileError: as `export`.
    """
    export_dir = os.fspath(export_dir)
    model, class_names = _loaded(model, export_dir, class_names)
    try:
        with _holding(export_dir):
            existing = versions(export_dir)
            if existing:
                latest = os.path.join(export_dir, str(existing[-1]))
                try:
                    stored = metadata(latest)
                except ValueError:  # unreadable: export anew rather than trust it
                    stored = None
                if isinstance(stored, dict) and stored.get("class_names") == class_names \
                        and stored.get("weights_sha256") == weights_sha256(model):
                    return latest
            return _write(model, export_dir, class_names, None)
    except OSError as e:
        raise ExportError(f"Could not write to the export_dir {export_dir}: {e}") from None


def rest_predict(version_dir, request):
    """Answers a TF Serving REST predict request (row format) from an exported version.

    What `POST /v1/models/NAME:predict` answers, without a server, to check a client:
    `request` is the parsed JSON, `{"signature_name": ..., "instances": [...]}`, each
    instance a list of pixels or, for `serve_image_bytes`, `{"b64": base64 bytes}`. Returns
    `{"predictions": [one dict of outputs per instance]}`, as TF Serving does.
    """
    signature = tf.saved_model.load(version_dir).signatures[
        request.get("signature_name", "serving_default")]
    instances = request["instances"]
    if instances and isinstance(instances[0], dict) and "b64" in instances[0]:
        images = tf.constant([base64.b64decode(i["b64"]) for i in instances])
    else:
        images = tf.constant(instances, tf.float32)
    rows = [{} for _ in instances]
    for name, values in signature(images=images).items():
        for row, value in zip(rows, values.numpy().tolist()):
            row[name] = value.decode() if isinstance(value, bytes) else value
    return {"predictions": rows}
