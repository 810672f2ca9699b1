"""The tracked tree stays small enough to travel to a lent GPU with the data and wheels
(64 MiB a run), and the models behind the committed reports stay retrievable."""

import glob
import hashlib
import os
import re
import subprocess

import pytest

from conftest import ROOT

LIMIT_MIB = 30


def _git(*args):
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, check=True).stdout


def _in_git():
    return subprocess.run(["git", "rev-parse"], cwd=ROOT, capture_output=True).returncode == 0


needs_git = pytest.mark.skipif(not _in_git(), reason="not a git checkout")


@needs_git
def test_the_tracked_tree_is_under_30_mib():
    paths = _git("ls-files", "-z").decode().split("\0")
    # The sizes on disk; a tracked file deleted in this checkout counts as nothing.
    sizes = {p: os.path.getsize(os.path.join(ROOT, p)) for p in paths
             if p and os.path.isfile(os.path.join(ROOT, p))}
    total = sum(sizes.values())
    largest = sorted(sizes, key=sizes.get, reverse=True)[:5]
    assert total < LIMIT_MIB * 2 ** 20, (
        f"the tracked tree is {total / 2 ** 20:.1f} MiB; largest: {largest}")
    assert not [p for p in paths if p.endswith(".keras")], "a model file is tracked"


def _models_commit():
    text = open(os.path.join(ROOT, "tools", "fetch_models.sh")).read()
    return re.search(r"^MODELS_COMMIT=([0-9a-f]{40})$", text, re.M)[1]


def _listed_models():
    """(path from the root, sha256) of every model that a MODELS.sha256 lists."""
    models = []
    for listing in glob.glob(os.path.join(ROOT, "results", "**", "MODELS.sha256"),
                             recursive=True):
        folder = os.path.relpath(os.path.dirname(listing), ROOT)
        for line in open(listing):
            digest, path = line.split(maxsplit=1)
            models.append((f"{folder}/{path.strip()}", digest))
    return models


@needs_git
def test_every_listed_model_is_in_its_commit_with_its_sha256():
    commit = _models_commit()
    if subprocess.run(["git", "cat-file", "-e", f"{commit}^{{commit}}"], cwd=ROOT,
                      capture_output=True).returncode:
        pytest.skip(f"this clone lacks commit {commit} (shallow?): `git fetch origin {commit}`")
    models = _listed_models()
    assert len(models) == 18
    for path, digest in models:
        blob = _git("cat-file", "blob", f"{commit}:{path}")
        assert hashlib.sha256(blob).hexdigest() == digest, path
