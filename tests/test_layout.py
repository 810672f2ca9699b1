"""The shape of the library: each module of sparta_tf is small enough to read at a sitting."""

import ast
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


def _imports_of_sparta_tf(path):
    """(module names of sparta_tf that `path` imports, whether any import of them sits
    inside a function)."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    names, nested = set(), False
    functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef,
                                                              ast.AsyncFunctionDef))]
    inside = {id(n) for f in functions for n in ast.walk(f)}
    for node in ast.walk(tree):
        found = []
        if isinstance(node, ast.ImportFrom) and node.module and \
                node.module.startswith("sparta_tf"):
            found = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            found = [a.name for a in node.names if a.name.startswith("sparta_tf")]
        if found:
            names.update(found)
            nested = nested or id(node) in inside
    return names, nested


def test_imports_point_down_and_sit_at_module_level():
    """No module of sparta_tf imports one that imports it, at any distance, and none imports
    another inside a function (a condition on the backend at module level is fine)."""
    paths = glob.glob(os.path.join(ROOT, "sparta_tf", "**", "*.py"), recursive=True)
    modules = {os.path.relpath(p, ROOT)[:-3].replace(os.sep, ".").removesuffix(".__init__"): p
               for p in paths}
    graph, nested = {}, []
    for module, path in modules.items():
        names, inner = _imports_of_sparta_tf(path)
        # Not the package itself: `from sparta_tf import x` runs its __init__, which imports
        # the public modules; that is how a package exposes them, not a circle of ours.
        graph[module] = {n for n in names if n in modules and n not in (module, "sparta_tf")}
        if inner:
            nested.append(module)
    assert not nested, f"imports of sparta_tf inside a function: {nested}"

    def reaches(start, goal, seen):
        for nxt in graph[start]:
            if nxt == goal or (nxt not in seen and not seen.add(nxt)
                               and reaches(nxt, goal, seen)):
                return True
        return False

    circles = sorted(m for m in graph if reaches(m, m, set()))
    assert not circles, f"modules that import themselves through others: {circles}"
    assert graph["sparta_tf.training"] >= {"sparta_tf.adversarial", "sparta_tf.callbacks"}
