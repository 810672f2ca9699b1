"""The README's commands are the ones CI and users run."""

import os

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
    """Every --flag the README names is a flag of the train trainer."""
    import re
    from absl import flags
    import trainers.train  # noqa: F401  (defines the flags)
    named = set(re.findall(r"`--([a-z_0-9]+)", _read("README.md")))
    missing = sorted(n for n in named if n not in flags.FLAGS and n != "helpfull")
    assert not missing, f"README names flags that do not exist: {missing}"
