"""What a checkpoint needs beyond Lightning's defaults for a resumed run to match one that never stopped.

- `ResumeState`: the global RNG states (torch CPU and CUDA, numpy, python), which dropout and drop-path draw
  from (Lightning does not checkpoint them, and `seed_everything` at start-up would replay step 0's draws), and
  the logging step, which Lightning restores one too high from an end-of-epoch checkpoint.
- `ResumableCSVLogger`: Lightning's CSVLogger deletes an existing metrics.csv when a run starts again; this one
  keeps the rows written before the resume point and writes every row at once.
- The row of the step a checkpoint ends: step checkpoints are written in on_train_batch_end, before Lightning
  logs that step, so a kill in between would lose the row for good (the resumed run starts after it). The
  checkpoint carries the row, and a resumed run puts it back into metrics.csv when it is missing there.

The data order is the third piece: `ResumableDataLoader` in data.py.
"""
import csv
import logging
import os
import random
from typing import Optional

import lightning.pytorch as L
import numpy as np
import torch
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.fabric.utilities.apply_func import convert_tensors_to_scalars
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

log = logging.getLogger("sparsetrain")


def capture_rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # This rank's device only: reading every visible GPU's generator would open a context on each of them.
        state["cuda"] = torch.cuda.get_rng_state(torch.cuda.current_device())
    return state


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if torch.is_tensor(state.get("cuda")) and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"], torch.cuda.current_device())


class ResumeState(L.Callback):
    """Puts the global RNG states and the number of training batches done in every checkpoint, and applies
    them right before the first training step of a resumed run.

    - RNG: whatever the run did between start-up and that step (building the model, starting loaders, a
      re-run validation) leaves no trace in the draws of the steps that follow. Every rank is seeded alike by
      `seed_everything`, so rank 0's states (the ones saved) serve all ranks.
    - The step that loggers see (Lightning's `_batches_that_stepped`): Lightning 2.6 restores it one too high
      from a checkpoint written at the end of an epoch, which would skip a step in metrics.csv and wandb.

    A checkpoint written in the middle of a step (the non-finite stop) gets the RNG as the step found it, as
    that step is tried again on resume.
    """

    def __init__(self):
        self._batches_done = 0
        self._pending: Optional[dict] = None
        self._step_start_rng: Optional[dict] = None

    def state_dict(self) -> dict:
        # A checkpoint written in the middle of a step (the non-finite stop) holds the RNG as that step found
        # it, since the step will be tried again.
        rng = self._step_start_rng if self._step_start_rng is not None else capture_rng_state()
        return {"rng": rng, "batches_done": self._batches_done}

    def load_state_dict(self, state_dict: dict) -> None:
        self._pending = state_dict
        self._batches_done = int(state_dict.get("batches_done", 0))

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        row = unlogged_step_row(trainer)
        if row is not None:
            checkpoint["callbacks"][self.state_key]["unlogged_row"] = row

    def on_train_start(self, trainer, pl_module):
        # After every strategy has restored the callbacks, before a restarted validation logs anything.
        row = (self._pending or {}).get("unlogged_row")
        if row is not None:
            for logger in trainer.loggers:
                if isinstance(logger, ResumableCSVLogger):
                    logger.experiment.restore_row(row)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self._pending is not None:
            restore_rng_state(self._pending["rng"])
            loop = trainer.fit_loop.epoch_loop
            if "batches_done" in self._pending and trainer.accumulate_grad_batches == 1:
                if loop._batches_that_stepped != self._batches_done:
                    log.debug("logging step %d restored as %d", loop._batches_that_stepped, self._batches_done)
                    loop._batches_that_stepped = self._batches_done
            self._pending = None
        self._step_start_rng = capture_rng_state()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._batches_done += 1
        self._step_start_rng = None


def unlogged_step_row(trainer) -> Optional[dict]:
    """The metrics row Lightning is about to log for the batch that is ending, as its CSV logger would write
    it, or None outside on_train_batch_end or when this step logs nothing (log_every_n_steps, accumulation).
    """
    loop = trainer.fit_loop.epoch_loop
    progress = loop.batch_progress.current
    if progress.processed == progress.completed:  # not between a step's end and its logging
        return None
    connector = trainer._logger_connector
    if trainer.fit_loop._should_accumulate() or not (connector.should_update_logs or trainer.fast_dev_run):
        return None
    metrics = convert_tensors_to_scalars(connector.metrics["log"])
    if not metrics:
        return None
    # The same keys and values LoggerConnector.log_metrics hands the loggers.
    metrics.setdefault("epoch", trainer.current_epoch)
    return {**metrics, "step": loop._batches_that_stepped}


class ResumableCSVLogger(CSVLogger):
    """CSVLogger for a run that may be resumed: <save_dir>/<name>/metrics.csv holds the whole run.

    On a resume, the rows of the earlier process up to the resume point are kept and its rows from there on
    (steps that are trained again) are replaced. Pass flush_logs_every_n_steps=1 (the config does) so the file
    is always complete on disk; rewrites of the file are atomic.
    """

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ResumableExperimentWriter(log_dir=self.log_dir)
        return self._experiment


class _ResumableExperimentWriter(ExperimentWriter):
    def _check_log_dir_exists(self) -> None:
        # Lightning deletes metrics.csv here; keep its rows until the first save knows the resume point.
        self._history = read_metric_rows(self.metrics_file_path) if os.path.isfile(self.metrics_file_path) else None

    def restore_row(self, row: dict) -> None:
        """Put back the row of the step the resume checkpoint ended, unless the killed process wrote it."""
        history = self._history if self._history is not None else []
        step = int(row["step"])
        if any(_step_of(old) == step and row.keys() <= old.keys() for old in history):
            return
        self._history = sorted([*history, row], key=lambda old: _step_of(old) or 0)
        log.info("metrics.csv: put back the row of step %d, which the stopped run had not written", step)

    def save(self) -> None:
        if self._history is None or not self.metrics:
            return super().save()
        # The first rows of this process: older rows from this step on were trained again, so they go.
        first_step = min(int(row["step"]) for row in self.metrics)
        kept = [row for row in self._history if _step_of(row) is not None and _step_of(row) < first_step]
        dropped = len(self._history) - len(kept)
        self._history = None
        keys = set(self.metrics_keys).union(*self.metrics, *kept)
        self.metrics_keys = sorted(keys)
        _write_rows_atomically(self.metrics_file_path, self.metrics_keys, kept + self.metrics)
        self.metrics = []
        if dropped:
            log.info("metrics.csv: replaced %d row(s) from step %d on, which this run trains again",
                     dropped, first_step)

    def _rewrite_with_new_header(self, fieldnames: list) -> None:
        _write_rows_atomically(self.metrics_file_path, fieldnames, read_metric_rows(self.metrics_file_path))


def read_metric_rows(path) -> list:
    """Rows of a metrics.csv as dicts without empty cells; a row cut short by a kill is left out."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f, restkey="__extra__")
        rows = []
        for row in reader:
            if "__extra__" in row or None in row.values():
                continue
            rows.append({k: v for k, v in row.items() if v != ""})
    return rows


def _step_of(row: dict) -> Optional[int]:
    try:
        return int(float(row["step"]))
    except (KeyError, ValueError):
        return None


def _write_rows_atomically(path: str, fieldnames: list, rows: list) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fieldnames)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)
