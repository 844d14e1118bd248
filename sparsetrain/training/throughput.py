"""Every training step's duration, and images/s in the steady state.

A step's time runs from its batch start to the next one's, so it holds everything the run does per step
(data, host hooks, the GPU's work, and any gap between them). On CUDA each batch start records an event on
the current stream and the events are read once they have completed (`Event.query`), so measuring never makes
the host wait for the GPU; on the CPU the host clock is read.

The first steps of a run are not representative (graph capture, cudnn autotune, cuSPARSELt algorithm search,
caching allocators growing), so images/s is reported twice: over the steady state (the median step of the
second half of the run, with the step it starts at) and over the whole run (all images over all step time).
"""
from __future__ import annotations

import csv
import statistics
import time
from collections import deque
from pathlib import Path
from typing import Optional

import lightning.pytorch as L
import torch

from sparsetrain.training.flops import dense_forward_flops
from sparsetrain.training.loggers import log_measured


class _Clock:
    """Marks on the device's timeline: CUDA events, or host clock readings on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def done(self, mark) -> bool:
        return not self.cuda or mark.query()

    def seconds(self, start, end) -> float:
        return start.elapsed_time(end) / 1e3 if self.cuda else end - start


class Throughput(L.Callback):
    """Per-step times (`step_seconds`), logged images/s every `window` steps, and the run's summary figures.

    TFLOP/s counts dense-equivalent work (a sparse layer counts as its dense GEMM, training = 3x the forward), so
    dense and sparse runs of one model compare on the same scale. A step that contains a validation loop is
    left out: it measures validation, not training.
    """

    def __init__(self, window: int = 20, csv_path: Optional[Path] = None):
        self.window = window
        self.csv_path = csv_path
        self.train_flops_per_image: Optional[float] = None
        self.step_seconds: list[float] = []  # completed steps, in order
        self.step_images: list[int] = []
        self.first_step: Optional[int] = None  # global step of the first timed batch (a resumed run starts late)
        self._clock: Optional[_Clock] = None
        self._open: Optional[tuple] = None  # (mark, images) of the batch in flight
        self._pending: deque = deque()  # (start mark, end mark, images, counts) not yet read
        self._logged = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self._clock is None:
            self._clock = _Clock(pl_module.device)
            self.first_step = trainer.global_step
        mark = self._clock.mark()
        self._close(mark)
        self._open = (mark, int(batch[0].shape[0]), True)
        self._read_completed()
        if len(self.step_seconds) - self._logged >= self.window:
            self._log_window(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.train_flops_per_image is None:
            self.train_flops_per_image = 3 * dense_forward_flops(pl_module.model, batch[0][:1])

    def on_validation_start(self, trainer, pl_module):
        if trainer.training and self._open is not None:
            mark, images, _ = self._open
            self._open = (mark, images, False)

    def on_train_end(self, trainer, pl_module):
        if self._clock is None:
            return
        self._close(self._clock.mark())
        self._open = None
        if self._clock.cuda:
            torch.cuda.synchronize(pl_module.device)
        self._read_completed()
        if self.csv_path is not None and trainer.is_global_zero and self.step_seconds:
            self._write_csv()

    def _close(self, end_mark) -> None:
        if self._open is not None:
            start, images, counts = self._open
            self._pending.append((start, end_mark, images, counts))

    def _read_completed(self) -> None:
        while self._pending and self._clock.done(self._pending[0][1]):
            start, end, images, counts = self._pending.popleft()
            self.step_seconds.append(self._clock.seconds(start, end) if counts else float("nan"))
            self.step_images.append(images)

    def _log_window(self, trainer, pl_module) -> None:
        """The median step of the steps read since the last window, at the last finished step only."""
        recent = [s for s in self.step_seconds[self._logged:] if s == s]
        images = self.step_images[self._logged:]
        self._logged = len(self.step_seconds)
        if not recent:
            return
        rate = statistics.median(images) / statistics.median(recent)
        metrics = {"perf/images_per_s": rate}
        if self.train_flops_per_image:
            metrics["perf/tflops_dense_equiv"] = rate * self.train_flops_per_image / 1e12
        if pl_module.device.type == "cuda":
            metrics["perf/peak_mem_gb"] = torch.cuda.max_memory_allocated(pl_module.device) / 2**30
        log_measured(trainer, metrics)

    def _write_csv(self) -> None:
        self.csv_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.csv_path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["step", "seconds", "images"])
            for i, (seconds, images) in enumerate(zip(self.step_seconds, self.step_images)):
                writer.writerow([self.first_step + i, "" if seconds != seconds else f"{seconds:.6f}", images])

    def summary(self) -> dict:
        """images/s over the steady state (median step of the run's second half) and the whole run."""
        timed = [(i, s, n) for i, (s, n) in enumerate(zip(self.step_seconds, self.step_images)) if s == s]
        if not timed:
            return {"images_per_second": None, "steady_from_step": None, "images_per_second_whole_run": None,
                    "train_tflops_dense_equiv": None}
        steady = timed[len(timed) // 2:]
        rate = statistics.median(n for _, _, n in steady) / statistics.median(s for _, s, _ in steady)
        whole = sum(n for _, _, n in timed) / sum(s for _, s, _ in timed)
        return {
            "images_per_second": rate,
            "steady_from_step": self.first_step + steady[0][0],
            "images_per_second_whole_run": whole,
            "train_tflops_dense_equiv": rate * self.train_flops_per_image / 1e12 if self.train_flops_per_image else None,
        }

    @property
    def images_per_second(self) -> Optional[float]:
        return self.summary()["images_per_second"]
