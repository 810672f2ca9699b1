"""Runs trainers with several command lines in one process, as separate runs would.

    python tests/app_cases.py '[["train", ["--eps=-1"]], ["export", ["--help"]]]'

prints one JSON line per command line: {"code": exit status, "stdout": ..., "stderr": ...}.
Starting a process imports TensorFlow (seconds); the tests of the apps' flag errors and help
start one process for all their command lines instead of one each. Each run parses its
command line afresh (the flags are reset between runs; the flags of one app are deleted
before another app defines its own) through the app's own entry point
(`flags.core.run_app`), and what escapes it is reported as the interpreter would: an exit
message on stderr with status 1, an exception as a traceback.
"""

import contextlib
import importlib
import io
import json
import os
import sys
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from flags import compare as compare_flags  # noqa: E402
from flags import core  # noqa: E402

# How each app defines its flags (trainers.train and trainers.evaluate do it on import).
DEFINE = {"train": core.define_training, "evaluate": core.define_evaluation,
          "compare": compare_flags.define_compare, "transfer": compare_flags.define_transfer,
          "export": core.define_export}


def define(app, previous):
    """Deletes the flags that `previous` (the set of their names) defined, defines `app`'s;
    returns the names of those."""
    for name in previous:
        delattr(core.FLAGS, name)
    before = set(core.FLAGS)
    name = f"trainers.{app}"
    defines_on_import = app in ("train", "evaluate") and name not in sys.modules
    importlib.import_module(name)
    if not defines_on_import:
        DEFINE[app]()
    return set(core.FLAGS) - before


def run(app, argv):
    module = sys.modules[f"trainers.{app}"]
    main = sys.modules["trainers.compare"].main if app == "transfer" else module.main
    stdout, stderr = io.StringIO(), io.StringIO()
    core.FLAGS.unparse_flags()
    sys.argv = [f"sparta-{app}", *argv]
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            core.run_app(main, module)  # as trainers.<app>.run()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
            if isinstance(e.code, str):
                print(e.code, file=sys.stderr)
        except Exception:  # pylint: disable=broad-except
            traceback.print_exc()
            code = 1
    return {"code": code, "stdout": stdout.getvalue(), "stderr": stderr.getvalue()}


def main():
    current, defined = None, set()
    out = sys.stdout
    for app, argv in json.loads(sys.argv[1]):
        if app != current:
            current, defined = app, define(app, defined)
        print(json.dumps(run(app, argv)), file=out, flush=True)


if __name__ == "__main__":
    main()
