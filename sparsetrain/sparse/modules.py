"""SparseLinear / SparseConv1x1: drop-in nn.Linear / nn.Conv2d(1x1) that run a sparse GEMM.

They keep the dense module's parameters (same names and shapes, so checkpoints move between
dense and sparse models) and carry the sparsity state in buffers, so it is in `state_dict`:

    mask           bool (out, in)  the mask of the last forward or update (all True for act24)
    sparse_active  bool scalar     False during dense phases: forward is the plain dense op
    mask_step      int64 scalar    step of the last mask update, as given by the caller
    mask_frozen    bool scalar     forward uses the stored mask and never recomputes it
    block_scores   Parameter       learned per-block scores (BlockConfig(criterion="scores"))

dtype rule: the sparse path computes in the autocast dtype when autocast is on for the input's
device, else in the weight's dtype. The fp32 master weight stays dense and trainable; the masks
are applied to its cast copy.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparsetrain.gpu.backends import Backend, PreparedWeight, cusparselt_shape_blockers, resolve_backend
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
from sparsetrain.sparse.config import Act24Config, BlockConfig, Semi24Config, SparsityConfig
from sparsetrain.sparse.functions import activation_sparse_linear, weight_sparse_linear
from sparsetrain.sparse.masks import mask_24, mask_24_transposable
from sparsetrain.sparse.schedules import SEMI_STRUCTURED_LEVEL, Phase

logger = logging.getLogger("sparsetrain")


def compute_dtype(device_type: str, weight_dtype: torch.dtype) -> torch.dtype:
    """The autocast dtype when autocast is on for this device type, else the weight's dtype."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return weight_dtype


def gemm_shape(module: nn.Linear | nn.Conv2d) -> tuple[int, int]:
    """(out_features, in_features) of the GEMM a linear or 1x1 conv runs."""
    if isinstance(module, nn.Conv2d):
        return module.out_channels, module.in_channels
    return module.out_features, module.in_features


def not_a_gemm_reason(module: nn.Linear | nn.Conv2d, config: SparsityConfig) -> str | None:
    """Why `module` is a conv that is not a plain GEMM (a kxk kernel, stride, padding, dilation, groups), or None."""
    if not isinstance(module, nn.Conv2d):
        return None
    kh, kw = module.kernel_size
    if (kh, kw) != (1, 1):
        return f"{kh}x{kw} conv, not a GEMM {'block sparsity' if isinstance(config, BlockConfig) else '2:4'} can serve"
    if module.stride != (1, 1) or module.dilation != (1, 1) or module.groups != 1 or any(
        p != 0 for p in _padding_amounts(module)
    ):
        return (
            f"1x1 conv with stride={module.stride}, padding={module.padding}, dilation={module.dilation}, "
            f"groups={module.groups} is not a plain GEMM (only stride 1, no padding/dilation/groups is)"
        )
    return None


def unsupported_reason(module: nn.Linear | nn.Conv2d, config: SparsityConfig) -> str | None:
    """Why `config` cannot run on `module` (a short sentence), or None when it can."""
    not_a_gemm = not_a_gemm_reason(module, config)
    if not_a_gemm is not None:
        return not_a_gemm
    out_features, in_features = gemm_shape(module)
    if isinstance(config, BlockConfig):
        try:
            check_block_divisible((out_features, in_features), config.block_size)
        except ValueError as error:
            return str(error)
        return None
    if in_features % 4:
        return f"in_features {in_features} is not a multiple of 4 (2:4 groups run along the input dim)"
    if isinstance(config, Semi24Config) and config.transposable and out_features % 4:
        return (
            f"out_features {out_features} is not a multiple of 4, which a transposable 2:4 mask needs "
            "(set transposable=False to prune along rows only)"
        )
    blockers = cusparselt_shape_blockers(out_features, in_features) if config.backend == "cusparselt" else []
    if blockers:
        # Found here, not at the first forward: a forced backend must not stop the run on one odd layer.
        return (f"sparsity.backend=cusparselt cannot serve this {out_features}x{in_features} layer: "
                f"{'; '.join(blockers)} (backend=auto runs it masked dense instead)")
    return None


def _require_supported(module: nn.Linear | nn.Conv2d, config: SparsityConfig, name: str) -> None:
    reason = unsupported_reason(module, config)
    if reason is not None:
        raise ValueError(f"cannot make {name or 'this layer'} sparse: {reason}; leave it dense (sparsify_ does)")


def _padding_amounts(conv: nn.Conv2d) -> tuple[int, ...]:
    # "valid" pads nothing; "same" with a 1x1 kernel pads nothing either.
    return (0,) if isinstance(conv.padding, str) else tuple(conv.padding)


def _masked_weight(w: Tensor, mask: Tensor, grad_mode: str) -> Tensor:
    """w * mask with exact zeros. "masked": w gets the masked gradient; "ste": w gets the dense
    gradient. A float mask that requires grad receives dL/dmask = dL/dw_eff * w either way."""
    if grad_mode == "masked":
        return w * mask
    w_eff = w - (w * (1 - mask)).detach()
    if mask.requires_grad:
        w_eff = w_eff + w.detach() * (mask - mask.detach())
    return w_eff


class SparseGemmLayer(nn.Module):
    """Sparsity state and the sparse GEMM shared by SparseLinear and SparseConv1x1.

    Build the concrete layers with `from_dense(module, config, name)`.
    """

    kind: str
    weight: nn.Parameter
    bias: nn.Parameter | None
    # Block layers: apply GELU to the output, inside the kernel's epilogue where it runs without autograd
    # (inference); set by `fuse_mlp_gelu_`, which drops the MLP's own GELU.
    fuse_gelu: bool = False

    def _take_over(self, dense: nn.Module, config: SparsityConfig, name: str) -> None:
        """Share `dense`'s Parameters (the same objects) and training mode, then attach the sparsity state."""
        self.weight, self.bias = dense.weight, dense.bias
        self.train(dense.training)
        self._attach_sparsity(config, name)

    def _attach_sparsity(self, config: SparsityConfig, name: str) -> None:
        self.sparse_config = config
        self.layer_name = name
        device = self.weight.device
        out_features, in_features = gemm_shape(self)
        self.register_buffer("mask", torch.ones(out_features, in_features, dtype=torch.bool, device=device))
        self.register_buffer("sparse_active", torch.ones((), dtype=torch.bool, device=device))
        self.register_buffer("mask_step", torch.zeros((), dtype=torch.int64, device=device))
        self.register_buffer("mask_frozen", torch.zeros((), dtype=torch.bool, device=device))
        # Flips since the last pop_flip_rate(); not state, so not in the checkpoint.
        self.register_buffer("flip_count", torch.zeros((), dtype=torch.int64, device=device), persistent=False)
        # Python mirrors of the flags: reading a CUDA buffer in forward would sync the device.
        self._active = True
        self._frozen = False
        self._mask_final = False  # the schedule will not change the mask again (Phase.mask_final)
        self._backends: dict[tuple[torch.device, torch.dtype], tuple[Backend, str]] = {}
        self._block_routes: dict[tuple[torch.device, torch.dtype], tuple[str, str]] = {}
        self._block_index = None  # ((stored mask's storage, version, level), its block mask, its BlockIndex)
        self._block_index_stale = False  # True after a forward in which learned scores wrote the mask
        self._inference_operands = None  # (key, PreparedWeight) of eval-mode forwards: see _inference_weight
        self._backend_key: tuple[torch.device, torch.dtype] | None = None
        # Block layers run at a level the schedule may move; 2:4 is always 0.5.
        self.level = config.sparsity if isinstance(config, BlockConfig) else SEMI_STRUCTURED_LEVEL
        if isinstance(config, BlockConfig) and config.criterion == "scores":
            self.block_scores = nn.Parameter(self._initial_scores())
        self._initial_backend_choice()
        with torch.no_grad():
            self.mask.copy_(self._fresh_mask())
        self.register_load_state_dict_post_hook(SparseGemmLayer._sync_after_load)

    # -- the weight as a GEMM operand ------------------------------------------------------------

    def _weight_2d(self) -> Tensor:
        return self.weight.flatten(1)

    @property
    def pattern(self) -> str:
        return self.sparse_config.pattern

    # -- backends --------------------------------------------------------------------------------

    def _initial_backend_choice(self) -> None:
        if isinstance(self.sparse_config, BlockConfig) and self.sparse_config.backend == "triton_bsr":
            self.backend_name = "triton_bsr"
            self.backend_reason = "requested; checked at the first forward (needs CUDA, fp16/bf16, blocks of 16/32/64)"
        elif isinstance(self.sparse_config, BlockConfig):
            self._block_route(self.weight.device, self.weight.dtype)
        elif self.sparse_config.backend == "cusparselt":
            # A model is usually built on the CPU in fp32 and moved later; cuSPARSELt can only be
            # checked where and in what dtype the layer runs, so that happens at the first forward.
            self.backend_name = "cusparselt"
            self.backend_reason = "requested; checked at the first forward (needs CUDA and fp16/bf16)"
        else:
            self._backend(self.weight.device, self.weight.dtype)

    def _backend(self, device: torch.device, dtype: torch.dtype) -> Backend:
        """The layer's backend for (device, compute dtype), resolved once per pair."""
        key = (device, dtype)
        if key not in self._backends:
            out_features, in_features = gemm_shape(self)
            config = self.sparse_config
            self._backends[key] = resolve_backend(config.backend, out_features, in_features, device, dtype,
                                                  config.transposable, activations=isinstance(config, Act24Config))
        if key != self._backend_key:
            backend, self.backend_reason = self._backends[key]
            self.backend_name, self._backend_key = backend.name, key
            if not torch.compiler.is_compiling():  # dynamo cannot trace a logger call
                logger.debug("%s: backend %s (%s)", self.layer_name, backend.name, self.backend_reason)
        return self._backends[key][0]

    def resolve_backend_for(self, device, dtype: torch.dtype) -> None:
        """Pick the backend for inputs on `device` in compute `dtype` now rather than at the first such
        forward: torch.compile traces that forward, and cannot trace the choice (it builds objects)."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if isinstance(self.sparse_config, BlockConfig):
            self._block_route(device, dtype)
        else:
            self._backend(device, dtype)

    def _block_route(self, device: torch.device, dtype: torch.dtype) -> str:
        """"triton_bsr" or "emulated" for a block layer on (device, compute dtype), resolved once per pair."""
        key = (device, dtype)
        if key not in self._block_routes:
            config = self.sparse_config
            self._block_routes[key] = resolve_block_route(config.backend, config.block_size, device, dtype)
        if key != self._backend_key:
            (self.backend_name, self.backend_reason), self._backend_key = self._block_routes[key], key
        return self.backend_name

    def use_backend(self, backend: Backend, device, dtype: torch.dtype, reason: str = "set by use_backend") -> None:
        """Run on `backend` for inputs on `device` in compute `dtype` instead of the resolved one
        (benchmarks and tests that compare backends on one layer)."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self._backends[(device, dtype)] = (backend, reason)
        self._backend_key = None

    # -- masks -----------------------------------------------------------------------------------

    def _initial_scores(self) -> Tensor:
        """Learned block scores as BlockConfig.score_init starts them: the block norms of the weight as it is
        now, or uniform in [0, 1) (superblock's init; drawn from the global RNG, so the run's seed fixes it)."""
        norms = block_norms(self._weight_2d(), self.sparse_config.block_size)
        if self.sparse_config.score_init == "uniform":
            return torch.rand(norms.shape, device=norms.device).to(self.weight.dtype)
        return norms.to(self.weight.dtype)

    def _fresh_mask(self, weight_2d: Tensor | None = None) -> Tensor:
        """The mask the current weights (or scores) and level call for, full (out, in) shape."""
        config = self.sparse_config
        w = (self._weight_2d() if weight_2d is None else weight_2d).detach()
        if isinstance(config, Act24Config):
            return torch.ones_like(self.mask)
        if isinstance(config, Semi24Config):
            return mask_24_transposable(w.abs()) if config.transposable else mask_24(w.abs())
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

    def _store_mask(self, new_mask: Tensor, step: int | None) -> Tensor:
        """Write the mask; return the number of entries that flipped (a device tensor)."""
        flips = torch.count_nonzero(self.mask ^ new_mask)
        self.flip_count.add_(flips)
        self.mask.copy_(new_mask)
        if step is not None:
            self.mask_step.fill_(step)
        return flips

    @torch.no_grad()
    def update_mask(self, level: float | None = None, step: int | None = None) -> float:
        """Recompute the mask from the current weights (or block scores) now.

        level: new sparsity level (block layers); 2:4 layers accept only None or 0.5.
        step: recorded in mask_step. Returns the fraction of mask entries that flipped.
        """
        if level is not None:
            self._check_level(level)
            self.level = float(level)
        flips = self._store_mask(self._fresh_mask(), step)
        return flips.item() / self.mask.numel()

    def _check_level(self, level: float) -> None:
        if isinstance(self.sparse_config, BlockConfig):
            if not 0.0 <= level < 1.0:
                raise ValueError(f"level={level} must be in [0, 1): it is the fraction of blocks pruned")
        elif level != SEMI_STRUCTURED_LEVEL:
            raise ValueError(f"level={level} for a {self.pattern} layer: 2:4 is always 0.5; pass level=None")

    def set_level(self, level: float) -> None:
        """Run at sparsity `level`. Block layers: the mask follows at once (DRESS switches levels
        between forwards this way). 2:4 layers accept only 0.5 and do nothing."""
        self._check_level(level)
        if not isinstance(self.sparse_config, BlockConfig) or level == self.level:
            return
        self.level = float(level)
        with torch.no_grad():
            self._store_mask(self._fresh_mask(), step=None)

    # The flag buffers are written only when the flag changes: the schedule calls these every step, and a
    # fill is a kernel launch, host time an eager step pays for each. The Python mirrors stay exact, as
    # loading a state dict re-reads them from the buffers.
    def set_active(self, active: bool) -> None:
        """False: forward runs the plain dense op (dense phases of the schedule)."""
        if bool(active) != self._active:
            self._active = bool(active)
            self.sparse_active.fill_(self._active)

    def set_mask_frozen(self, frozen: bool) -> None:
        """True: forward uses the stored mask as is (no 2:4 refresh, no score-driven block mask)."""
        if bool(frozen) != self._frozen:
            self._frozen = bool(frozen)
            self.mask_frozen.fill_(self._frozen)

    def apply_phase(self, phase: Phase, step: int) -> None:
        """Apply one step of a PruneSchedule; call it before that step's forward. No device sync.

        The mask is frozen at steps that do not update it. At steps that do, 2:4 layers
        recompute it inside forward (from the compute-dtype copy of the weight the GEMM uses
        anyway), score-driven block layers let the scores pick it in forward, and magnitude
        block layers recompute it here. Flips add up for pop_flip_rate().
        """
        waking_up = phase.active and not self._active
        if phase.zero_pruned and self._active and not phase.active:
            self._zero_pruned_weights()
        self.set_active(phase.active)
        self._mask_final = phase.active and phase.mask_final
        if not phase.active:
            return
        if waking_up and hasattr(self, "block_scores"):
            # Scores get no gradient while the layer is dense: re-seed them (under score_init="norm" from the
            # weights as they are now, so that the first pruning after a dense phase ranks blocks by what was
            # learned).
            with torch.no_grad():
                self.block_scores.copy_(self._initial_scores())
        elif waking_up and isinstance(self.sparse_config, BlockConfig) and self.sparse_config.grad_mode == "masked":
            # Every block trained during the dense phase, so none is frozen: the stored mask (made from the
            # weights before it) must not rank its blocks first (see _magnitude_ranks).
            self.mask.fill_(True)
        self.set_mask_frozen(not phase.update_mask)
        if not phase.update_mask:
            return
        self.mask_step.fill_(step)
        if isinstance(self.sparse_config, BlockConfig):
            self._check_level(phase.level)
            self.level = float(phase.level)
            if self.sparse_config.criterion == "magnitude":
                with torch.no_grad():
                    self._store_mask(self._fresh_mask(), step=None)

    @torch.no_grad()
    def _zero_pruned_weights(self) -> None:
        """Hand the sparse network over to a dense phase as it is: the weights the mask prunes become
        zero. A dynamic mask is recomputed first, since the optimizer moved the weights after the
        forward that last stored it; a frozen mask is the one the sparse phase used."""
        if isinstance(self.sparse_config, Act24Config):
            return  # activation sparsity prunes no weight
        if not self._frozen:
            self._store_mask(self._fresh_mask(), step=None)
        self.weight.mul_(self.mask.reshape(self.weight.shape).to(self.weight.dtype))

    @property
    def grad_mode(self) -> str:
        """The weight gradient this layer's forward gives: the config's, except for a block layer whose mask is
        final, whose pruned blocks get none (so the block-sparse weight gradient computes only the kept ones)."""
        if self._mask_final and isinstance(self.sparse_config, BlockConfig):
            return "masked"
        return self.sparse_config.grad_mode

    def pop_flip_rate(self) -> float:
        """Fraction of mask entries flipped since the last call (summed over every update)."""
        rate = self.flip_count.item() / self.mask.numel()
        self.flip_count.zero_()
        return rate

    # -- forward ---------------------------------------------------------------------------------

    def _sparse_gemm(self, x: Tensor) -> Tensor:
        """x (..., in) -> (..., out) on the sparse path."""
        dtype = compute_dtype(x.device.type, self.weight.dtype)
        w = self._weight_2d().to(dtype)
        bias = None if self.bias is None else self.bias.to(dtype)
        x = x.to(dtype)
        config = self.sparse_config
        with torch.autocast(x.device.type, enabled=False):
            if isinstance(config, BlockConfig):
                return self._block_gemm(x, w, bias)
            backend = self._backend(x.device, dtype)
            if isinstance(config, Act24Config):
                return activation_sparse_linear(x, w, bias, backend, config.transposable)
            prepared = self._prepare_weight(w, backend, need_input_grad=torch.is_grad_enabled() and x.requires_grad)
            return weight_sparse_linear(x, w, bias, self.mask, backend, config.grad_mode, config.srste_lambda,
                                        prepared=prepared)

    @torch.no_grad()
    def _prepare_weight(self, w: Tensor, backend: Backend, need_input_grad: bool) -> PreparedWeight:
        """This forward's GEMM operands of w; a training forward refreshes the 2:4 mask first.

        A transposable refresh is the backend's own pruning (on sm90 with cuSPARSELt: one kernel
        launch that overwrites the mask, counts its flips and writes W_s, W_s^T compressed); a
        row-wise one uses masks.py here.
        """
        refresh = self.training and not self._frozen
        if refresh and self.sparse_config.transposable:
            return backend.refresh_weight(w, self.mask, self.flip_count, need_input_grad)
        if refresh:
            self._store_mask(self._fresh_mask(w), step=None)
        if self.training or torch.compiler.is_compiling():  # dynamo cannot trace the version counters
            return backend.prepare_weight(w, self.mask, need_input_grad)[1]
        return self._inference_weight(w, backend, need_input_grad)

    def _inference_weight(self, w: Tensor, backend: Backend, need_input_grad: bool) -> PreparedWeight:
        """The operands of an eval-mode forward, made once and reused while weight and mask stay as they are.

        An exported or evaluated model then pays its compression (one kernel launch per layer, or two
        `_cslt_compress`) at the first forward only: static 2:4 weights. The key holds the parameter's and the
        mask's version counters and storages, so an in-place update or a `.to()` makes them anew.
        """
        key = (id(backend), w.dtype, w.device, need_input_grad, self.weight.data_ptr(), self.weight._version,
               self.mask.data_ptr(), self.mask._version)
        if self._inference_operands is None or self._inference_operands[0] != key:
            self._inference_operands = None  # free the old operands before making the new ones
            self._inference_operands = (key, backend.prepare_weight(w, self.mask, need_input_grad)[1])
        return self._inference_operands[1]

    def train(self, mode: bool = True):
        self._inference_operands = None  # training changes the weights: the eval operands would only hold memory
        return super().train(mode)

    def _block_gemm(self, x: Tensor, w: Tensor, bias: Tensor | None) -> Tensor:
        """A block layer's x @ W_s^T + b (then GELU if fused): on the kernels where they serve, else masked dense."""
        config = self.sparse_config
        if not kernel_serves(config.backend, self._block_route(x.device, w.dtype), self.level):
            y = F.linear(x, self._block_sparse_weight(w), bias)
            return F.gelu(y) if self.fuse_gelu else y
        block_mask, index = self._block_mask_and_index()
        if self.fuse_gelu and not torch.is_grad_enabled():
            return block_sparse_linear_gelu(x, w, bias, index)
        y = block_sparse_linear(x, w, bias, block_mask, index, self.grad_mode)
        return F.gelu(y) if self.fuse_gelu else y

    def block_kernels_serve(self, device: torch.device, dtype: torch.dtype) -> bool:
        """Whether this layer's next forward on `device` in compute `dtype` runs on the block-sparse kernels."""
        config = self.sparse_config
        return (self._active and isinstance(config, BlockConfig)
                and kernel_serves(config.backend, self._block_route(device, dtype), self.level))

    def block_kernel_operands(self, dtype: torch.dtype) -> tuple:
        """(weight, bias, block mask, index) in compute `dtype` for a caller that runs this block layer on the
        kernels itself (`fused_mlp.BlockSparseMlp`), after `block_kernels_serve` said yes. Learned scores pick
        the blocks now, as a forward of the layer would."""
        w = self._weight_2d().to(dtype)
        bias = None if self.bias is None else self.bias.to(dtype)
        return (w, bias, *self._block_mask_and_index())

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

    def _scores_pick_blocks(self) -> bool:
        return self.sparse_config.criterion == "scores" and not self._frozen

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
        never built (dense, masked-dense route, 2:4) has nothing to do. A replay in which learned scores pick the
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

    # -- reporting and export --------------------------------------------------------------------

    @torch.no_grad()
    def decay_pruned_weights(self, factor: float) -> None:
        """w <- w * (1 - factor) where the mask prunes; kept weights and inactive layers untouched.

        Masked decay (Hu et al., ICML 2024) acts on the weights after the optimizer step, not on the
        gradient as SR-STE does, so Adam's per-weight normalisation cannot scale it away.
        """
        if not 0.0 <= factor < 1.0:
            raise ValueError(f"decay factor {factor} must be in [0, 1): it is masked_decay x lr")
        if not self._active or isinstance(self.sparse_config, Act24Config):
            return
        pruned = ~self.mask.view(self.weight.shape)
        self.weight.mul_(1.0 - factor * pruned.to(self.weight.dtype))

    @torch.no_grad()
    def effective_weight(self) -> Tensor:
        """The weight the forward multiplies by (dense when inactive or activation-sparse),
        in the parameter's shape and dtype."""
        if not self._active or isinstance(self.sparse_config, Act24Config):
            return self.weight.detach().clone()
        config = self.sparse_config
        scores_pick_mask = isinstance(config, BlockConfig) and config.criterion == "scores" and not self._frozen
        mask = self._fresh_mask() if scores_pick_mask else self.mask
        return self.weight.detach() * mask.view(self.weight.shape)

    def describe(self) -> dict:
        """One row of the layer table."""
        effective = self.effective_weight()
        return {
            "name": self.layer_name,
            "kind": self.kind,
            "shape": tuple(self.weight.shape),
            "pattern": self.pattern,
            "backend": self.backend_name,
            "reason": self.backend_reason,
            "active": self._active,
            "level": self.level,
            "measured_sparsity": (effective == 0).float().mean().item(),
        }

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, pattern={self.pattern}, backend={self.backend_name}"

    # -- checkpoints -----------------------------------------------------------------------------

    def _sparsity_state_keys(self) -> list[str]:
        keys = ["mask", "sparse_active", "mask_step", "mask_frozen"]
        if hasattr(self, "block_scores"):
            keys.append("block_scores")
        return keys

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # A dense checkpoint has the parameters but none of the sparsity state: load it and
        # derive the masks (and scores) from the loaded weights, as sparsify_ would have.
        keys = [prefix + key for key in self._sparsity_state_keys()]
        from_dense = prefix + "weight" in state_dict and not any(key in state_dict for key in keys)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if not from_dense:
            return
        for key in keys:
            if key in missing_keys:
                missing_keys.remove(key)
        with torch.no_grad():
            if hasattr(self, "block_scores"):
                self.block_scores.copy_(self._initial_scores())
            self.mask.copy_(self._fresh_mask())
        logger.info("%s: loaded dense weights; masks recomputed from them", self.layer_name)

    @staticmethod
    def _sync_after_load(module: SparseGemmLayer, incompatible_keys) -> None:
        module._active = bool(module.sparse_active)
        module._frozen = bool(module.mask_frozen)
        if isinstance(module.sparse_config, BlockConfig):
            # The level is not a buffer (a float buffer would be cast by model.half()); the
            # stored mask pins it down exactly: level = 1 - kept blocks / blocks.
            b = module.sparse_config.block_size
            kept = module.mask[::b, ::b]
            module.level = 1.0 - kept.sum().item() / kept.numel()


class SparseLinear(SparseGemmLayer, nn.Linear):
    """nn.Linear with a 2:4, activation-2:4 or block-sparse forward."""

    kind = "linear"

    def __init__(self, *args, **kwargs):
        raise TypeError("build it with SparseLinear.from_dense(nn.Linear(...), config, name)")

    @classmethod
    def from_dense(cls, linear: nn.Linear, config: SparsityConfig, name: str = "") -> SparseLinear:
        """A sparse layer sharing `linear`'s Parameters (same objects, names and shapes)."""
        _require_supported(linear, config, name)
        sparse = cls.__new__(cls)
        nn.Linear.__init__(sparse, linear.in_features, linear.out_features, bias=linear.bias is not None,
                           device="meta")
        sparse._take_over(linear, config, name)
        return sparse

    def forward(self, x: Tensor) -> Tensor:
        if not self._active:
            return F.linear(x, self.weight, self.bias)
        return self._sparse_gemm(x)


class SparseConv1x1(SparseGemmLayer, nn.Conv2d):
    """nn.Conv2d (1x1, stride 1, no padding/dilation/groups) run as a GEMM over channels."""

    kind = "conv1x1"

    def __init__(self, *args, **kwargs):
        raise TypeError("build it with SparseConv1x1.from_dense(nn.Conv2d(..., kernel_size=1), config, name)")

    @classmethod
    def from_dense(cls, conv: nn.Conv2d, config: SparsityConfig, name: str = "") -> SparseConv1x1:
        """A sparse layer sharing `conv`'s Parameters (same objects, names and shapes)."""
        _require_supported(conv, config, name)
        sparse = cls.__new__(cls)
        nn.Conv2d.__init__(sparse, conv.in_channels, conv.out_channels, kernel_size=1,
                           bias=conv.bias is not None, device="meta")
        sparse._take_over(conv, config, name)
        return sparse

    def forward(self, x: Tensor) -> Tensor:
        if not self._active:
            return self._conv_forward(x, self.weight, self.bias)
        # Channels last is a free view for channels_last inputs; the output keeps that layout.
        y = self._sparse_gemm(x.movedim(-3, -1))
        return y.movedim(-1, -3)
