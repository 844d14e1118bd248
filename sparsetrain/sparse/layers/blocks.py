"""Block sparsity (BlockConfig): whole b x b blocks of the weight are pruned, ranked by their norm or by learned
scores (DRESS), at a level the schedule may move. Where the Triton kernels serve (sparsetrain.gpu.backends.
block_routes), forward and input gradient skip the pruned blocks; elsewhere the layer runs masked dense."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparsetrain.gpu.backends.block_routes import kernel_serves, resolve_block_route
from sparsetrain.sparse.block import (
    BlockScoreSTE,
    block_mask_from_scores,
    block_norms,
    check_block_divisible,
    expand_block_mask,
    kept_block_count,
)
from sparsetrain.sparse.block_linear import block_sparse_linear, block_sparse_linear_gelu
from sparsetrain.sparse.config import BlockConfig
from sparsetrain.sparse.layers.base import SparseGemmLayer
from sparsetrain.sparse.layers.linear_conv import SparseConv1x1, SparseLinear
from sparsetrain.sparse.layers.registry import register_layer
from sparsetrain.sparse.schedules import Phase


def _masked_weight(w: Tensor, mask: Tensor, grad_mode: str) -> Tensor:
    """w * mask with exact zeros. "masked": w gets the masked gradient; "ste": w gets the dense
    gradient. A float mask that requires grad receives dL/dmask = dL/dw_eff * w either way."""
    if grad_mode == "masked":
        return w * mask
    w_eff = w - (w * (1 - mask)).detach()
    if mask.requires_grad:
        w_eff = w_eff + w.detach() * (mask - mask.detach())
    return w_eff


class BlockLayer(SparseGemmLayer):
    """Block-sparse weights, with the kernels' index of the kept blocks kept up to date with the mask."""

    sparse_config: BlockConfig
    pattern_label = "block sparsity"
    forced_backend = "triton_bsr"
    forced_backend_needs = "CUDA, fp16/bf16, blocks of 16/32/64"

    def _attach_pattern_state(self, config: BlockConfig) -> None:
        self._block_routes: dict[tuple[torch.device, torch.dtype], tuple[str, str]] = {}
        self._block_index = None  # ((stored mask's storage, version, level), its block mask, its BlockIndex)
        self._block_index_stale = False  # True after a forward in which learned scores wrote the mask
        self.level = config.sparsity  # the schedule may move it
        if config.criterion == "scores":
            self.block_scores = nn.Parameter(self._initial_scores())

    @classmethod
    def shape_problem(cls, out_features: int, in_features: int, config: BlockConfig) -> str | None:
        try:
            check_block_divisible((out_features, in_features), config.block_size)
        except ValueError as error:
            return str(error)
        return None

    # -- the kernels or masked dense -------------------------------------------------------------

    def _choose_backend(self, device: torch.device, dtype: torch.dtype) -> None:
        self._block_route(device, dtype)

    def _block_route(self, device: torch.device, dtype: torch.dtype) -> str:
        """"triton_bsr" or "emulated" for a block layer on (device, compute dtype), resolved once per pair."""
        key = (device, dtype)
        if key not in self._block_routes:
            config = self.sparse_config
            self._block_routes[key] = resolve_block_route(config.backend, config.block_size, device, dtype)
        if key != self._backend_key:
            (self.backend_name, self.backend_reason), self._backend_key = self._block_routes[key], key
        return self.backend_name

    # -- masks and level -------------------------------------------------------------------------

    def _initial_scores(self) -> Tensor:
        """Learned block scores as BlockConfig.score_init starts them: the block norms of the weight as it is
        now, or uniform in [0, 1) (superblock's init; drawn from the global RNG, so the run's seed fixes it)."""
        norms = block_norms(self._weight_2d(), self.sparse_config.block_size)
        if self.sparse_config.score_init == "uniform":
            return torch.rand(norms.shape, device=norms.device).to(self.weight.dtype)
        return norms.to(self.weight.dtype)

    def _mask_from(self, w: Tensor) -> Tensor:
        config = self.sparse_config
        scores = self.block_scores if config.criterion == "scores" else self._magnitude_ranks(w)
        return expand_block_mask(block_mask_from_scores(scores, self.level), config.block_size)

    def _magnitude_ranks(self, w: Tensor) -> Tensor:
        """Block norms, the magnitude criterion's ranking. Under masked gradients a pruned block is frozen
        at the value it was pruned with, so its norm says nothing about what it would contribute now: every
        kept block ranks above every pruned one. A rising level then prunes only kept blocks, as in Zhu &
        Gupta's gradual magnitude pruning, and a falling one brings the largest pruned blocks back first."""
        b = self.sparse_config.block_size
        norms = block_norms(w, b)
        if self.sparse_config.grad_mode != "masked":
            return norms  # ste: pruned weights train on, and may grow back past kept ones
        kept = self.mask[::b, ::b]
        return norms + kept * (norms.max() + 1.0)

    def _scores_pick_blocks(self) -> bool:
        return self.sparse_config.criterion == "scores" and not self._frozen

    def _forward_mask(self) -> Tensor:
        return self._fresh_mask() if self._scores_pick_blocks() else self.mask

    def _check_level(self, level: float) -> None:
        if not 0.0 <= level < 1.0:
            raise ValueError(f"level={level} must be in [0, 1): it is the fraction of blocks pruned")

    def set_level(self, level: float) -> None:
        super().set_level(level)
        if level == self.level:
            return
        self.level = float(level)
        with torch.no_grad():
            self._store_mask(self._fresh_mask(), step=None)

    def _wake_up(self) -> None:
        if hasattr(self, "block_scores"):
            # Scores get no gradient while the layer is dense: re-seed them (under score_init="norm" from the
            # weights as they are now, so that the first pruning after a dense phase ranks blocks by what was
            # learned).
            with torch.no_grad():
                self.block_scores.copy_(self._initial_scores())
        elif self.sparse_config.grad_mode == "masked":
            # Every block trained during the dense phase, so none is frozen: the stored mask (made from the
            # weights before it) must not rank its blocks first (see _magnitude_ranks).
            self.mask.fill_(True)

    def _update_mask_for_phase(self, phase: Phase) -> None:
        # Learned scores pick the mask in forward; magnitude blocks are ranked here.
        self._check_level(phase.level)
        self.level = float(phase.level)
        if self.sparse_config.criterion == "magnitude":
            with torch.no_grad():
                self._store_mask(self._fresh_mask(), step=None)

    @property
    def grad_mode(self) -> str:
        """The config's weight gradient, except once the mask is final: then pruned blocks get none (so the
        block-sparse weight gradient computes only the kept ones)."""
        if self._mask_final:
            return "masked"
        return self.sparse_config.grad_mode

    # -- forward ---------------------------------------------------------------------------------

    def _gemm(self, x: Tensor, w: Tensor, bias: Tensor | None) -> Tensor:
        """x @ W_s^T + b (then GELU if fused): on the kernels where they serve, else masked dense."""
        config = self.sparse_config
        if not kernel_serves(config.backend, self._block_route(x.device, w.dtype), self.level):
            y = F.linear(x, self._block_sparse_weight(w), bias)
            return F.gelu(y) if self.fuse_gelu else y
        block_mask, index = self._block_mask_and_index()
        if self.fuse_gelu and not torch.is_grad_enabled():
            return block_sparse_linear_gelu(x, w, bias, index)
        y = block_sparse_linear(x, w, bias, block_mask, index, self.grad_mode)
        return F.gelu(y) if self.fuse_gelu else y

    def _block_sparse_weight(self, w: Tensor) -> Tensor:
        config = self.sparse_config
        if self._scores_pick_blocks():
            block_mask = BlockScoreSTE.apply(self.block_scores, self.level)
            mask = expand_block_mask(block_mask, config.block_size)
            if self.training:
                with torch.no_grad():
                    self._store_mask(mask.bool(), step=None)
            return _masked_weight(w, mask.to(w.dtype), self.grad_mode)
        return _masked_weight(w, self.mask.to(w.dtype), self.grad_mode)

    def block_kernels_serve(self, device: torch.device, dtype: torch.dtype) -> bool:
        """Whether this layer's next forward on `device` in compute `dtype` runs on the block-sparse kernels."""
        config = self.sparse_config
        return self._active and kernel_serves(config.backend, self._block_route(device, dtype), self.level)

    def block_kernel_operands(self, dtype: torch.dtype) -> tuple:
        """(weight, bias, block mask, index) in compute `dtype` for a caller that runs this block layer on the
        kernels itself (`fused_mlp.BlockSparseMlp`), after `block_kernels_serve` said yes. Learned scores pick
        the blocks now, as a forward of the layer would."""
        w = self._weight_2d().to(dtype)
        bias = None if self.bias is None else self.bias.to(dtype)
        return (w, bias, *self._block_mask_and_index())

    # -- the kernels' block index ----------------------------------------------------------------

    def _block_mask_and_index(self):
        """The block mask autograd needs (see block_linear) and the kernels' index of this forward's blocks.

        Learned scores pick the blocks every training forward (the index is rebuilt on the GPU, no sync).
        A stored mask's index is built once per change of the mask, outside any CUDA graph: a captured forward
        reads the index tensors as they are at each replay, and `sync_block_index` (GraphedTraining calls it
        before every replay) rewrites them in place when the mask changed between replays.
        """
        config = self.sparse_config
        from sparsetrain.gpu.kernels.bsr_matmul import index_from_block_mask  # imports Triton: only where it runs

        if self._scores_pick_blocks():
            block_mask = BlockScoreSTE.apply(self.block_scores, self.level)
            kept = block_mask.detach().bool()
            if self.training:
                with torch.no_grad():
                    self._store_mask(expand_block_mask(kept, config.block_size), step=None)
            return block_mask, index_from_block_mask(kept, config.block_size, self._block_density())
        capturing = self.mask.is_cuda and torch.cuda.is_current_stream_capturing()
        current = self._block_index_current()
        if capturing and not current:
            # Not warmed up on this mask: build the index inside the graph, which then rebuilds it at every
            # replay (correct, only slower); nothing made inside a capture is kept.
            _, kept, index = self._build_block_index()
        else:
            if not current:
                self._rebuild_block_index()
            _, kept, index = self._block_index
        return (kept if self.grad_mode == "masked" else None), index

    def _block_density(self) -> float:
        """The kept fraction at this level: a host number, so building an index never waits for the GPU."""
        b = self.sparse_config.block_size
        m, k = self.mask.shape
        blocks = (m // b) * (k // b)
        return kept_block_count(blocks, self.level) / blocks

    def _block_index_key(self) -> tuple:
        return (self.mask.data_ptr(), self.mask._version, self.level)

    def _block_index_current(self) -> bool:
        return (self._block_index is not None and not self._block_index_stale
                and self._block_index[0] == self._block_index_key())

    def _build_block_index(self) -> tuple:
        from sparsetrain.gpu.kernels.bsr_matmul import index_from_block_mask
        b = self.sparse_config.block_size
        m, k = self.mask.shape
        # any(): a mask loaded from weights' nonzeros may miss zeros inside a kept block.
        kept = self.mask.view(m // b, b, k // b, b).any(dim=3).any(dim=1)
        return self._block_index_key(), kept, index_from_block_mask(kept, b, self._block_density())

    def sync_block_index(self) -> None:
        """Bring the kernels' block index up to date with the stored mask before a CUDA graph replays a forward.

        GraphedTraining calls it before every replay; eager forwards check for themselves. A layer whose index was
        never built (dense, masked-dense route) has nothing to do. A replay in which learned scores pick the
        blocks writes the mask without moving its version counter, so the call before it marks the index stale.
        """
        if self._block_index is None:
            return
        if self._scores_pick_blocks():
            self._block_index_stale = True
        elif not self._block_index_current():
            self._rebuild_block_index()

    @torch.no_grad()
    def _rebuild_block_index(self) -> None:
        """Build the index of the stored mask, eagerly, into the tensors the old index had when there was one
        (the shapes are the same at every level), so that a graph captured earlier reads the new one."""
        key, kept, index = self._build_block_index()
        old = self._block_index
        if old is not None and old[1].device == kept.device:
            _, old_kept, old_index = old
            old_kept.copy_(kept)
            for name in ("row_counts", "row_blocks", "col_counts", "col_blocks"):
                getattr(old_index, name).copy_(getattr(index, name))
            kept, index = old_kept, dataclasses.replace(old_index, density=index.density)
        self._block_index = (key, kept, index)
        self._block_index_stale = False

    # -- checkpoints -----------------------------------------------------------------------------

    def _derive_state_from_weights(self) -> None:
        if hasattr(self, "block_scores"):
            self.block_scores.copy_(self._initial_scores())
        super()._derive_state_from_weights()

    def _sync_after_load(self, incompatible_keys) -> None:
        super()._sync_after_load(incompatible_keys)
        # The level is not a buffer (a float buffer would be cast by model.half()); the
        # stored mask pins it down exactly: level = 1 - kept blocks / blocks.
        b = self.sparse_config.block_size
        kept = self.mask[::b, ::b]
        self.level = 1.0 - kept.sum().item() / kept.numel()


@register_layer(BlockConfig)
class BlockLinear(BlockLayer, SparseLinear):
    """nn.Linear with block-sparse weights."""


@register_layer(BlockConfig)
class BlockConv1x1(BlockLayer, SparseConv1x1):
    """1x1 nn.Conv2d with block-sparse weights."""
