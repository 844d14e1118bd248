"""2:4 weights (Semi24Config): every output row keeps 2 of each 4 input weights; a training forward re-picks the
mask from |W| unless it is frozen."""

from __future__ import annotations

import torch
from torch import Tensor

from sparsetrain.gpu.backends import Backend, PreparedWeight
from sparsetrain.sparse.config import Semi24Config
from sparsetrain.sparse.functions import weight_sparse_linear
from sparsetrain.sparse.layers.linear_conv import SparseConv1x1, SparseLinear
from sparsetrain.sparse.layers.registry import register_layer
from sparsetrain.sparse.layers.sparse24 import Sparse24Layer
from sparsetrain.sparse.masks import mask_24, mask_24_transposable


class Semi24Layer(Sparse24Layer):
    """2:4-sparse weights; a transposable mask is 2:4 along columns too, so the input gradient runs sparse."""

    sparse_config: Semi24Config

    def _attach_pattern_state(self, config: Semi24Config) -> None:
        super()._attach_pattern_state(config)
        self._inference_operands = None  # (key, PreparedWeight) of eval-mode forwards: see _inference_weight

    @classmethod
    def shape_problem(cls, out_features: int, in_features: int, config: Semi24Config) -> str | None:
        # A layer whose input dim does not fit either hears about that first.
        if config.transposable and out_features % 4 and not in_features % 4:
            return (
                f"out_features {out_features} is not a multiple of 4, which a transposable 2:4 mask needs "
                "(set transposable=False to prune along rows only)"
            )
        return super().shape_problem(out_features, in_features, config)

    def _mask_from(self, w: Tensor) -> Tensor:
        return mask_24_transposable(w.abs()) if self.sparse_config.transposable else mask_24(w.abs())

    def _gemm(self, x: Tensor, w: Tensor, bias: Tensor | None) -> Tensor:
        config = self.sparse_config
        backend = self._backend(x.device, w.dtype)
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


@register_layer(Semi24Config)
class Semi24Linear(Semi24Layer, SparseLinear):
    """nn.Linear with 2:4-sparse weights."""


@register_layer(Semi24Config)
class Semi24Conv1x1(Semi24Layer, SparseConv1x1):
    """1x1 nn.Conv2d with 2:4-sparse weights."""
