"""The backend interface of the 2:4 layers, and the masked dense backend every fast path is checked against.

A weight-sparse layer's step goes through three calls: `prepare_weight` (the mask, pruned now or
given, and the weight's GEMM operands for this step), `linear` (Y = X W_s^T + b) and `input_grad`
(dX = dY W_s). Every backend takes the same dense tensors with zeros, so every fast path can be
checked against "mask, then run dense" (`EmulatedBackend`, the reference).
"""
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor

from sparsetrain.sparse.masks import mask_24_activations, mask_24_transposable


@dataclass(frozen=True)
class PreparedWeight:
    """A layer's 2:4 weight for one step, in the form its backend's GEMMs take.

    forward: W_s for Y = X W_s^T, masked dense (emulated) or compressed (cuSPARSELt).
    input_grad: the operand of dX = dY W_s (W_s dense, or W_s^T compressed); None when no dX is wanted.
    weight, mask: what it was made from; cuSPARSELt checks a newly searched algorithm against them.
    """

    forward: Tensor
    input_grad: Tensor | None
    weight: Tensor
    mask: Tensor

    def masked(self) -> Tensor:
        """W_s as masked dense (made on demand: only a first call per shape needs it)."""
        return self.weight.masked_fill(~self.mask, 0)


class Backend(ABC):
    """Runs a layer's 2:4 GEMMs. One instance per layer."""

    name: str

    @abstractmethod
    def prepare_weight(self, weight: Tensor, mask: Tensor | None = None,
                       need_input_grad: bool = True) -> tuple[Tensor, PreparedWeight]:
        """The mask and this step's GEMM operands of `weight` (out, in) in the compute dtype.

        mask None: prune now to the transposable 2:4 mask of |weight| (== mask_24_transposable);
        else the given bool mask (weight's shape; row-wise masks come this way). No autograd.
        """

    def refresh_weight(self, weight: Tensor, mask: Tensor, flips: Tensor, need_input_grad: bool = True) -> PreparedWeight:
        """A training step's mask refresh: prune `weight` to its transposable 2:4 mask, written over `mask`
        (the layer's buffer) in place, add the number of entries that changed to `flips` (int64 scalar),
        and return the GEMM operands. No autograd, no sync."""
        new_mask, prepared = self.prepare_weight(weight, None, need_input_grad)
        flips.add_(torch.count_nonzero(mask ^ new_mask))
        mask.copy_(new_mask)
        return prepared

    @abstractmethod
    def linear(self, x2d: Tensor, prepared: PreparedWeight, bias: Tensor | None) -> Tensor:
        """Y = X @ W_s^T + b; `bias` (out,) is in the output dtype."""

    @abstractmethod
    def input_grad(self, gy2d: Tensor, operand: Tensor) -> Tensor:
        """dX = dY @ W_s, with `operand` = `PreparedWeight.input_grad`."""

    def prune_activations(self, x2d: Tensor, transposable: bool) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """Activation 2:4 of x2d (tokens, in) by |x| (masks.mask_24_activations): (X_s, mask, compressed,
        compressed_t). The compressed forms are the sparse GEMMs' operands where this backend makes them in
        the same pass (None: the GEMM compresses X_s itself). No autograd."""
        mask = mask_24_activations(x2d, transposable)
        return x2d.masked_fill(~mask, 0), mask, None, None

    @abstractmethod
    def sparse_input_linear(self, x_sparse2d: Tensor, weight: Tensor, compressed: Tensor | None = None) -> Tensor:
        """Y = X_s @ W^T where X_s (tokens, in) is 2:4 along its rows (activation sparsity);
        `compressed`: X_s as `prune_activations` compressed it, if it did."""

    @abstractmethod
    def sparse_input_weight_grad(self, gy2d: Tensor, x_sparse2d: Tensor, transposable: bool,
                                 compressed_t: Tensor | None = None) -> Tensor:
        """dW = dY^T @ X_s; `transposable` says X_s^T is 2:4 too (2:4 along tokens); `compressed_t`: X_s^T
        as `prune_activations` compressed it, if it did."""


class EmulatedBackend(Backend):
    """Masked dense matmuls: any device, any dtype. The reference for every fast path."""

    name = "emulated"

    def prepare_weight(self, weight, mask=None, need_input_grad=True):
        if mask is None:
            mask = mask_24_transposable(weight.abs())
        w_masked = weight.masked_fill(~mask, 0)
        return mask, PreparedWeight(w_masked, w_masked if need_input_grad else None, weight, mask)

    def linear(self, x2d, prepared, bias):
        y = x2d @ prepared.forward.t()
        return y if bias is None else y + bias

    def input_grad(self, gy2d, operand):
        return gy2d @ operand

    def sparse_input_linear(self, x_sparse2d, weight, compressed=None):
        return x_sparse2d @ weight.t()

    def sparse_input_weight_grad(self, gy2d, x_sparse2d, transposable, compressed_t=None):
        return gy2d.t() @ x_sparse2d
