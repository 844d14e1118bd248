"""One config class per sparsity transform (torchao-style): the class says which transform runs.

`config_from_dict` turns the `sparsity:` section of a composed Hydra config
(`{"pattern": "semi24" | "act24" | "block" | "dense", ...}`) into one of these, or None for dense.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

BACKENDS = ("auto", "emulated", "cusparselt")
BLOCK_BACKENDS = ("auto", "emulated", "triton_bsr")
SEMI24_GRAD_MODES = ("ste", "masked", "srste")
BLOCK_GRAD_MODES = ("ste", "masked")
BLOCK_CRITERIA = ("magnitude", "scores")
SCORE_INITS = ("norm", "uniform")


def _check_choice(field: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{field}={value!r} is not supported; use one of {list(allowed)}")


def _check_backend(value: Any, allowed: tuple[str, ...]) -> None:
    if value == "triton_bsr" and value not in allowed:
        raise ValueError(f"backend='triton_bsr' runs block sparsity (pattern: block); use one of {list(allowed)} here")
    _check_choice("backend", value, allowed)


@dataclass
class Semi24Config:
    """Weight-sparse 2:4: in every group of 4 input weights of an output row, 2 are kept.

    transposable: the mask is also 2:4 along columns (4x4 tiles), so the input gradient
        dX = dY @ W_s can use the sparse kernel too. Needs out_features % 4 == 0.
    backend: "auto" (cuSPARSELt where it can run, else emulated), "emulated" (masked dense
        matmul, any device), or "cusparselt" (error where it cannot run).
    grad_mode: weight gradient of pruned entries: "ste" (dense gradient, so pruned weights can
        come back), "masked" (zero), "srste" (STE plus srste_lambda * pruned weights, which
        decays the pruned weights so the mask settles; Zhou et al. 2021).
    srste_lambda: decay strength for grad_mode="srste"; must be 0 otherwise.
    criterion: what the mask is computed from. 2:4 masks come from |w|; learned scores exist
        only for block sparsity (BlockConfig(criterion="scores")).
    """

    pattern: ClassVar[str] = "semi24"
    transposable: bool = True
    backend: str = "auto"
    grad_mode: str = "ste"
    srste_lambda: float = 0.0
    criterion: str = "magnitude"

    def __post_init__(self) -> None:
        _check_backend(self.backend, BACKENDS)
        _check_choice("grad_mode", self.grad_mode, SEMI24_GRAD_MODES)
        if self.criterion != "magnitude":
            raise ValueError(
                f"criterion={self.criterion!r}: 2:4 masks are computed from |w| only; use "
                "criterion='magnitude', or BlockConfig(criterion='scores') for learned scores"
            )
        if self.srste_lambda < 0:
            raise ValueError(f"srste_lambda={self.srste_lambda} must be >= 0 (2e-4 is the paper's value)")
        if self.srste_lambda > 0 and self.grad_mode != "srste":
            raise ValueError(
                f"srste_lambda={self.srste_lambda} only acts with grad_mode='srste' "
                f"(got grad_mode={self.grad_mode!r}); set grad_mode='srste' or srste_lambda=0"
            )


@dataclass
class Act24Config:
    """Activation-sparse 2:4: the input activations of the second MLP linear (after the GELU)
    are pruned to 2:4 along the feature dim on the fly; the weight stays dense.

    backend, transposable: as in Semi24Config, for the sparse operand (the activations).
    layer_globs: fnmatch globs on module names; only matching layers are made activation-sparse,
        because only the MLP's second linear sees post-GELU activations that tolerate pruning.
    """

    pattern: ClassVar[str] = "act24"
    backend: str = "auto"
    transposable: bool = False
    layer_globs: tuple[str, ...] = ("*mlp.fc2",)

    def __post_init__(self) -> None:
        _check_backend(self.backend, BACKENDS)
        if isinstance(self.layer_globs, str):
            raise ValueError(f"layer_globs={self.layer_globs!r} must be a list of globs, e.g. ['*mlp.fc2']")
        # Hydra hands over a ListConfig; a tuple keeps the dataclass hashable and immutable.
        self.layer_globs = tuple(self.layer_globs)
        if not self.layer_globs:
            raise ValueError("layer_globs is empty, so no layer would be sparse; use e.g. ['*mlp.fc2']")


@dataclass
class BlockConfig:
    """Block sparsity: the weight is cut into block_size x block_size tiles and whole tiles are
    pruned.

    block_size: tile edge; 16/32/64 suit GPU kernels, any positive int works (emulated).
    sparsity: fraction of blocks pruned, in [0, 1); the schedule may ramp the level up to it.
    criterion: "magnitude" (keep the blocks with the largest L2 norm) or "scores" (learned
        per-block scores trained through a straight-through estimator, DRESS/superblock-style;
        they start as score_init says).
    score_init: where learned scores start, and restart after a dense phase: "norm" (the block norms, so
        the first mask equals magnitude pruning) or "uniform" (uniform in [0, 1), superblock's
        `nn.init.uniform_`: the first mask is random and only training makes it better).
    grad_mode: weight gradient of pruned blocks: "ste" (dense: they train on and may grow back) or
        "masked" (zero: they stay frozen, and under the magnitude criterion every kept block ranks above
        every pruned one, so a rising level never brings one back: Zhu & Gupta's gradual pruning).
    backend: "auto" (the Triton block-sparse kernels where they can run and win, else masked
        dense), "emulated" (masked dense, any device), or "triton_bsr" (the kernels; error where
        they cannot run). See sparsetrain/sparse/block_linear.py.
    """

    pattern: ClassVar[str] = "block"
    block_size: int = 64
    sparsity: float = 0.9
    criterion: str = "magnitude"
    score_init: str = "norm"
    grad_mode: str = "ste"
    backend: str = "auto"

    def __post_init__(self) -> None:
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size <= 0:
            raise ValueError(f"block_size={self.block_size!r} must be a positive int (16, 32 or 64 suit GPUs)")
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"sparsity={self.sparsity} must be in [0, 1): it is the fraction of blocks pruned")
        _check_choice("criterion", self.criterion, BLOCK_CRITERIA)
        _check_choice("score_init", self.score_init, SCORE_INITS)
        if self.score_init != "norm" and self.criterion != "scores":
            raise ValueError(f"score_init={self.score_init!r} sets where learned scores start; magnitude blocks have "
                             "none: use criterion='scores' (sparsity=dress) or drop score_init")
        _check_choice("grad_mode", self.grad_mode, BLOCK_GRAD_MODES)
        _check_backend(self.backend, BLOCK_BACKENDS)


SparsityConfig = Semi24Config | Act24Config | BlockConfig

CONFIG_BY_PATTERN: dict[str, type] = {cls.pattern: cls for cls in (Semi24Config, Act24Config, BlockConfig)}


def config_from_dict(d: Mapping[str, Any]) -> SparsityConfig | None:
    """Map {"pattern": ..., **fields} to its config class; pattern "dense" gives None."""
    fields = dict(d)
    pattern = fields.pop("pattern", None)
    if pattern == "dense":
        if fields:
            raise ValueError(f"pattern 'dense' takes no other keys; remove {sorted(fields)}")
        return None
    if pattern not in CONFIG_BY_PATTERN:
        raise ValueError(f"pattern={pattern!r} is not known; use one of {sorted(CONFIG_BY_PATTERN) + ['dense']}")
    cls = CONFIG_BY_PATTERN[pattern]
    allowed = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(fields) - set(allowed))
    if unknown:
        raise ValueError(f"unknown keys {unknown} for pattern {pattern!r}; allowed keys: {['pattern'] + allowed}")
    return cls(**fields)
