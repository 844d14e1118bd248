"""SparseGemmLayer: the sparsity state, schedule phases, checkpoints and reporting every sparse layer shares.

A pattern's subclass (semi24.py, act24.py, blocks.py) says how its masks are made, which backends run its GEMM
and how; the dense module's class (linear_conv.py) says how the layer is built and what its forward reshapes.
"""

from __future__ import annotations

import logging
from typing import ClassVar

import torch
from torch import Tensor, nn

from sparsetrain.sparse.config import SparsityConfig
from sparsetrain.sparse.schedules import Phase

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


def concrete_device(device) -> torch.device:
    """`device` with a CUDA index: backends are chosen per device, and "cuda" means the current one."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


class SparseGemmLayer(nn.Module):
    """The part of a sparse layer that does not depend on its pattern.

    Build layers with `SparseLinear.from_dense` / `SparseConv1x1.from_dense` or `sparsify_`, which pick the
    pattern's class for the config (`register_layer`). A pattern's class provides `_attach_pattern_state`,
    `shape_problem`, `_choose_backend`, `_mask_from`, `_gemm` and `_check_level`.
    """

    kind: str
    weight: nn.Parameter
    bias: nn.Parameter | None
    # How messages name the pattern ("2:4", "block sparsity").
    pattern_label: ClassVar[str]
    # The backend a config may force although it can only be checked where the layer runs, and what it needs.
    forced_backend: ClassVar[str]
    forced_backend_needs: ClassVar[str]
    # False where the weight stays dense (2:4 activations): no pruned weights to decay, zero or leave out.
    prunes_weights: ClassVar[bool] = True
    # Block layers: apply GELU to the output, inside the kernel's epilogue where it runs without autograd
    # (inference); set by `fuse_mlp_gelu_`, which drops the MLP's own GELU. Every layer has the flag because
    # CUDA-graph keys read it on all of them.
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
        self._backend_key: tuple[torch.device, torch.dtype] | None = None  # whose choice backend_name reports
        self._attach_pattern_state(config)
        self._initial_backend_choice()
        with torch.no_grad():
            self.mask.copy_(self._fresh_mask())
        self.register_load_state_dict_post_hook(type(self)._sync_after_load)

    def _attach_pattern_state(self, config: SparsityConfig) -> None:
        """Set `level` and whatever else the pattern keeps (backend caches, learned scores)."""
        raise NotImplementedError

    @classmethod
    def shape_problem(cls, out_features: int, in_features: int, config: SparsityConfig) -> str | None:
        """Why `config` cannot run on an (out, in) GEMM (a short sentence), or None when it can."""
        raise NotImplementedError

    def _weight_2d(self) -> Tensor:
        return self.weight.flatten(1)

    @property
    def pattern(self) -> str:
        return self.sparse_config.pattern

    # -- backends --------------------------------------------------------------------------------

    def _initial_backend_choice(self) -> None:
        if self.sparse_config.backend == self.forced_backend:
            # A model is usually built on the CPU in fp32 and moved later; a fast backend can only be checked
            # where and in what dtype the layer runs, so that happens at the first forward.
            self.backend_name = self.forced_backend
            self.backend_reason = f"requested; checked at the first forward (needs {self.forced_backend_needs})"
        else:
            self._choose_backend(self.weight.device, self.weight.dtype)

    def _choose_backend(self, device: torch.device, dtype: torch.dtype) -> None:
        """Resolve (once per pair) and report in backend_name/backend_reason what runs on (device, compute dtype)."""
        raise NotImplementedError

    def resolve_backend_for(self, device, dtype: torch.dtype) -> None:
        """Pick the backend for inputs on `device` in compute `dtype` now rather than at the first such
        forward: torch.compile traces that forward, and cannot trace the choice (it builds objects)."""
        self._choose_backend(concrete_device(device), dtype)

    # -- masks -----------------------------------------------------------------------------------

    def _fresh_mask(self, weight_2d: Tensor | None = None) -> Tensor:
        """The mask the current weights (or scores) and level call for, full (out, in) shape."""
        return self._mask_from((self._weight_2d() if weight_2d is None else weight_2d).detach())

    def _mask_from(self, w: Tensor) -> Tensor:
        """The mask the 2D weight `w` (or the learned scores) calls for at the current level."""
        raise NotImplementedError

    def _forward_mask(self) -> Tensor:
        """The mask the next forward multiplies by."""
        return self.mask

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
        raise NotImplementedError

    def set_level(self, level: float) -> None:
        """Run at sparsity `level`. Block layers: the mask follows at once (DRESS switches levels
        between forwards this way). 2:4 layers accept only 0.5 and do nothing."""
        self._check_level(level)

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
        if waking_up:
            self._wake_up()
        self.set_mask_frozen(not phase.update_mask)
        if not phase.update_mask:
            return
        self.mask_step.fill_(step)
        self._update_mask_for_phase(phase)

    def _wake_up(self) -> None:
        """Called when a sparse phase follows a dense one, before its mask is used."""

    def _update_mask_for_phase(self, phase: Phase) -> None:
        """At a step whose phase updates the mask, before its forward: what the pattern does outside forward."""

    @torch.no_grad()
    def _zero_pruned_weights(self) -> None:
        """Hand the sparse network over to a dense phase as it is: the weights the mask prunes become
        zero. A dynamic mask is recomputed first, since the optimizer moved the weights after the
        forward that last stored it; a frozen mask is the one the sparse phase used."""
        if not self.prunes_weights:
            return
        if not self._frozen:
            self._store_mask(self._fresh_mask(), step=None)
        self.weight.mul_(self.mask.reshape(self.weight.shape).to(self.weight.dtype))

    @property
    def grad_mode(self) -> str:
        """The weight gradient of pruned entries this layer's forward gives: the config's."""
        return self.sparse_config.grad_mode

    def pop_flip_rate(self) -> float:
        """Fraction of mask entries flipped since the last call (summed over every update)."""
        rate = self.flip_count.item() / self.mask.numel()
        self.flip_count.zero_()
        return rate

    def sync_block_index(self) -> None:
        """Bring the block kernels' index up to date with the stored mask before a CUDA graph replays a forward
        (GraphedTraining calls it on every sparse layer); only block layers keep one."""

    # -- forward ---------------------------------------------------------------------------------

    def _sparse_gemm(self, x: Tensor) -> Tensor:
        """x (..., in) -> (..., out) on the sparse path, in the compute dtype (see the package's dtype rule)."""
        dtype = compute_dtype(x.device.type, self.weight.dtype)
        w = self._weight_2d().to(dtype)
        bias = None if self.bias is None else self.bias.to(dtype)
        x = x.to(dtype)
        with torch.autocast(x.device.type, enabled=False):
            return self._gemm(x, w, bias)

    def _gemm(self, x: Tensor, w: Tensor, bias: Tensor | None) -> Tensor:
        """x @ W_s^T + b with x, w and bias already in the compute dtype."""
        raise NotImplementedError

    # -- reporting and export --------------------------------------------------------------------

    @torch.no_grad()
    def decay_pruned_weights(self, factor: float) -> None:
        """w <- w * (1 - factor) where the mask prunes; kept weights and inactive layers untouched.

        Masked decay (Hu et al., ICML 2024) acts on the weights after the optimizer step, not on the
        gradient as SR-STE does, so Adam's per-weight normalisation cannot scale it away.
        """
        if not 0.0 <= factor < 1.0:
            raise ValueError(f"decay factor {factor} must be in [0, 1): it is masked_decay x lr")
        if not self._active or not self.prunes_weights:
            return
        pruned = ~self.mask.view(self.weight.shape)
        self.weight.mul_(1.0 - factor * pruned.to(self.weight.dtype))

    @torch.no_grad()
    def effective_weight(self) -> Tensor:
        """The weight the forward multiplies by (dense when inactive or activation-sparse),
        in the parameter's shape and dtype."""
        if not self._active or not self.prunes_weights:
            return self.weight.detach().clone()
        return self.weight.detach() * self._forward_mask().view(self.weight.shape)

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
            self._derive_state_from_weights()
        logger.info("%s: loaded dense weights; masks recomputed from them", self.layer_name)

    def _derive_state_from_weights(self) -> None:
        """The sparsity state sparsify_ would have made from the current weights."""
        self.mask.copy_(self._fresh_mask())

    def _sync_after_load(self, incompatible_keys) -> None:
        """Registered as the load_state_dict post-hook: the Python mirrors follow the loaded buffers."""
        self._active = bool(self.sparse_active)
        self._frozen = bool(self.mask_frozen)
