"""The docs say what the code and the committed results say.

The README is the front page; docs/ holds the guide, the results and their commands. Their
commands are the ones users run: the flags they name exist, no path of the development
machines appears in them, their links lead to files, and the README's headline table is the
committed comparison's.
"""

import ast
import fnmatch
import glob
import json
import os
import re
import subprocess
import sys

import pytest

from conftest import run_apps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ["README.md", "BUILD.md", *sorted(
    os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))]


def _read(*path):
    with open(os.path.join(ROOT, *path), encoding="utf-8") as f:
        return f.read()


def _commands(text):
    """The indented command lines of a Markdown text, in order."""
    return [line.strip() for line in text.splitlines()
            if line.startswith("    ") and line.strip().startswith((".venv/", "python3 -m venv"))]


def test_ci_runs_the_readme_test_command():
    main, tests = _commands(_read("README.md"))[:2]
    ci_lines = [line for line in _read(".ci", "run").splitlines() if line and line[0] != "#"]
    assert ci_lines[-1] == tests
    assert "pytest" in tests and "sparta-train" in main


def test_the_flags_that_the_docs_name_exist():
    """Every --flag that the README or a page of docs/ names is a flag of a trainer."""
    defined = set()
    apps = ("train", "evaluate", "compare", "transfer", "export")
    for out in run_apps([(app, ["--helpfull"]) for app in apps]):  # one process
        assert out.returncode == 0, out.stderr[-2000:]
        defined |= set(re.findall(r"--(?:\[no\])?([a-z_0-9]+)", out.stdout))
    assert {"model_dir", "eps", "model_path", "activations"} <= defined
    for page in PAGES:
        text = _read(page)
        named = set(re.findall(r"`(?:sparta-\w+ )?--([a-z_0-9]+)", text))
        # The indented commands of the apps, with their continuation lines.
        for command in re.findall(r"^ {4}\S*sparta-\w+(?:.*\\\n)*.*$", text, re.M):
            named |= set(re.findall(r"\s--([a-z_0-9]+)", command))
        missing = sorted(n for n in named if n not in defined and n[2:] not in defined)
        assert not missing, f"{page} names flags that do not exist: {missing}"


def test_no_page_names_a_path_of_the_development_machines():
    for page in PAGES:
        found = re.findall(r"/work/\S*", _read(page))
        assert not found, f"{page} names {found}: write a placeholder such as $DATA"


def test_the_links_of_the_docs_lead_to_files():
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", _read(page)):
            if target.startswith(("http://", "https://")):
                continue
            path = os.path.normpath(os.path.join(ROOT, os.path.dirname(page), target))
            assert os.path.exists(path), f"{page} links to {target}, which does not exist"


def test_the_readmes_headline_table_is_the_committed_grid():
    with open(os.path.join(ROOT, "results", "compare_r18w025", "comparison.json")) as f:
        summary = [r for r in json.load(f)["summary"] if r["objective"] == "pgd"]
    names = {"sparta": "Sparta", "relu": "ReLU", "silu": "SiLU", "softplus": "Softplus",
             "gelu": "GELU", "elu": "ELU", "prelu": "PReLU", "frelu": "FReLU"}
    readme = _read("README.md")
    assert "| PGD-3 AT | clean | PGD-20 |" in readme
    for row in summary:
        cells = [f"{100 * row[m]['mean']:.1f} ± {100 * row[m]['std']:.1f}"
                 for m in ("clean", "pgd")]
        assert f"| {names[row['activation']]} | {cells[0]} | {cells[1]} |" in readme, row
    assert len(summary) == len(names)


def test_the_speeds_that_the_readme_quotes_are_the_committed_benchmarks():
    with open(os.path.join(ROOT, "results", "benchmarks", "cpu_2core", "benchmark.json")) as f:
        report = json.load(f)
    img_s = {a: report["batch_size"] / report["seconds_per_step"][f"at/{a}/w0.25"]["median"]
             for a in ("relu", "silu", "sparta")}
    readme = " ".join(_read("README.md").split())
    assert (f"runs at {img_s['relu']:.0f} img/s with ReLU, {img_s['silu']:.0f} with SiLU "
            f"and {img_s['sparta']:.0f} with Sparta") in readme
    ratios = report["ratios"]
    assert f"Sparta takes {ratios['sparta / relu, AT, w0.25']['median']:.2f} times" in readme
    assert f"({ratios['sparta / relu, AT, w1']['median']:.2f} at full width)" in readme


def test_the_tests_that_reliability_md_names_exist():
    """docs/RELIABILITY.md holds each promise to tests by name: every name is a test."""
    text = _read("docs", "RELIABILITY.md")
    named, module = [], None
    for file, rest in re.findall(r"`(?:(test_\w+\.py))?::(test_\w+)", text):
        module = file or module  # `::name` continues the file named before it
        named.append((module, rest))
    assert len(named) >= 25
    for file, name in named:
        assert re.search(rf"^def {name}\(", _read("tests", file), re.M), f"{file}::{name}"


def _sparta_imports(path):
    """The modules of sparta_tf that the file at `path` imports, anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(_read(path))):
        if isinstance(node, ast.ImportFrom) and node.module == "sparta_tf":
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("sparta_tf."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("sparta_tf.")}
    return found


def test_what_a_module_says_it_imports_of_sparta_tf_is_what_it_imports():
    """A docstring's "imports nothing (else) of `sparta_tf` (but `a`, `b`)" is the truth."""
    modules = {os.path.splitext(os.path.basename(p))[0]
               for p in glob.glob(os.path.join(ROOT, "sparta_tf", "**", "*.py"), recursive=True)}
    modules |= {"backend", "experiments"}
    claims = 0
    for path in glob.glob(os.path.join(ROOT, "sparta_tf", "**", "*.py"), recursive=True):
        text = " ".join(_read(path).split())
        claim = re.search(r"imports nothing (?:else )?of `sparta_tf`(.*?)\.(?:\s|$)", text)
        if not claim:
            continue
        claims += 1
        but = claim[1] if claim[1].startswith(" but ") else ""
        said = set(re.findall(r"`(\w+)`", but)) & modules
        itself = os.path.splitext(os.path.basename(path))[0]
        imported = _sparta_imports(path) - {itself}
        assert imported == said, f"{os.path.relpath(path, ROOT)} says it imports {sorted(said)} " \
                                 f"of sparta_tf, and imports {sorted(imported)}"
    assert claims >= 8


def test_build_md_lists_every_app_that_setup_py_installs():
    scripts = re.findall(r'"(sparta-\w+) = trainers\.\w+:run"', _read("setup.py"))
    assert len(scripts) >= 5
    sentence = re.search(r"The console scripts (.*?) come with it", " ".join(
        _read("BUILD.md").split()))
    assert sentence, "BUILD.md no longer says which console scripts the install gives"
    assert re.findall(r"`(sparta-\w+)`", sentence[1]) == scripts


def _results_tree():
    """The paths under results/ that a fresh clone has (the files git tracks, and their
    folders), with the models that a MODELS.sha256 manifest lists (tools/fetch_models.sh
    puts them back)."""
    out = subprocess.run(["git", "ls-files", "-z", "--", "results"], cwd=ROOT,
                         capture_output=True, text=True)
    if out.returncode:
        pytest.skip("not a git checkout")
    files = set(filter(None, out.stdout.split("\0")))
    for manifest in [f for f in files if os.path.basename(f) == "MODELS.sha256"]:
        for line in _read(manifest).splitlines():
            if line.strip():
                files.add(os.path.join(os.path.dirname(manifest), line.split(None, 1)[1]))
    folders = {os.path.dirname(f) for f in files}
    while any(os.path.dirname(f) not in folders for f in folders if f):
        folders |= {os.path.dirname(f) for f in folders if f}
    return files | folders


# Paths under results/ that a page names and that a command on that page writes: not in a
# fresh clone until the command has run. Each with where the page says so.
WRITTEN_BY_A_COMMAND = {
    # docs/RESULTS.md: "a variant's model is there once its command has run"
    "results/ablation_r18w025/beta0_0/pgd/sparta/seed0/model.keras",
}


def test_every_results_path_that_the_docs_name_is_in_a_fresh_clone():
    """A results/ path that README.md, BUILD.md or docs/ names is a file or folder that git
    tracks, or a model listed in a MODELS.sha256 manifest; a glob matches one. Placeholders
    (`<card>`) name no path; a template's `{seed}` matches as a glob's `*`."""
    tree = _results_tree()
    for page in PAGES:
        for path in re.findall(r"results/[\w./*<>{}-]+", _read(page)):
            path = re.sub(r"\{\w+\}", "*", path.rstrip(".").rstrip("/"))
            if "<" in path or path in WRITTEN_BY_A_COMMAND:
                continue
            found = fnmatch.filter(tree, path) if "*" in path else path in tree
            assert found, f"{page} names {path}, which a fresh clone does not have"


def test_the_docs_say_what_is_not_what_must_be():
    """The pages describe the project; none reads as the brief it was built from."""
    for page in PAGES:
        text = " ".join(_read(page).split())
        found = re.findall(r"[^.]*\b(?:must|should) (?:say|show|be shown)\b[^.]*", text)
        assert not found, f"{page}: {found}"
