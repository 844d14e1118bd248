"""Autograd functions of 2:4-sparse linears: sparse weights, or sparse input activations.

Both compute in the dtype they are given (autocast is switched off inside, so the caller's cast
is the one that counts) and run their GEMMs through a `Backend`.
"""
import torch
from torch import Tensor
from torch.autograd import Function

from sparsetrain.gpu.backends import Backend, PreparedWeight

GRAD_MODES = ("ste", "masked", "srste")


def _autocast_off(t: Tensor):
    return torch.autocast(t.device.type, enabled=False)


def _bias_grad(gy2d: Tensor, bias_dtype: torch.dtype) -> Tensor:
    # Summing thousands of bf16 rows in bf16 loses the small ones.
    return gy2d.sum(0, dtype=torch.float32).to(bias_dtype)


def _weight_grad(gy2d: Tensor, x2d: Tensor, mask: Tensor, weight: Tensor, grad_mode: str,
                 srste_lambda: float) -> Tensor:
    dense = gy2d.t() @ x2d
    if grad_mode == "masked":
        return dense.masked_fill(~mask, 0)
    if grad_mode == "srste":
        # SR-STE (Zhou et al. 2021): decay the pruned weights so the mask settles.
        return dense + srste_lambda * weight.masked_fill(mask, 0)
    return dense


class _WeightSparseLinear(Function):
    @staticmethod
    def forward(ctx, x, weight, bias, mask, prepared, backend, grad_mode, srste_lambda):
        need_x_grad, need_w_grad = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        x2d = x.reshape(-1, x.shape[-1])
        with _autocast_off(x):
            # In the output dtype: cuSPARSELt adds it in the GEMM's epilogue and reads it as that type.
            y2d = backend.linear(x2d, prepared, None if bias is None else bias.to(x.dtype).contiguous())
        ctx.backend, ctx.grad_mode, ctx.srste_lambda = backend, grad_mode, srste_lambda
        ctx.x_shape, ctx.bias_dtype = x.shape, None if bias is None else bias.dtype
        ctx.save_for_backward(
            x2d if need_w_grad else None,
            mask if need_w_grad and grad_mode != "ste" else None,
            weight if need_w_grad and grad_mode == "srste" else None,
            prepared.input_grad if need_x_grad else None,
        )
        return y2d.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, gy):
        x2d, mask, weight, grad_operand = ctx.saved_tensors
        gy2d = gy.reshape(-1, gy.shape[-1])
        grad_x = grad_w = grad_b = None
        with _autocast_off(gy):
            if ctx.needs_input_grad[0]:
                grad_x = ctx.backend.input_grad(gy2d, grad_operand).reshape(ctx.x_shape)
            if ctx.needs_input_grad[1]:
                grad_w = _weight_grad(gy2d, x2d, mask, weight, ctx.grad_mode, ctx.srste_lambda)
            if ctx.needs_input_grad[2]:
                grad_b = _bias_grad(gy2d, ctx.bias_dtype)
        return grad_x, grad_w, grad_b, None, None, None, None, None


def _needs_input_grad(x: Tensor) -> bool:
    return torch.is_grad_enabled() and x.requires_grad


def _check_operands(x: Tensor, weight: Tensor) -> None:
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x has {x.shape[-1]} features but weight is {tuple(weight.shape)} (out, in); "
                         "pass x with in_features as its last dim")
    if x.dtype != weight.dtype:
        raise ValueError(f"x is {x.dtype} but weight is {weight.dtype}; cast both to the compute dtype "
                         "before calling (SparseLinear does this under autocast)")


def weight_sparse_linear(x: Tensor, weight: Tensor, bias: Tensor | None, mask: Tensor, backend: Backend,
                         grad_mode: str = "ste", srste_lambda: float = 0.0,
                         prepared: PreparedWeight | None = None) -> Tensor:
    """Y = X @ (W * mask)^T + b for x (..., in), weight (out, in), mask bool (out, in).

    dX = dY @ W_s through `backend.input_grad`. dW is dense dY^T @ X ("ste"), that times the mask
    ("masked": the true gradient of the masked layer), or "ste" plus srste_lambda * (1 - mask) * W
    ("srste"; srste_lambda is used by that mode only).
    prepared: `backend.prepare_weight(weight, mask, need_input_grad)[1]` when the caller made it
    already (SparseLinear does: a refreshed mask and the compressed operands come from one kernel
    launch on sm90); made here from `mask` otherwise.
    """
    if grad_mode not in GRAD_MODES:
        raise ValueError(f"grad_mode={grad_mode!r} is not one of {GRAD_MODES}; ste is the usual choice")
    if mask.dtype != torch.bool or mask.shape != weight.shape:
        raise ValueError(f"mask must be bool with the weight's shape {tuple(weight.shape)}, got {mask.dtype} "
                         f"{tuple(mask.shape)}; build it with mask_24(weight.abs())")
    _check_operands(x, weight)
    need_input_grad = _needs_input_grad(x)
    if prepared is None:
        with torch.no_grad():
            _, prepared = backend.prepare_weight(weight.detach(), mask, need_input_grad)
    elif prepared.input_grad is None and need_input_grad:
        raise ValueError("x needs a gradient but `prepared` was made without the input-grad operand; "
                         "call prepare_weight(..., need_input_grad=True)")
    return _WeightSparseLinear.apply(x, weight, bias, mask, prepared, backend, grad_mode, srste_lambda)


class _ActivationSparseLinear(Function):
    @staticmethod
    def forward(ctx, x, weight, bias, backend, transposable):
        need_x_grad, need_w_grad = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        x2d = x.reshape(-1, x.shape[-1])
        with torch.no_grad():
            # The backend's own pass where it has one (sm90: mask, X_s and its compressed forms at once).
            x_sparse, mask, compressed, compressed_t = backend.prune_activations(x2d, transposable)
        with _autocast_off(x):
            y2d = backend.sparse_input_linear(x_sparse, weight, compressed)
            if bias is not None:
                y2d = y2d + bias.to(y2d.dtype)
        ctx.backend, ctx.transposable = backend, transposable
        ctx.x_shape, ctx.bias_dtype = x.shape, None if bias is None else bias.dtype
        ctx.save_for_backward(
            x_sparse if need_w_grad else None,
            compressed_t if need_w_grad else None,
            mask if need_x_grad else None,
            weight if need_x_grad else None,
        )
        return y2d.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, gy):
        x_sparse, compressed_t, mask, weight = ctx.saved_tensors
        gy2d = gy.reshape(-1, gy.shape[-1])
        grad_x = grad_w = grad_b = None
        with _autocast_off(gy):
            if ctx.needs_input_grad[0]:
                grad_x = (gy2d @ weight).masked_fill(~mask, 0).reshape(ctx.x_shape)
            if ctx.needs_input_grad[1]:
                grad_w = ctx.backend.sparse_input_weight_grad(gy2d, x_sparse, ctx.transposable, compressed_t)
            if ctx.needs_input_grad[2]:
                grad_b = _bias_grad(gy2d, ctx.bias_dtype)
        return grad_x, grad_w, grad_b, None, None


def activation_sparse_linear(x: Tensor, weight: Tensor, bias: Tensor | None, backend: Backend,
                             transposable: bool = False) -> Tensor:
    """Y = X_s @ W^T + b, where X_s keeps the 2 largest |x| of every 4 features of each token.

    Meant for the second MLP linear after a Squared-ReLU, whose inputs are mostly zero already.
    dX is dense dY @ W, masked (the true gradient); dW = dY^T @ X_s. transposable=True picks a
    4x4-tile transposable mask over (tokens, features), so dW can run sparse on X_s^T too.
    """
    _check_operands(x, weight)
    return _ActivationSparseLinear.apply(x, weight, bias, backend, transposable)
