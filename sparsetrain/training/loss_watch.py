"""Whether each training loss was finite, read on the host only when the optimizer step needs it.

Reading `isfinite(loss)` right after the forward makes the CPU wait for the forward every step; the GPU
then idles while Lightning's hooks and the backward's launches run on the host. Here the flag is copied
to pinned host memory as soon as the loss exists and read in `on_before_optimizer_step`: by then the
whole backward is queued, so the wait (for the forward only) never leaves the GPU without work.
Under DDP the flag is summed over ranks on the device first, so every rank decides alike.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class WatchedLoss:
    step: int
    loss: torch.Tensor  # detached
    inputs: torch.Tensor  # the batch, to name the first layer whose output went non-finite
    flag: torch.Tensor  # host copy of (ranks whose loss was not finite), pinned on CUDA
    copied: Optional[torch.cuda.Event]  # recorded after the copy; None on the CPU (the copy was synchronous)

    def finite(self) -> bool:
        if self.copied is not None:
            self.copied.synchronize()
        return not bool(self.flag)


class LossWatch:
    """Flags recorded per training batch, read once per optimizer step (all micro-batches under accumulation)."""

    def __init__(self):
        self._pending: list[WatchedLoss] = []

    def record(self, loss: torch.Tensor, strategy, step: int, inputs: torch.Tensor) -> None:
        loss = loss.detach()
        not_finite = strategy.reduce((~torch.isfinite(loss)).to(torch.float32), reduce_op="sum")
        on_cuda = not_finite.is_cuda
        flag = torch.empty((), dtype=torch.float32, pin_memory=on_cuda)
        flag.copy_(not_finite, non_blocking=on_cuda)
        copied = None
        if on_cuda:
            copied = torch.cuda.Event()
            copied.record()
        self._pending.append(WatchedLoss(step, loss, inputs, flag, copied))

    def first_nonfinite(self) -> Optional[WatchedLoss]:
        """The first recorded loss since the last call that was not finite on some rank; forgets them all."""
        pending, self._pending = self._pending, []
        return next((watched for watched in pending if not watched.finite()), None)
