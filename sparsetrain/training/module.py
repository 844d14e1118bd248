"""The LightningModule: an image classifier whose layers may be sparse.

It knows nothing about how sparsity is computed; the sparse modules inside `model` carry their own
state, and the SparsityScheduler callback drives them.
"""
import functools
import logging
from typing import Callable, Optional, Sequence

import lightning.pytorch as L
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.utilities import GradClipAlgorithmType
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from sparsetrain.training.loggers import device_scalar
from sparsetrain.training.loss_watch import LossWatch, WatchedLoss
from sparsetrain.training.lr import lr_multiplier

log = logging.getLogger("sparsetrain")


class NonFiniteLossError(RuntimeError):
    pass


class SparseClassifier(L.LightningModule):
    def __init__(self, model: nn.Module, num_classes: int, optimizer: Callable, sched: dict,
                 label_smoothing: float = 0.0, nonfinite: str = "stop",
                 subnet_levels: Optional[Sequence[float]] = None,
                 subnet_weights: Optional[Sequence[float]] = None, score_lr_scale: float = 1.0):
        super().__init__()
        if nonfinite not in ("skip", "stop"):
            raise ValueError(f"nonfinite={nonfinite!r}: use skip or stop")
        self.model = model
        self.optimizer_factory = optimizer
        self.sched = dict(sched)
        self.label_smoothing = label_smoothing
        self.nonfinite = nonfinite
        self.loss_watch = LossWatch()
        if not score_lr_scale > 0:
            raise ValueError(f"score_lr_scale={score_lr_scale} must be > 0: it multiplies optim.lr for DRESS block scores")
        self.score_lr_scale = float(score_lr_scale)
        self.subnet_levels = list(subnet_levels or [])
        self.subnet_weights = list(subnet_weights or [1.0] * len(self.subnet_levels))
        if len(self.subnet_weights) != len(self.subnet_levels):
            raise ValueError("subnet_weights needs one weight per entry of subnet_levels")
        # validate_args=False: torchmetrics' label checks read GPU values on the host, a sync every batch;
        # the datamodules' labels are in range by construction.
        self.train_acc = MulticlassAccuracy(num_classes=num_classes, average="micro", validate_args=False)
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro", validate_args=False)
        # Multi-subnet DRESS: every subnet but the main one (validated as val/*) gets val/acc@LEVEL too, so one run
        # reports a model at each level. Metric states are not persistent: checkpoints do not change.
        self.subnet_val_acc = nn.ModuleList(
            MulticlassAccuracy(num_classes=num_classes, average="micro", validate_args=False)
            for _ in self.subnet_levels[1:])
        self.skipped_steps = 0
        # Who wrote a checkpoint (recipe, model, pattern): resume refuses a mismatch unless forced.
        self.checkpoint_identity: dict = {}
        # The step at which validation last ran: the app validates once more if training ended elsewhere.
        self.validated_at_step: Optional[int] = None

    def forward(self, x):
        return self.model(x)

    def _loss(self, logits, y):
        return F.cross_entropy(logits.float(), y, label_smoothing=self.label_smoothing)

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.subnet_levels:
            loss, logits = self._multi_subnet_loss(x, y)
        else:
            logits = self(x)
            loss = self._loss(logits, y)
        # Judged in on_before_optimizer_step, once the backward is queued: no host sync here.
        self.loss_watch.record(loss, self.trainer.strategy, self.global_step, x)
        self.train_acc(logits.detach(), y)
        # Lightning reads progress-bar values on the host after every batch, which waits for the GPU's whole
        # queue: only worth it when a bar shows them (output to a file gets progress lines, read every N steps;
        # runs with trainer.enable_progress_bar=false, as in benchmarks, keep the GPU fed; the logger still gets
        # both every log_every_n_steps).
        shown = self.trainer.progress_bar_callback is not None
        self.log("train/loss", loss, prog_bar=shown)
        self.log("train/acc", self.train_acc, prog_bar=shown, on_step=True, on_epoch=False)
        self.log("lr", device_scalar(self.optimizers().param_groups[0]["lr"], self.device))
        return loss

    def _multi_subnet_loss(self, x, y):
        """DRESS multi-subnet training: every level shares the weights; the loss is their weighted sum."""
        from sparsetrain.sparse.block import set_block_level

        total, logits = 0.0, None
        for level, weight in zip(self.subnet_levels, self.subnet_weights):
            set_block_level(self.model, level)
            logits = self(x)
            loss = self._loss(logits, y)
            self.log(f"train/loss@{level:g}", loss)
            total = total + weight * loss
        # Evaluate (and export) at the first, main level.
        set_block_level(self.model, self.subnet_levels[0])
        return total, logits

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        """Clip as Lightning does, also for fused optimizers under bf16-mixed.

        Lightning's mixed-precision plugin refuses to clip for any optimizer that can unscale gradients
        itself (fused AdamW, optim/adamw.yaml's default), guarding GradScaler's fp16 unscaling. bf16-mixed
        has no scaler, so the gradients are the true ones and clipping them here is exact.
        """
        plugin = self.trainer.precision_plugin
        no_scaler = getattr(plugin, "scaler", None) is None
        if gradient_clip_val and no_scaler and getattr(optimizer, "_step_supports_amp_scaling", False):
            # The base plugin's clipping (norm or value over the optimizer's parameters), without the refusal.
            algorithm = GradClipAlgorithmType(gradient_clip_algorithm or GradClipAlgorithmType.NORM)
            Precision.clip_gradients(plugin, optimizer, gradient_clip_val, algorithm)
            return
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def on_before_optimizer_step(self, optimizer):
        watched = self.loss_watch.first_nonfinite()
        if watched is not None:
            self._on_nonfinite(watched, optimizer)

    def _on_nonfinite(self, watched: WatchedLoss, optimizer):
        """skip: drop this optimizer step's gradients, so no parameter moves (every rank alike: the flag was
        summed over ranks). stop: raise before the update; StopCheckpoint saves the state as it was."""
        if self.nonfinite == "skip":
            optimizer.zero_grad(set_to_none=True)
            self.skipped_steps += 1
            log.warning("step %d: loss is %s, step skipped (nonfinite=skip)", watched.step, watched.loss.item())
            self.log("train/skipped_steps", float(self.skipped_steps))
            return
        culprit = first_nonfinite_layer(self.model, watched.inputs)
        raise NonFiniteLossError(
            f"loss is {watched.loss.item()} at step {watched.step}; first non-finite output: {culprit}. "
            "Lower optim.lr, set trainer.gradient_clip_val, or run with nonfinite=skip.")

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.val_acc(logits, y)
        self.log("val/loss", self._loss(logits, y), prog_bar=True, sync_dist=True)
        self.log("val/acc", self.val_acc, prog_bar=True, on_epoch=True)
        if self.subnet_levels:
            self._validate_other_subnets(x, y)

    def _validate_other_subnets(self, x, y):
        from sparsetrain.sparse.block import set_block_level

        for level, metric in zip(self.subnet_levels[1:], self.subnet_val_acc):
            set_block_level(self.model, level)
            logits = self(x)
            metric(logits, y)
            self.log(f"val/loss@{level:g}", self._loss(logits, y), sync_dist=True)
            self.log(f"val/acc@{level:g}", metric, on_epoch=True)
        set_block_level(self.model, self.subnet_levels[0])

    def on_validation_epoch_end(self):
        self.validated_at_step = self.global_step

    def on_save_checkpoint(self, checkpoint):
        checkpoint["sparsetrain"] = dict(self.checkpoint_identity)

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(param_groups(self.model, self.optimizer_factory, self.score_lr_scale))
        total = int(self.trainer.estimated_stepping_batches)
        multiplier = functools.partial(
            lr_multiplier, total_steps=total, name=self.sched.get("name", "cosine"),
            warmup_steps=int(self.sched.get("warmup_steps", 0)),
            min_lr_ratio=float(self.sched.get("min_lr_ratio", 0.0)))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def param_groups(model: nn.Module, optimizer_factory, score_lr_scale: float = 1.0) -> list:
    """No weight decay on biases, norms, position embeddings and block scores (decay would shrink them
    toward pruning for no reason); the factory's weight_decay applies to the rest.

    DRESS block scores get their own group at `score_lr_scale` x the factory's lr: with Adam every
    score moves by about lr per step whatever its gradient's size, while the scores start at block
    norms (~0.3 for a 16x16 block at init), so their learning rate sets how fast the mask churns.
    """
    decay, no_decay, scores = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.endswith("block_scores"):
            scores.append(p)
        elif p.ndim <= 1 or name.endswith((".bias", "pos_embed", "cls_token")):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    if scores:
        groups.append({"params": scores, "weight_decay": 0.0, **_scaled_lr(optimizer_factory, score_lr_scale)})
    return groups


def _scaled_lr(optimizer_factory, scale: float) -> dict:
    """{'lr': base lr x scale} for a param group; {} when the scale is 1 (the group inherits the lr)."""
    if scale == 1.0:
        return {}
    base = getattr(optimizer_factory, "keywords", {}).get("lr")
    if base is None:
        raise ValueError("sparsity.score_lr_scale needs optim.lr to be set explicitly in the optimizer config")
    return {"lr": base * scale}


@torch.no_grad()
def first_nonfinite_layer(model: nn.Module, x) -> str:
    """Re-run the forward with hooks and name the first leaf module whose output is not finite."""
    found = []

    def hook(module, _inputs, output):
        if not found and torch.is_tensor(output) and not torch.isfinite(output).all():
            found.append(name_of[module])

    name_of = {m: n for n, m in model.named_modules()}
    handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    if found:
        return found[0]
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    return f"none in the forward (non-finite parameters: {bad[:3]})" if bad else "none (the loss itself overflowed)"
