"""SparseLinear and SparseConv1x1: a sparse layer as the nn.Linear or 1x1 nn.Conv2d it replaces.

`from_dense` builds the pattern's subclass that `register_layer` gave the config's type (`SparseLinear.from_dense(
linear, Semi24Config())` is a Semi24Linear), so `isinstance(layer, SparseLinear)` holds whatever the pattern.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from sparsetrain.sparse.config import SparsityConfig
from sparsetrain.sparse.layers.base import SparseGemmLayer
from sparsetrain.sparse.layers.registry import layer_class, require_supported


def _uninitialised_layer(cls: type, dense: nn.Module, config: SparsityConfig, name: str) -> SparseGemmLayer:
    """An instance, not yet initialised, of the class registered for `config` on `dense`, which must be `cls` or
    one of its subclasses."""
    require_supported(dense, config, name)
    registered = layer_class(config, dense)
    if not issubclass(registered, cls):
        raise TypeError(f"{type(config).__name__} on {type(dense).__name__} makes a {registered.__name__}, "
                        f"not a {cls.__name__}; build it with {registered.__name__}.from_dense")
    return registered.__new__(registered)


class SparseLinear(SparseGemmLayer, nn.Linear):
    """nn.Linear with a 2:4, activation-2:4 or block-sparse forward."""

    kind = "linear"

    def __init__(self, *args, **kwargs):
        raise TypeError("build it with SparseLinear.from_dense(nn.Linear(...), config, name)")

    @classmethod
    def from_dense(cls, linear: nn.Linear, config: SparsityConfig, name: str = "") -> SparseLinear:
        """A sparse layer sharing `linear`'s Parameters (same objects, names and shapes)."""
        sparse = _uninitialised_layer(cls, linear, config, name)
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
        sparse = _uninitialised_layer(cls, conv, config, name)
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
