"""The TF Serving REST request for one bundled test image, and a SavedModel's answer to it.

    python tools/rest_example.py EXPORT_VERSION_DIR [request.json]

Builds the request a client sends to `serve_image_bytes` (the first bundled test image of
class cat, its JPEG bytes as {"b64": ...}), writes it to request.json (or the path given),
and prints it and the answer of `sparta_tf.export.rest_predict`: what BUILD.md shows.
"""

import base64
import glob
import json
import os
import sys

from sparta_tf import archive, data, export


def main(version_dir, request_path="request.json"):
    folder = archive.extract(data.BUNDLED_ARCHIVE)
    image = sorted(glob.glob(os.path.join(folder, "**", "test", "cat", "*.jpg"),
                             recursive=True))[0]
    with open(image, "rb") as f:
        request = {"signature_name": "serve_image_bytes",
                   "instances": [{"b64": base64.b64encode(f.read()).decode("ascii")}]}
    with open(request_path, "w") as f:
        json.dump(request, f)
    print(json.dumps(request, indent=2))
    print(json.dumps(export.rest_predict(version_dir, request), indent=2))


if __name__ == "__main__":
    main(*sys.argv[1:])
