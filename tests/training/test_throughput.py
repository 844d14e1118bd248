"""Throughput: per-step times, images/s over the steady state and the whole run, logged at window edges only."""
import csv
import time

import torch
from torch import nn

from sparsetrain.training.throughput import Throughput


class RecordingLogger:
    def __init__(self):
        self.rows = []

    def log_metrics(self, metrics, step):
        self.rows.append((step, dict(metrics)))

    def save(self):
        pass


class FakeTrainer:
    def __init__(self):
        self.global_step, self.current_epoch, self.training, self.is_global_zero = 0, 0, True, True
        self.loggers = [RecordingLogger()]


class FakeModule:
    device = torch.device("cpu")
    model = nn.Linear(4, 2)


def _run(throughput, steps, seconds_of, validate_at=()):
    trainer, module = FakeTrainer(), FakeModule()
    batch = (torch.randn(8, 4), torch.zeros(8))
    for step in range(steps):
        throughput.on_train_batch_start(trainer, module, batch, step)
        time.sleep(seconds_of(step))
        if step in validate_at:
            throughput.on_validation_start(trainer, module)
        throughput.on_train_batch_end(trainer, module, None, batch, step)
        trainer.global_step += 1
    throughput.on_train_end(trainer, module)
    return trainer


def test_steady_state_is_the_median_step_of_the_second_half_and_slow_first_steps_count_only_in_the_whole_run(
        tmp_path):
    throughput = Throughput(window=4, csv_path=tmp_path / "step_times.csv")
    _run(throughput, 12, lambda step: 0.08 if step < 3 else 0.01, validate_at=(7,))
    summary = throughput.summary()
    assert len(throughput.step_seconds) == 12
    assert throughput.step_seconds[7] != throughput.step_seconds[7]  # a step holding validation is not timed
    assert summary["steady_from_step"] == 5  # the second half of the 11 timed steps
    assert 8 / 0.02 < summary["images_per_second"] < 8 / 0.01
    assert summary["images_per_second_whole_run"] < summary["images_per_second"] / 2
    rows = list(csv.DictReader(open(tmp_path / "step_times.csv")))
    assert [int(r["step"]) for r in rows] == list(range(12)) and rows[7]["seconds"] == ""


def test_images_per_second_is_logged_at_window_edges_only():
    throughput = Throughput(window=4)
    trainer = _run(throughput, 13, lambda step: 0.001)
    logged = [(step, metrics) for step, metrics in trainer.loggers[0].rows if "perf/images_per_s" in metrics]
    assert [step for step, _ in logged] == [3, 7, 11]  # the windows' last finished steps, no stale repeats
    assert all(metrics["perf/tflops_dense_equiv"] > 0 for _, metrics in logged)
