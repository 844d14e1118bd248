"""BatchNorm running statistics re-estimated under the current masks before a model is evaluated or saved.

A BatchNorm's running mean and variance average the batch statistics of the last ~10 steps (momentum 0.1). In
training that is harmless: train-mode BatchNorm normalises with each batch's own statistics. In evaluation it
normalises with the running ones, and when masks move every step (blocks re-picked by magnitude or by DRESS
scores, a pruned block growing back under the straight-through estimator) those describe networks that no longer
exist: on the Fashion-MNIST ResNet-50 with blocks re-picked every step, evaluation with the running statistics
loses points that re-estimating them on a few training batches gives back (results/accuracy.md).

Re-estimating them changes nothing about training (train-mode BatchNorm never reads them), so a run's weights,
masks and resume behaviour are the same with or without it; only evaluation and saved checkpoints see the new
statistics.
"""
from __future__ import annotations

import logging
from typing import Iterable

import lightning.pytorch as L
import torch
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from sparsetrain.sparse import sparse_modules
from sparsetrain.training.checkpoints import is_final_step

log = logging.getLogger(__name__)


def tracked_batchnorms(model: nn.Module) -> list[_BatchNorm]:
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


def recalibrate_batchnorm(model: nn.Module, images: Iterable[torch.Tensor]) -> int:
    """Reset every tracked BatchNorm's running statistics and re-estimate them as the plain average over
    `images` (batches already on the model's device), with every other module in eval mode: sparse layers
    use their current masks and refresh nothing, dropout is off. Modes and momenta are restored afterwards.
    Returns the number of batches used."""
    norms = tracked_batchnorms(model)
    modes = {module: module.training for module in model.modules()}
    momenta = [norm.momentum for norm in norms]
    used = 0
    try:
        model.eval()
        for norm in norms:
            norm.reset_running_stats()
            norm.momentum = None  # a cumulative average: every batch counts the same
            norm.train()
        with torch.no_grad():
            for x in images:
                model(x)
                used += 1
    finally:
        for module, training in modes.items():
            module.training = training
        for norm, momentum in zip(norms, momenta):
            norm.momentum = momentum
    if norms and used == 0:
        raise ValueError("BatchNorm recalibration got no batches: the calibration loader is empty; lower "
                         "callbacks.bn_recalibration_batches or data.batch_size, or set it to 0 to turn it off")
    return used


class BatchNormRecalibration(L.Callback):
    """Before each validation of a fit and before the final checkpoint, re-estimates the BatchNorm
    statistics of a sparse network on `batches` fixed training batches (the datamodule's
    `calibration_dataloader`), under the run's precision. Idle, with the reason logged, for networks without
    BatchNorm or without sparse layers (their running statistics follow fixed weights)."""

    def __init__(self, batches: int):
        if batches < 1:
            raise ValueError(f"callbacks.bn_recalibration_batches={batches}: give a positive number of batches, "
                             "or 0 in the config to leave the callback out")
        self.batches = int(batches)
        self._active = False
        self._done_at_step = None

    def on_fit_start(self, trainer, pl_module):
        has_norms = bool(tracked_batchnorms(pl_module.model))
        has_sparse = bool(sparse_modules(pl_module.model))
        self._active = has_norms and has_sparse
        if self._active:
            log.info("BatchNorm statistics re-estimated on %d fixed training batches before each validation and "
                     "the final checkpoint (masks move between steps)", self.batches)
        else:
            log.info("BatchNorm recalibration idle: the network has %s", "no BatchNorm" if not has_norms
                     else "no sparse layers")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        # Lightning runs checkpoint callbacks after all others, so last.ckpt of the final step holds these.
        if is_final_step(trainer):
            self._recalibrate(trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        # A fit stopped early (max_time, early stopping): LatestCheckpoint saves here too, after this.
        self._recalibrate(trainer, pl_module)

    def on_validation_start(self, trainer, pl_module):
        if not trainer.sanity_checking and trainer.state.fn == TrainerFn.FITTING:
            self._recalibrate(trainer, pl_module)

    def _recalibrate(self, trainer, pl_module) -> None:
        if not self._active or self._done_at_step == trainer.global_step:
            return  # the weights have not changed since the last estimate
        loader = trainer.datamodule.calibration_dataloader(self.batches)
        device = pl_module.device
        with trainer.precision_plugin.forward_context():
            recalibrate_batchnorm(pl_module.model, (x.to(device, non_blocking=True) for x, _ in loader))
        self._done_at_step = trainer.global_step
