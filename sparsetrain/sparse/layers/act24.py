"""2:4 activations (Act24Config): each forward prunes the layer's input activations to 2:4 along the features and
multiplies them by the dense weight."""

from __future__ import annotations

import torch
from torch import Tensor

from sparsetrain.sparse.config import Act24Config
from sparsetrain.sparse.functions import activation_sparse_linear
from sparsetrain.sparse.layers.linear_conv import SparseConv1x1, SparseLinear
from sparsetrain.sparse.layers.registry import register_layer
from sparsetrain.sparse.layers.sparse24 import Sparse24Layer


class Act24Layer(Sparse24Layer):
    """2:4-sparse input activations; the weight stays dense, so its mask keeps every entry."""

    sparse_config: Act24Config
    prunes_weights = False
    prunes_activations = True

    @property
    def grad_mode(self) -> str:
        """The weight is never pruned, so every weight entry gets its whole gradient ("ste" in the other patterns'
        terms; Act24Config has no grad_mode to choose)."""
        return "ste"

    def _mask_from(self, w: Tensor) -> Tensor:
        return torch.ones_like(self.mask)

    def _gemm(self, x: Tensor, w: Tensor, bias: Tensor | None) -> Tensor:
        backend = self._backend(x.device, w.dtype)
        return activation_sparse_linear(x, w, bias, backend, self.sparse_config.transposable)


@register_layer(Act24Config)
class Act24Linear(Act24Layer, SparseLinear):
    """nn.Linear whose input activations are pruned to 2:4."""


@register_layer(Act24Config)
class Act24Conv1x1(Act24Layer, SparseConv1x1):
    """1x1 nn.Conv2d whose input activations are pruned to 2:4 along the channels."""
