"""What a run does around Keras's `fit`, on every backend: one callback, `Progress`.

Per step it adds img/s to the logs, stops on a non-finite loss, and checkpoints every
`checkpoint_every` steps (the epoch's last step is left to the end of the epoch: a
checkpoint at (epoch, steps) would resume into an empty epoch). Per epoch it starts a resumed
epoch's metrics from the checkpoint's sums, checks that the weights are finite, writes the
epoch's row of metrics.jsonl and TensorBoard's logs/, checkpoints at (epoch + 1, 0) and warns
of a network that does not learn. A row is written before its checkpoint: a kill between the
two reruns the epoch's end, which rewrites the row (`log_epoch`).

On JAX, Keras keeps the training state off the model's variables during an epoch, and a
callback that reads `self.model` syncs it back; `Progress` reads it only where it saves.

TensorBoard's event files are written with the `tensorboard` package's own writer, which
needs no TensorFlow; where that package is not installed there are no logs, and a warning.
"""

import json
import math
import os
import time

import keras
import numpy as np

from sparta_tf import model_dir
from sparta_tf.config import stalled, writing

try:  # the writer of TensorBoard's event files, without TensorFlow
    from tensorboard.compat.proto import event_pb2, summary_pb2
    from tensorboard.summary.writer.event_file_writer import EventFileWriter
except ImportError:  # e.g. a JAX-only machine: no logs/
    EventFileWriter = None


class Progress(keras.callbacks.Callback):
    """The run's bookkeeping (see the module docstring) for `fit` called one epoch at a time.

    Args:
        config: the run's `TrainConfig`.
        checkpoints: its `checkpoints.Checkpoints`.
        steps: the steps of a whole epoch.
        num_classes: for the warning of a network that does not learn.
        chief: whether this process writes the rows and logs (one of a multi-worker job
            does).
    """

    def __init__(self, config, checkpoints, steps, num_classes, chief=True):
        super().__init__()
        self.config, self.checkpoints, self.steps = config, checkpoints, steps
        self.num_classes, self.chief = num_classes, chief
        self.summaries = Summaries(os.path.join(config.model_dir, model_dir.LOGS)) \
            if chief else None
        self.bad = None  # where a non-finite loss or weight was found
        self.epoch, self.skip, self.sums = 0, 0, None

    def start(self, epoch, skip=0, sums=None):
        """The next `fit` trains epoch `epoch` (0-based) from step `skip`, its metrics
        going on from `sums` (the metrics' values in the checkpoint, or None). At step 0
        they start from zero: a checkpoint at an epoch's start holds the sums of the epoch
        before it."""
        self.epoch, self.skip, self.sums = epoch, skip, sums if skip else None

    def on_epoch_begin(self, epoch, logs=None):
        self.started, self.seen = time.perf_counter(), 0
        if self.sums is not None:  # after fit() has reset the metrics
            for variable, value in zip(self.model.metrics_variables, self.sums):
                variable.assign(value)

    def throughput(self):
        return self.seen / max(time.perf_counter() - self.started, 1e-9)

    def on_train_batch_end(self, batch, logs=None):
        step = self.skip + batch + 1
        self.seen += self.config.batch_size
        if logs is None:
            return
        logs["img/s"] = self.throughput()  # shown by the progress bar
        if not math.isfinite(float(logs["loss"])):
            self._stop(f"step {step}")
        elif self.config.checkpoint_every and step % self.config.checkpoint_every == 0 \
                and step < self.steps and self._finite(f"step {step}"):
            self.checkpoints.save(self.model, self.epoch, step)

    def on_epoch_end(self, epoch, logs=None):
        if self.bad is not None or not self._finite("the end of the epoch"):
            return
        lr = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        row = {"epoch": self.epoch + 1, "lr": lr, "img/s": self.throughput(),
               **{k: float(v) for k, v in (logs or {}).items() if k != "img/s"}}
        if self.skip and self.sums is None:  # resumed from a checkpoint without the sums
            row["metrics_from_step"] = self.skip + 1
        if self.chief:  # first: a kill before the save reruns the epoch's end
            log_epoch(self.config.model_dir, row)
            self.summaries.write(row)
        self.checkpoints.save(self.model, self.epoch + 1, 0)
        if self.chief:
            warn_if_stalled(self.config, row, self.num_classes)

    def _finite(self, where):
        """Whether every weight is finite; if not, stops training and notes `where`."""
        if all(np.isfinite(keras.ops.convert_to_numpy(v)).all() for v in self.model.weights):
            return True
        self._stop(where)
        return False

    def _stop(self, where):
        self.bad = where
        self.model.stop_training = True


class Summaries:
    """TensorBoard's event file of a run, in `folder` (model_dir/logs)."""

    def __init__(self, folder):
        self.folder, self.writer = folder, None

    def write(self, row):
        """Writes the epoch's `row` as scalars at step `row["epoch"]`.

        Raises:
            WriteError: the event file could not be written.
        """
        if EventFileWriter is None:
            if self.writer is None:
                print("Warning: the tensorboard package is not installed: no TensorBoard "
                      f"logs in {self.folder} (metrics.jsonl has the same rows).")
                self.writer = False
            return
        with writing(self.folder, Exception):
            if self.writer is None:
                os.makedirs(self.folder, exist_ok=True)
                self.writer = EventFileWriter(self.folder)
            values = [summary_pb2.Summary.Value(tag=name, simple_value=float(value))
                      for name, value in row.items() if name not in ("epoch",
                                                                      "metrics_from_step")]
            self.writer.add_event(event_pb2.Event(wall_time=time.time(), step=row["epoch"],
                                                  summary=summary_pb2.Summary(value=values)))
            self.writer.flush()


def log_epoch(folder, row):
    """Writes `row` to folder/metrics.jsonl.

    Rows of this epoch and later ones already there are dropped first: they belong to
    an earlier run of the model_dir (retrained from scratch, its checkpoints gone, or
    killed after the row was written and before its checkpoint), not to this one. So is
    a line that is not a row (damaged), with a warning that names it.

    Raises:
        WriteError: the file could not be written.
    """
    path = os.path.join(folder, model_dir.METRICS_FILE)
    rows = []
    if os.path.isfile(path):
        with open(path, encoding="utf-8", errors="replace") as f:
            for number, line in enumerate(f, 1):
                try:
                    if json.loads(line)["epoch"] < row["epoch"]:
                        rows.append(line.rstrip("\n") + "\n")
                except (ValueError, TypeError, KeyError, IndexError):
                    if line.strip():
                        print(f"Warning: line {number} of {path} is not a row of metrics "
                              f"({line.strip()[:60]!r}); it is dropped.")
    with writing(path):
        model_dir.write_text(path, "".join(rows + [json.dumps(row) + "\n"]))


def warn_if_stalled(config, row, num_classes):
    """Prints a warning if the epoch's loss is still at chance (`config.stalled`)."""
    if stalled(row["loss"], num_classes, row["epoch"], config.objective):
        print(f"Warning: after {row['epoch']} epochs the training loss ({row['loss']:.3f}) is "
              f"still at chance (ln {num_classes} = {math.log(num_classes):.3f}): "
              "the network is not learning. Try a lower --lr.")
