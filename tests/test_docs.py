"""The README's commands are the ones CI and users run."""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


def test_readme_flags_exist():
    """Every --flag that the README names is a flag of one of the trainers."""
    defined = set()
    for trainer in ("train", "evaluate", "compare", "transfer", "export"):
        out = subprocess.run([sys.executable, "-m", f"trainers.{trainer}", "--helpfull"],
                             cwd=ROOT, capture_output=True, text=True, timeout=120)
        defined |= set(re.findall(r"--(?:\[no\])?([a-z_0-9]+)", out.stdout))
    assert {"model_dir", "eps", "model_path", "activations"} <= defined
    named = set(re.findall(r"`(?:sparta-\w+ )?--([a-z_0-9]+)", _read("README.md")))
    missing = sorted(n for n in named if n not in defined and n[2:] not in defined)
    assert not missing, f"README names flags that do not exist: {missing}"
