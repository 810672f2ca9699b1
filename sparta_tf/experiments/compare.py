"""The grid's names as they were before the split by job, for code that imports them here.

`sparta_tf.experiments.compare` once held the whole grid; each job now has its module
(see the package docstring). New code imports those; this module only names them again.
"""

from sparta_tf.experiments.ablation import ABLATED, ablation_table  # noqa: F401
from sparta_tf.experiments.arms import (  # noqa: F401
    EXTRA_ARMS, TRANSFER_ARM, arm_overrides, cell_config)
from sparta_tf.experiments.cache import EVAL_FILE, stored_results  # noqa: F401
from sparta_tf.experiments.cells import EvalSettings, evaluate, pack, stalled, unpack  # noqa: F401
from sparta_tf.experiments.grid import REPORT, run_cell, run_grid  # noqa: F401
from sparta_tf.experiments.report import table  # noqa: F401
from sparta_tf.experiments.stats import METRICS, paired, summarize  # noqa: F401
