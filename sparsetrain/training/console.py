"""What a run prints: progress lines where the output is not a terminal, and one block when the run ends.

A progress bar redraws one line in place, which a log file keeps as a single line stuck at its first state.
Without a terminal, `ProgressLines` prints a line every `every` optimizer steps (step/total, loss, accuracy,
images/s) and one after each validation. Loss and accuracy are read on the host only at those steps: a read makes
the host wait for the GPU's whole queue.
"""
import logging
import math
import warnings
from pathlib import Path
from typing import Optional

import lightning.pytorch as L

from sparsetrain.training.throughput import Throughput

log = logging.getLogger("sparsetrain")


def hide_lightning_notices() -> None:
    """Warnings Lightning prints on every run of a kind, with nothing for a user to change: a resumed run continues
    in its own checkpoint folder (a fresh run is refused there), and Lightning 2.6 builds torch's deprecated
    `LeafSpec` in every fit under recent torch (a notice for Lightning's maintainers)."""
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty",
                            module=r"lightning\.")
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                            category=FutureWarning, module=r"lightning\.")


class ProgressLines(L.Callback):
    def __init__(self, every: int, throughput: Throughput):
        if every < 1:
            raise ValueError(f"callbacks.progress_every_n_steps={every} must be >= 1")
        self.every = int(every)
        self.throughput = throughput
        self._reported_steps = 0  # entries of throughput.step_seconds that a line has covered
        self._last_line_step: Optional[int] = None
        self._total_steps = math.inf

    def on_train_start(self, trainer, pl_module):
        self._total_steps = trainer.estimated_stepping_batches

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step, total = trainer.global_step, self._total_steps
        # global_step stays put over the micro-batches of gradient accumulation: one line per optimizer step
        if step == self._last_line_step or (step % self.every and step != total):
            return
        self._last_line_step = step
        if not trainer.is_global_zero:
            return
        metrics = trainer.callback_metrics
        parts = [f"step {step}/{total if math.isfinite(total) else '?'}", f"epoch {trainer.current_epoch}"]
        parts += [f"{label} {float(metrics[key]):.4f}" for label, key in (("loss", "train/loss"), ("acc", "train/acc"))
                  if key in metrics]
        rate = self._images_per_second_since_last_line()
        if rate is not None:
            parts.append(f"{images_per_second_text(rate)} img/s")
        log.info("  ".join(parts))

    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        values = validation_metrics(trainer.callback_metrics)
        if values:
            log.info("validation at step %d: %s", trainer.global_step,
                     "  ".join(f"{name} {value:.4f}" for name, value in values.items()))

    def _images_per_second_since_last_line(self) -> Optional[float]:
        """Over the steps timed since the last line (a step that held a validation is not timed)."""
        start = self._reported_steps
        seconds = self.throughput.step_seconds[start:]
        images = self.throughput.step_images[start:start + len(seconds)]
        self._reported_steps = start + len(seconds)
        timed = [(s, n) for s, n in zip(seconds, images) if s == s]
        elapsed = sum(s for s, _ in timed)
        return sum(n for _, n in timed) / elapsed if elapsed > 0 else None


def validation_metrics(metrics: dict, first: str = "val/acc") -> dict:
    """The val/* entries as floats, `first` (the objective) ahead of the others in name order."""
    values = {name: float(value) for name, value in metrics.items() if name.startswith("val/")}
    return dict(sorted(values.items(), key=lambda item: (item[0] != first, item[0])))


def run_end_block(summary: dict, checkpoints: list, objective: str = "val/acc") -> str:
    """The block printed when a run ends, from summary.json's fields and the run's checkpoint files."""
    rows = [(name, f"{value:.4f}") for name, value in validation_metrics(summary["metrics"], objective).items()]
    rows = rows or [("validation", "none ran")]
    steps = str(summary["global_step"])
    if summary.get("skipped_steps"):
        steps += f" ({summary['skipped_steps']} skipped: non-finite loss)"
    rows.append(("steps", steps))
    rows.append(("images/s", throughput_text(summary)))
    rows.append(("wall time", duration_text(summary["wall_seconds"])))
    run_dir = Path(summary["run_dir"])
    files = [f"{path.relative_to(run_dir)} ({size_text(path.stat().st_size)})" for path in checkpoints]
    rows.append(("checkpoints", ", ".join(files) or "none"))
    rows.append(("run dir", str(run_dir)))
    width = max(len(label) for label, _ in rows)
    return "\n".join([f"run finished: {summary.get('recipe')}",
                      *(f"  {label:<{width}}  {value}" for label, value in rows)])


def checkpoint_files(run_dir: Path) -> list:
    return sorted(Path(run_dir).glob("checkpoints/*.ckpt"))


def throughput_text(summary: dict) -> str:
    steady = summary.get("images_per_second")
    if steady is None:
        return "not measured (no training step ran)"
    return (f"{images_per_second_text(steady)} steady state (from step {summary['steady_from_step']}), "
            f"{images_per_second_text(summary['images_per_second_whole_run'])} over the whole run")


def images_per_second_text(rate: float) -> str:
    return f"{rate:,.0f}" if rate >= 100 else f"{rate:.1f}"


def duration_text(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m {secs:02d}s" if hours else f"{minutes}m {secs:02d}s"


def size_text(size: int) -> str:
    for unit in ("B", "KiB", "MiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"
