"""Lightning callbacks: drive the pruning schedule, report layers, snapshot masks, fill the wandb run."""
import json
import logging
import sys
from pathlib import Path

import lightning.pytorch as L

from sparsetrain.sparse.schedules import PruneSchedule
from sparsetrain.sparse.sparsify import layer_table, mask_checksum, sparse_modules
from sparsetrain.training.loggers import device_scalar, log_measured

log = logging.getLogger("sparsetrain")

PHASE_CODES = {"dense_warmup": 0, "pruning": 1, "sparse": 2, "dense_finetune": 3}


class SparsityScheduler(L.Callback):
    """Applies PruneSchedule.phase(step) to every sparse layer before each training step, and logs
    the phase and the level every step, and every `log_every` steps (at those steps only) the mask flip rate
    (fraction of mask entries changed per mask update, averaged over the updates since the last log) and each
    layer's measured sparsity.

    Masks are computed from the weights every rank holds after the synchronized optimizer step, so
    DDP ranks agree without communication; `mask_checksum` is logged to prove it.
    """

    def __init__(self, schedule: PruneSchedule, log_every: int = 50):
        self.schedule = schedule
        self.log_every = max(1, int(log_every))
        self._model = None
        self._layers = []  # found once at fit start: walking a ViT-L's modules each step would cost host time
        self._measured_at = None

    def setup(self, trainer, pl_module, stage):
        self._model = pl_module.model

    def on_fit_start(self, trainer, pl_module):
        self._layers = [module for _, module in sparse_modules(pl_module.model)]

    # A resumed run logs exactly what an uninterrupted one does: the flips since the last log sit in a
    # non-persistent buffer, so they travel in the checkpoint here.
    def state_dict(self) -> dict:
        layers = sparse_modules(self._model) if self._model is not None else []
        return {"pending_flips": [int(module.flip_count) for _, module in layers]}

    def load_state_dict(self, state_dict: dict) -> None:
        layers = sparse_modules(self._model) if self._model is not None else []
        flips = state_dict.get("pending_flips", [])
        if len(flips) == len(layers):
            for (_, module), count in zip(layers, flips):
                module.flip_count.fill_(count)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        step = trainer.global_step
        phase = self.schedule.phase(step)
        for module in self._layers:
            module.apply_phase(phase, step)
        pl_module.log("sparsity/phase", device_scalar(PHASE_CODES[phase.name], pl_module.device))
        pl_module.log("sparsity/level", device_scalar(phase.level, pl_module.device))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        # global_step already counts this step: measure at the first step and every log_every after, once per
        # optimizer step (it stays put over the micro-batches of gradient accumulation)
        if (trainer.global_step - 1) % self.log_every or trainer.global_step == self._measured_at:
            return
        self._measured_at = trainer.global_step
        layers = sparse_modules(pl_module.model)
        if not layers:
            return
        flips = [module.pop_flip_rate() for _, module in layers]
        # flips add up over the mask updates since the last log: report the mean fraction per update
        done = trainer.global_step - 1
        updates = sum(self.schedule.phase(s).update_mask for s in range(max(0, done - self.log_every + 1), done + 1))
        logs = {"sparsity/flip_rate": sum(flips) / len(flips) / max(1, updates)}
        for row in layer_table(pl_module.model):
            if row["pattern"] != "dense" and row.get("measured_sparsity") is not None:
                logs[f"sparsity/layer/{row['name']}"] = float(row["measured_sparsity"])
        logs["sparsity/mask_checksum"] = float(mask_checksum(pl_module.model) % (1 << 24))
        log_measured(trainer, logs)


class MaskedDecay(L.Callback):
    """After every optimizer step, shrinks each weight-sparse layer's pruned weights by strength x the
    current learning rate (decoupled, like AdamW's decay, but on pruned entries only)."""

    def __init__(self, strength: float):
        if strength < 0:
            raise ValueError(f"masked_decay={strength} must be >= 0")
        self.strength = float(strength)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            return  # no optimizer step yet: gradients are still accumulating
        lr = trainer.optimizers[0].param_groups[0]["lr"]
        for _, layer in sparse_modules(pl_module.model):
            layer.decay_pruned_weights(self.strength * lr)


class LayerReport(L.Callback):
    """Prints the per-layer table once the first training step has run (backends are chosen for the
    device and compute dtype of that first forward) and saves it as <run_dir>/layers.json."""

    def __init__(self, run_dir: Path, records: list):
        self.run_dir = Path(run_dir)
        self.records = records
        self.reported = False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.reported:
            return
        self.reported = True
        if trainer.is_global_zero:
            rows = merge_records(self.records, layer_table(pl_module.model))
            print_layer_table(rows)
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "layers.json").write_text(json.dumps(rows, indent=1))


def merge_records(records: list, table: list) -> list:
    """The sparsifier's decisions (incl. layers left dense and why) joined with measured sparsity."""
    measured = {row["name"]: row for row in table}
    rows = []
    for rec in records:
        row = dict(rec)
        row.update({k: v for k, v in measured.get(rec["name"], {}).items() if k not in row or v is not None})
        rows.append(row)
    return rows


def print_layer_table(rows: list) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="layers (pattern / backend / why)", show_lines=False)
    for col in ("layer", "shape", "pattern", "backend", "sparsity", "reason"):
        table.add_column(col)
    for r in rows:
        sparsity = r.get("measured_sparsity")
        table.add_row(r["name"], "x".join(map(str, r.get("shape", ()))), r.get("pattern", "dense"),
                      str(r.get("backend") or "-"), "-" if sparsity is None else f"{sparsity:.2f}",
                      r.get("reason") or "")
    n_sparse = sum(r.get("pattern", "dense") != "dense" for r in rows)
    # In a log file rich would wrap at 80 columns and shred the reasons; give it room instead.
    console = Console() if sys.stdout.isatty() else Console(width=220)
    console.print(table)
    console.print(f"{n_sparse} of {len(rows)} linear/conv layers are sparse; the rest run dense.")


class MaskSnapshots(L.Callback):
    """Mask pictures of a few sparse layers at the end of training: PNGs in <run_dir>/masks/ and, with
    wandb, logged images. 2:4 masks are shown at one pixel per weight, block masks whole."""

    def __init__(self, run_dir: Path, max_layers: int = 3):
        self.folder = Path(run_dir) / "masks"
        self.max_layers = max_layers

    def on_train_end(self, trainer, pl_module):
        if not trainer.is_global_zero:
            return
        from sparsetrain.training.visuals import mask_image, save_mask_png

        layers = [(n, m) for n, m in sparse_modules(pl_module.model) if m.pattern != "act24"][: self.max_layers]
        wandb_logger = _wandb_logger(trainer)
        for name, module in layers:
            view = "whole" if module.pattern == "block" else "crop"
            mask = module.mask.detach().cpu()
            save_mask_png(mask, self.folder / f"{name}.png", title=f"{name} ({module.pattern})", view=view)
            if wandb_logger is not None:  # one key per layer: the pictures differ in size
                wandb_logger.log_image(key=f"masks/{name}", images=[mask_image(mask, view=view)],
                                       caption=[f"{module.pattern}, step {trainer.global_step}"])


class WandbRunInfo(L.Callback):
    """Puts the resolved config and the per-layer table into the wandb run, once."""

    def __init__(self, config: dict, records: list):
        self.config = config
        self.records = records

    def on_train_start(self, trainer, pl_module):
        wandb_logger = _wandb_logger(trainer)
        if wandb_logger is None or not trainer.is_global_zero:
            return
        wandb_logger.experiment.config.update(self.config, allow_val_change=True)
        rows = merge_records(self.records, layer_table(pl_module.model))
        columns = ["name", "shape", "pattern", "backend", "measured_sparsity", "reason"]
        data = [[str(r.get(c)) if c == "shape" else r.get(c) for c in columns] for r in rows]
        wandb_logger.log_table(key="layers", columns=columns, data=data)


def _wandb_logger(trainer):
    from lightning.pytorch.loggers import WandbLogger

    return next((lg for lg in trainer.loggers if isinstance(lg, WandbLogger)), None)
