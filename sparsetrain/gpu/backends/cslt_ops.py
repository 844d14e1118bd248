"""The cuSPARSELt calls of `CuSparseLtBackend`, each registered as a custom op (`gpu/ops.py`), so that
torch.compile traces the sparse layers around them: the fused prune+compress kernel in each mode, compression,
and the GEMMs with their padding, bias buffer and algorithm choice."""
from typing import Optional

import torch
from torch import Tensor

from sparsetrain.gpu.backends.cslt_gemm import (epilogue_bias, pad_rows, pick_matmul, prepare_input_grad, sparse_mm,
                                                torch_mm)
from sparsetrain.gpu.layout_sm90 import compress_sm90
from sparsetrain.gpu.ops import opaque_op

_DENSE_ROW_MULTIPLE = 16  # token rows of a dense cuSPARSELt operand
_SPARSE_ROW_MULTIPLE = 64  # token rows of a sparse (compressed) operand: the sm90 tile size


def _compress_with(matrix: Tensor, route: str) -> Tensor:
    """cuSPARSELt's compressed form of a 2:4 matrix, by torch's op or by `compress_sm90` ("direct")."""
    if route == "direct":
        return compress_sm90(matrix)
    return torch._cslt_compress(matrix).view(matrix.shape[0], -1)


def _compressed_like(matrix: Tensor) -> Tensor:
    m, k = matrix.shape
    return matrix.new_empty(m, k // 2 + k // 16)  # values, then 4 bits of metadata per group of 4


@opaque_op("cslt_prune_compress", lambda w: (_compressed_like(w), _compressed_like(w.t()),
                                             torch.empty_like(w, dtype=torch.bool)))
def fused_prune_compress(w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The fused kernel's prune mode: W_s and W_s^T compressed, and the mask of |w|."""
    from sparsetrain.gpu.kernels import prune_compress_transposable
    return prune_compress_transposable(w, want_mask=True)


@opaque_op("cslt_prune_compress_into", lambda w, mask, flips: (_compressed_like(w), _compressed_like(w.t())),
           mutates=("mask", "flips"))
def fused_prune_compress_into(w: Tensor, mask: Tensor, flips: Tensor) -> tuple[Tensor, Tensor]:
    """The fused kernel's prune mode writing the layer's mask in place and counting its flips."""
    from sparsetrain.gpu.kernels import prune_compress_into
    return prune_compress_into(w, mask, flips)


def _activations_fake(x2d: Tensor, transposable: bool):
    padded = x2d.new_empty(x2d.shape[0] + -x2d.shape[0] % _SPARSE_ROW_MULTIPLE, x2d.shape[1])
    return (torch.empty_like(x2d), torch.empty_like(x2d, dtype=torch.bool), _compressed_like(padded),
            _compressed_like(padded.t()) if transposable else x2d.new_empty(0))


@opaque_op("cslt_prune_activations", _activations_fake)
def fused_prune_activations(x2d: Tensor, transposable: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The fused kernel's activation mode: (X_s, mask, X_s compressed, X_s^T compressed or an empty tensor),
    the compressed forms with the tokens padded to the sparse operand's 64 rows."""
    from sparsetrain.gpu.kernels import prune_activations
    rows = x2d.shape[0]
    c, c_t, mask, x_sparse = prune_activations(pad_rows(x2d, _SPARSE_ROW_MULTIPLE), transposable)
    return x_sparse[:rows], mask[:rows], c, c_t if transposable else c.new_empty(0)


@opaque_op("cslt_compress_masked", lambda w, mask: _compressed_like(w))
def fused_compress_masked(w: Tensor, mask: Tensor) -> Tensor:
    """The fused kernel's given-mask mode, W_s only."""
    from sparsetrain.gpu.kernels import compress_masked
    return compress_masked(w, mask, transposed=False)[0]


@opaque_op("cslt_compress_masked_both", lambda w, mask: (_compressed_like(w), _compressed_like(w.t())))
def fused_compress_masked_both(w: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """The fused kernel's given-mask mode, W_s and W_s^T."""
    from sparsetrain.gpu.kernels import compress_masked
    return compress_masked(w, mask, transposed=True)


@opaque_op("cslt_compress", lambda matrix, route: _compressed_like(matrix))
def cslt_compress(matrix: Tensor, route: str) -> Tensor:
    """`_compress_with` as an op (torch._cslt_compress has no fake implementation to trace)."""
    return _compress_with(matrix, route)


@opaque_op("cslt_linear", lambda x2d, compressed, *_: x2d.new_empty(x2d.shape[0], compressed.shape[0]))
def cslt_linear(x2d: Tensor, compressed: Tensor, weight: Tensor, mask: Tensor, bias: Optional[Tensor],
                compressed_t: Optional[Tensor], plans: Optional[bool]) -> Tensor:
    """Y = X W_s^T + b, the bias in the GEMM's epilogue; `weight` and `mask` give the reference that a
    newly searched algorithm is checked against. With `compressed_t`, dX's algorithm is searched too."""
    rows = x2d.shape[0]
    x_padded = pad_rows(x2d, _DENSE_ROW_MULTIPLE)
    mm = pick_matmul(plans)
    masked = lambda: weight.masked_fill(~mask, 0)  # noqa: E731 - made only for a search
    y = sparse_mm(compressed, x_padded.t(), True, mm, bias=epilogue_bias(bias, mm),
                   reference=lambda: x_padded @ masked().t())[:rows]
    if compressed_t is not None:
        prepare_input_grad(compressed_t, masked, x_padded.shape[0], mm)
    return y


@opaque_op("cslt_input_grad", lambda gy2d, compressed_t, plans: gy2d.new_empty(gy2d.shape[0], compressed_t.shape[0]))
def cslt_input_grad(gy2d: Tensor, compressed_t: Tensor, plans: Optional[bool]) -> Tensor:
    """dX = dY W_s with W_s^T compressed (its algorithm was searched by `cslt_linear`)."""
    rows = gy2d.shape[0]
    gy_padded = pad_rows(gy2d, _DENSE_ROW_MULTIPLE)
    return sparse_mm(compressed_t, gy_padded.t(), True, pick_matmul(plans), reference=None)[:rows]


@opaque_op("cslt_sparse_input_linear", lambda x_sparse2d, weight, route, compressed:
           x_sparse2d.new_empty(x_sparse2d.shape[0], weight.shape[0]))
def cslt_sparse_input_linear(x_sparse2d: Tensor, weight: Tensor, route: str, compressed: Optional[Tensor]) -> Tensor:
    """Y = X_s W^T with the 2:4 activations X_s compressed as the sparse operand (`compressed`, made by
    the prune pass with the tokens padded to 64 rows, or compressed here)."""
    rows = x_sparse2d.shape[0]
    x_padded = pad_rows(x_sparse2d, _SPARSE_ROW_MULTIPLE)
    weight_t = weight.contiguous().t()
    operand = _compress_with(x_padded, route) if compressed is None else compressed
    return sparse_mm(operand, weight_t, False, torch_mm, reference=lambda: x_padded @ weight_t)[:rows]


@opaque_op("cslt_sparse_input_weight_grad", lambda gy2d, x_sparse2d, route, compressed_t:
           gy2d.new_empty(gy2d.shape[1], x_sparse2d.shape[1]))
def cslt_sparse_input_weight_grad(gy2d: Tensor, x_sparse2d: Tensor, route: str,
                                  compressed_t: Optional[Tensor]) -> Tensor:
    """dW = dY^T X_s with X_s^T (in, tokens), 2:4 along tokens, as the sparse operand (`compressed_t`, made
    by the prune pass, or compressed here)."""
    x_t = pad_rows(x_sparse2d, _SPARSE_ROW_MULTIPLE).t().contiguous()
    gy_padded = pad_rows(gy2d, _SPARSE_ROW_MULTIPLE)
    operand = _compress_with(x_t, route) if compressed_t is None else compressed_t
    # transpose_result gives dW directly from dW^T = X_s^T @ dY.
    return sparse_mm(operand, gy_padded, True, torch_mm, reference=lambda: gy_padded.t() @ x_t.t())

