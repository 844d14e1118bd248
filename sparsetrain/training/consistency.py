"""DDP: every rank must hold the same masks.

Masks are recomputed from the weights each rank holds after the synchronized optimizer step, so ranks agree
without exchanging masks. `MaskAgreement` checks that this holds instead of trusting it: it gathers each
rank's `mask_checksum` when training starts (after a resume: proof that every rank restored the same sparsity
state from the checkpoint, which rank 0 alone wrote) and every `every` steps, and stops the run if they differ.
"""
import lightning.pytorch as L
import torch

from sparsetrain.sparse.sparsify import mask_checksum, sparse_modules
from sparsetrain.training.loggers import log_measured


class MaskDivergenceError(RuntimeError):
    pass


class MaskAgreement(L.Callback):
    """Gathers the per-rank mask digests under DDP (nothing to do on one rank); logs
    `sparsity/ranks_agreeing` (the number of ranks whose masks equal rank 0's) and raises MaskDivergenceError,
    on every rank at once, if any rank differs."""

    def __init__(self, every: int = 50):
        self.every = max(1, int(every))

    def on_train_start(self, trainer, pl_module):
        digests = self._gather(trainer, pl_module)
        if digests is None:
            return
        when = f"after resuming from {trainer.ckpt_path}" if trainer.ckpt_path else "at start"
        _require_agreement(digests, trainer.global_step, when)
        if trainer.is_global_zero:
            print(f"masks agree on all {len(digests)} ranks at step {trainer.global_step} ({when}): "
                  f"mask digests {digests}", flush=True)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if (trainer.global_step - 1) % self.every:
            return
        digests = self._gather(trainer, pl_module)
        if digests is None:
            return
        log_measured(trainer, {"sparsity/ranks_agreeing": float(sum(c == digests[0] for c in digests))})
        _require_agreement(digests, trainer.global_step, "after the mask update")

    @staticmethod
    def _gather(trainer, pl_module):
        if trainer.world_size < 2 or not sparse_modules(pl_module.model):
            return None
        local = torch.tensor([mask_checksum(pl_module.model)], dtype=torch.int64, device=pl_module.device)
        gathered = [torch.empty_like(local) for _ in range(trainer.world_size)]
        torch.distributed.all_gather(gathered, local)
        return [int(d) for d in torch.cat(gathered).tolist()]


def _require_agreement(digests: list, step: int, when: str) -> None:
    if len(set(digests)) > 1:
        raise MaskDivergenceError(
            f"DDP ranks hold different masks at step {step} ({when}): mask digest per rank {digests}. "
            "Masks follow the weights, so the ranks' weights or sparsity state differ: run every rank with the "
            "same code and config, and resume all of them from the same checkpoint")
