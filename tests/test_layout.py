"""The shape of the library: each module of sparta_tf is small enough to read at a sitting."""

import glob
import os

from conftest import ROOT

MAX_LINES = 400


def test_no_module_of_sparta_tf_is_over_400_lines():
    sizes = {}
    for path in glob.glob(os.path.join(ROOT, "sparta_tf", "**", "*.py"), recursive=True):
        with open(path, encoding="utf-8") as f:
            sizes[os.path.relpath(path, ROOT)] = len(f.read().splitlines())
    assert len(sizes) > 20
    long = {path: n for path, n in sizes.items() if n > MAX_LINES}
    assert not long, f"split these by job: {long}"
