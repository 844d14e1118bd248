"""The block-sparse linear and MLP on the Triton kernels as autograd functions (a block layer runs them on the
route `sparsetrain.gpu.backends.block_routes` picks), and `fuse_mlp_gelu_`, which moves an MLP's GELU into the
epilogue of its fc1 kernel for inference."""
from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd import Function


def _row_major(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


class _BlockSparseLinear(Function):
    """y = x @ (W * expand(block_mask))^T + b, with the kept blocks given by `index`.

    block_mask (out/b, in/b): None when no gradient needs it (grad_mode "ste", mask not learned);
    a bool tensor for grad_mode "masked"; the float STE mask of the DRESS scores when they learn
    (it receives dL/dmask = sum over each block of dL/dW_s * W, as the emulated route gives it).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, block_mask, index, grad_mode):
        from sparsetrain.gpu.kernels.bsr_matmul import block_sparse_linear

        x2d = _row_major(x.reshape(-1, x.shape[-1]))
        y2d = block_sparse_linear(x2d, weight, index, bias)
        ctx.index, ctx.grad_mode, ctx.x_shape = index, grad_mode, x.shape
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.save_for_backward(x2d, weight, block_mask)
        return y2d.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, gy):
        from sparsetrain.gpu.kernels.bsr_matmul import block_sparse_input_grad

        x2d, weight, block_mask = ctx.saved_tensors
        gy2d = _row_major(gy.reshape(-1, gy.shape[-1]))
        need_x, need_w, need_b, need_mask = ctx.needs_input_grad[:4]
        grad_x = None
        if need_x:
            grad_x = block_sparse_input_grad(gy2d, weight, ctx.index).reshape(ctx.x_shape)
        grad_w, grad_b, grad_mask = _parameter_grads(gy2d, x2d, weight, block_mask, ctx.index, ctx.grad_mode,
                                                     ctx.bias_dtype, need_w, need_b, need_mask)
        return grad_x, grad_w, grad_b, grad_mask, None, None


def _parameter_grads(gy2d: Tensor, x2d: Tensor, weight: Tensor, block_mask: Tensor | None, index, grad_mode: str,
                     bias_dtype, need_w: bool, need_b: bool, need_mask: bool):
    """dL/dW, dL/dbias and dL/d(block mask) of y = x @ (W * expand(block_mask))^T + bias (None where not needed).

    grad_mode "masked" without a learned mask: the kernel computes the kept blocks only. Otherwise one dense
    GEMM: the STE and the score gradient need every block of it.
    """
    grad_w = grad_b = grad_mask = None
    b = index.block_size
    if need_w and grad_mode == "masked" and not need_mask:
        from sparsetrain.gpu.kernels.bsr_matmul import block_sparse_weight_grad

        grad_w = block_sparse_weight_grad(gy2d, x2d, index)
    elif need_w or need_mask:
        dense = gy2d.t() @ x2d  # dL/dW_s for every block, pruned ones too
        blocks = dense.view(weight.shape[0] // b, b, weight.shape[1] // b, b)
        if need_w:
            masked = grad_mode == "masked"
            grad_w = (blocks * block_mask.to(dense.dtype)[:, None, :, None]).view_as(dense) if masked else dense
        if need_mask:
            products = blocks * weight.view_as(blocks)
            grad_mask = products.sum(dim=(1, 3), dtype=torch.float32).to(block_mask.dtype)
    if need_b:
        # Summing thousands of bf16 rows in bf16 loses the small ones.
        grad_b = gy2d.sum(0, dtype=torch.float32).to(bias_dtype)
    return grad_w, grad_b, grad_mask


class _BlockSparseMlp(Function):
    """y = fc2(GELU(fc1(x))) with both linears block-sparse on the kernels, as one autograd node.

    Its backward runs fc2's input grad with GELU's derivative in the kernel's epilogue, giving dL/dh (h: fc1's
    pre-activation) straight away: the separate GELU backward pass (read dL/da and h, write dL/dh) and the
    write of dL/da are gone. Each layer's operands are (weight, bias, block mask, index) as _BlockSparseLinear
    takes them; the same tensors are saved as by the three separate nodes (x, h, a).
    """

    @staticmethod
    def forward(ctx, x, w1, b1, mask1, w2, b2, mask2, index1, index2, grad_mode):
        from sparsetrain.gpu.kernels.bsr_matmul import block_sparse_linear

        x2d = _row_major(x.reshape(-1, x.shape[-1]))
        h = block_sparse_linear(x2d, w1, index1, b1)
        a = torch.nn.functional.gelu(h)
        y2d = block_sparse_linear(a, w2, index2, b2)
        ctx.indexes, ctx.grad_mode, ctx.x_shape = (index1, index2), grad_mode, x.shape
        ctx.bias_dtypes = (None if b1 is None else b1.dtype, None if b2 is None else b2.dtype)
        ctx.save_for_backward(x2d, h, a, w1, mask1, w2, mask2)
        return y2d.reshape(*x.shape[:-1], w2.shape[0])

    @staticmethod
    def backward(ctx, gy):
        from sparsetrain.gpu.kernels.bsr_matmul import block_sparse_input_grad

        x2d, h, a, w1, mask1, w2, mask2 = ctx.saved_tensors
        (index1, index2), (bias1_dtype, bias2_dtype) = ctx.indexes, ctx.bias_dtypes
        need = ctx.needs_input_grad
        gy2d = _row_major(gy.reshape(-1, gy.shape[-1]))
        grad_w2, grad_b2, grad_mask2 = _parameter_grads(gy2d, a, w2, mask2, index2, ctx.grad_mode, bias2_dtype,
                                                        need[4], need[5], need[6])
        grad_x = grad_w1 = grad_b1 = grad_mask1 = None
        if any(need[:4]):
            grad_h = block_sparse_input_grad(gy2d, w2, index2, gelu_input=h)
            if need[0]:
                grad_x = block_sparse_input_grad(grad_h, w1, index1).reshape(ctx.x_shape)
            grad_w1, grad_b1, grad_mask1 = _parameter_grads(grad_h, x2d, w1, mask1, index1, ctx.grad_mode,
                                                            bias1_dtype, need[1], need[2], need[3])
        return grad_x, grad_w1, grad_b1, grad_mask1, grad_w2, grad_b2, grad_mask2, None, None, None


def block_sparse_mlp(x: Tensor, fc1: tuple, fc2: tuple, grad_mode: str = "ste") -> Tensor:
    """fc2(GELU(fc1(x))) on the kernels, GELU's backward fused into fc2's input grad (see _BlockSparseMlp).

    fc1, fc2: (weight, bias, block_mask, index) of each linear, as `block_sparse_linear` takes them (weights
    and biases in x's dtype; block_mask None, bool for grad_mode "masked", or a float STE mask).
    """
    if grad_mode == "masked" and (fc1[2] is None or fc2[2] is None):
        raise ValueError("grad_mode='masked' needs both block masks to mask the weight gradients")
    (w1, b1, mask1, index1), (w2, b2, mask2, index2) = fc1, fc2
    b1, b2 = (None if b is None else b.contiguous() for b in (b1, b2))
    return _BlockSparseMlp.apply(x, w1, b1, mask1, w2, b2, mask2, index1, index2, grad_mode)


def block_sparse_linear(x: Tensor, weight: Tensor, bias: Tensor | None, block_mask: Tensor | None, index,
                        grad_mode: str = "ste") -> Tensor:
    """x (..., in) @ W_s^T + bias on the kernels, differentiable in x, weight, bias and a float block_mask.

    weight (out, in) and bias in x's dtype (fp16/bf16, CUDA); index: `bsr_matmul.index_from_block_mask`
    of the block mask; block_mask as in _BlockSparseLinear (needed for grad_mode "masked" or learned masks).
    """
    if grad_mode == "masked" and block_mask is None:
        raise ValueError("grad_mode='masked' needs the block mask to mask the weight gradient; pass block_mask")
    if bias is not None:
        bias = bias.contiguous()
    return _BlockSparseLinear.apply(x, weight, bias, block_mask, index, grad_mode)


def block_sparse_linear_gelu(x: Tensor, weight: Tensor, bias: Tensor | None, index) -> Tensor:
    """GELU(x @ W_s^T + bias) in one kernel, GELU in its epilogue: inference only (no autograd)."""
    from sparsetrain.gpu.kernels.bsr_matmul import block_sparse_linear as kernel_linear

    x2d = _row_major(x.reshape(-1, x.shape[-1]))
    y2d = kernel_linear(x2d, weight, index, None if bias is None else bias.contiguous(), gelu=True)
    return y2d.reshape(*x.shape[:-1], weight.shape[0])


def fuse_mlp_gelu_(model: torch.nn.Module) -> list[str]:
    """Move the exact GELU that follows each block-sparse `fc1` (timm's Mlp: fc1 -> act -> ...) into that
    layer, where the kernel applies it in its epilogue when no gradient is taken (inference): one pass
    over the (tokens, 4d) activation instead of three. Same function; in place. Returns the MLPs' names.
    """
    fused = []
    for name, module in model.named_modules():
        fc1, act = getattr(module, "fc1", None), getattr(module, "act", None)
        is_block_layer = getattr(fc1, "pattern", None) == "block" and hasattr(fc1, "fuse_gelu")
        if is_block_layer and type(act) is torch.nn.GELU and act.approximate == "none":
            fc1.fuse_gelu = True
            module.act = torch.nn.Identity()
            fused.append(name)
    return fused
