"""Compare activations: train and evaluate every objective x activation x seed.

    python -m trainers.compare                       # quick preset, whole zoo, 3 seeds
    python -m trainers.compare --config=paper --model_dir=runs/compare_paper   # GPU
    python -m trainers.compare --activations=relu,sparta --seeds=0 --objectives=pgd

Every cell is a training run of the same recipe (the flags of sparta-train) in
--model_dir/{objective}/{activation}/seed{seed}, evaluated on the same test images:
clean, PGD-{--eval_pgd_steps} and AutoAttack accuracy at --eps. Writes comparison.md
(the table, also printed), comparison.json and the PNGs to --model_dir (--report_name
names another report of the same cells). Rerunning the
same command resumes: finished cells are skipped, a killed one continues.
--report_only writes the reports of the cells finished so far, training nothing.

On TensorFlow and on JAX (KERAS_BACKEND=jax, where TensorFlow need not be installed): the
grid's AutoAttack is written in keras.ops (--autoattack=keras, the default). ART's
(--autoattack=art), with which the committed grids were measured, needs TensorFlow.
"""

import os
import sys

from absl import app, logging

from flags import compare as compare_flags
from flags import core
from sparta_tf import data, evaluation, model_dir, training, transfer
from sparta_tf.experiments import grid, report

def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # keep TF's INFO lines off the progress output
    try:
        if compare_flags.FLAGS.autoattack == "art":
            evaluation.needs_tensorflow("ART's AutoAttack (--autoattack=art)")
        base = core.train_config()
        results = grid.run_grid(base, **compare_flags.grid(base))
    except (training.ConfigMismatchError, training.NonFiniteLossError, training.WriteError,
            data.DatasetUnavailableError, data.BadDataError, FileNotFoundError,
            training.SetupError, transfer.TransferError, transfer.ModelFileError,
            model_dir.LockedError, model_dir.NotAModelDirError, evaluation.BackendError) as e:
        sys.exit(f"error: {e}")
    print(report.table(results))
    name = compare_flags.FLAGS.report_name
    written = [f"{name}.md", f"{name}.json"]
    written += [os.path.basename(path) for path in results["plots"]]
    print(f"Wrote {', '.join(written)} to {base.model_dir}")


def run(define_flags=compare_flags.define_compare, app_module=sys.modules[__name__]):
    """Defines the flags (sparta-compare's, or a sibling's such as sparta-transfer's), runs main."""
    define_flags()
    core.run_app(main, app_module)


if __name__ == "__main__":
    run()
