"""Sparse24Layer: what 2:4 weights and 2:4 activations share. The level is always 0.5, and the GEMMs run on a 2:4
Backend (sparsetrain.gpu.backends: cuSPARSELt, or masked dense where it cannot run) chosen per device and dtype."""

from __future__ import annotations

import logging
from typing import ClassVar

import torch

from sparsetrain.gpu.backends import Backend, cusparselt_shape_blockers, resolve_backend
from sparsetrain.sparse.config import Act24Config, Semi24Config
from sparsetrain.sparse.layers.base import SparseGemmLayer, concrete_device, gemm_shape
from sparsetrain.sparse.schedules import SEMI_STRUCTURED_LEVEL

logger = logging.getLogger("sparsetrain")


class Sparse24Layer(SparseGemmLayer):
    """The 2:4 patterns' shared part: level, shape rules and backend choice."""

    sparse_config: Semi24Config | Act24Config
    pattern_label = "2:4"
    forced_backend = "cusparselt"
    forced_backend_needs = "CUDA and fp16/bf16"
    # The sparse operand is the input activations, not the weight: the backend compresses those.
    prunes_activations: ClassVar[bool] = False

    def _attach_pattern_state(self, config: Semi24Config | Act24Config) -> None:
        self.level = SEMI_STRUCTURED_LEVEL
        self._backends: dict[tuple[torch.device, torch.dtype], tuple[Backend, str]] = {}

    @classmethod
    def shape_problem(cls, out_features: int, in_features: int, config: Semi24Config | Act24Config) -> str | None:
        if in_features % 4:
            return f"in_features {in_features} is not a multiple of 4 (2:4 groups run along the input dim)"
        blockers = cusparselt_shape_blockers(out_features, in_features) if config.backend == "cusparselt" else []
        if blockers:
            # Found here, not at the first forward: a forced backend must not stop the run on one odd layer.
            return (f"sparsity.backend=cusparselt cannot serve this {out_features}x{in_features} layer: "
                    f"{'; '.join(blockers)} (backend=auto runs it masked dense instead)")
        return None

    def _check_level(self, level: float) -> None:
        if level != SEMI_STRUCTURED_LEVEL:
            raise ValueError(f"level={level} for a {self.pattern} layer: 2:4 is always 0.5; pass level=None")

    def _choose_backend(self, device: torch.device, dtype: torch.dtype) -> None:
        self._backend(device, dtype)

    def _backend(self, device: torch.device, dtype: torch.dtype) -> Backend:
        """The layer's backend for (device, compute dtype), resolved once per pair."""
        key = (device, dtype)
        if key not in self._backends:
            out_features, in_features = gemm_shape(self)
            config = self.sparse_config
            self._backends[key] = resolve_backend(config.backend, out_features, in_features, device, dtype,
                                                  config.transposable, activations=self.prunes_activations)
        if key != self._backend_key:
            backend, self.backend_reason = self._backends[key]
            self.backend_name, self._backend_key = backend.name, key
            if not torch.compiler.is_compiling():  # dynamo cannot trace a logger call
                logger.debug("%s: backend %s (%s)", self.layer_name, backend.name, self.backend_reason)
        return self._backends[key][0]

    def use_backend(self, backend: Backend, device, dtype: torch.dtype, reason: str = "set by use_backend") -> None:
        """Run on `backend` for inputs on `device` in compute `dtype` instead of the resolved one
        (benchmarks and tests that compare backends on one layer)."""
        self._backends[(concrete_device(device), dtype)] = (backend, reason)
        self._backend_key = None
