"""The block-sparse linear on the Triton kernels, and which route a block layer runs.

Routes of a block layer (BlockConfig.backend):
  "triton_bsr"  forward and input grad through `sparsetrain.kernels.bsr_matmul`, which read only the kept
                blocks of the dense weight; the weight grad is one dense GEMM (the STE and the DRESS
                score gradient need all of it), masked afterwards for grad_mode="masked".
  "emulated"    F.linear of the masked weight: any device and dtype; the reference the kernels match.
  "auto"        triton_bsr where it can run (CUDA, fp16/bf16, blocks of 32/64) and wins, emulated elsewhere:
                16x16 blocks measured slower than cuBLAS, and at levels under AUTO_MIN_SPARSITY (a
                schedule's ramp) a forward runs masked dense even where the kernels can run.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd import Function

from sparsetrain.sparse.config import BLOCK_BACKENDS

KERNEL_BLOCK_SIZES = (16, 32, 64)
KERNEL_DTYPES = (torch.float16, torch.bfloat16)
# Measured at ViT-L MLP shapes on an H100 (benchmarks/bench-block-2026-11-25T1626.md), 64x64 blocks:
# 50% sparse 0.90-1.03x of cuBLAS, 80% 1.81-2.02x; the break-even lies near 52%, so auto starts at 60%.
AUTO_MIN_SPARSITY = 0.6
# Same run, 90% sparse: 16x16 blocks 0.69-0.74x (every 16-wide output tile re-reads its rows of x).
AUTO_BLOCK_SIZES = (32, 64)


def _kernel_blockers(block_size: int, device: torch.device, dtype: torch.dtype) -> list[str]:
    """Why the kernels cannot run this layer here, one short clause per reason (empty if they can)."""
    from sparsetrain import kernels

    blockers = []
    if device.type != "cuda":
        blockers.append(f"runs on {device.type}, the block-sparse kernels need CUDA")
    elif not kernels.available(device):
        blockers.append("Triton or an sm80+ GPU is missing")
    if dtype not in KERNEL_DTYPES:
        blockers.append(f"compute dtype {str(dtype).removeprefix('torch.')} is not fp16/bf16")
    if block_size not in KERNEL_BLOCK_SIZES:
        blockers.append(f"block size {block_size} is not one of {KERNEL_BLOCK_SIZES}")
    return blockers


def resolve_block_route(requested: str, block_size: int, device, dtype: torch.dtype) -> tuple[str, str]:
    """("triton_bsr" | "emulated", a short sentence for the layer table) for one block layer."""
    if requested not in BLOCK_BACKENDS:
        raise ValueError(f"block sparsity backend={requested!r} is not one of {BLOCK_BACKENDS}; use auto unless testing")
    if requested == "emulated":
        return "emulated", "emulated: requested (masked dense)"
    blockers = _kernel_blockers(block_size, torch.device(device), dtype)
    if blockers and requested == "triton_bsr":
        raise ValueError(f"sparsity.backend=triton_bsr cannot run this block layer: {'; '.join(blockers)}. Use "
                         "sparsity.backend=auto or emulated, or train in bf16-mixed on CUDA")
    if blockers:
        return "emulated", "emulated: " + "; ".join(blockers)
    if requested == "auto" and block_size not in AUTO_BLOCK_SIZES:
        return "emulated", (f"emulated (masked dense): {block_size}x{block_size} blocks measured 0.69-0.74x of cuBLAS on "
                            "an H100 (ViT-L MLP, 90% sparse); sparsity.backend=triton_bsr forces the kernels")
    reason = "triton_bsr: forward and input grad skip pruned blocks, weight grad dense"
    if requested == "auto":
        reason += f"; masked dense while the level is under {AUTO_MIN_SPARSITY:.0%} (kernels measured slower there)"
    return "triton_bsr", reason


def kernel_serves(requested: str, route: str, level: float) -> bool:
    """Whether this forward runs on the kernels: always when forced, under auto only where they win."""
    return route == "triton_bsr" and (requested == "triton_bsr" or level >= AUTO_MIN_SPARSITY)


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
        from sparsetrain.kernels.bsr_matmul import block_sparse_linear

        x2d = _row_major(x.reshape(-1, x.shape[-1]))
        y2d = block_sparse_linear(x2d, weight, index, bias)
        ctx.index, ctx.grad_mode, ctx.x_shape = index, grad_mode, x.shape
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.save_for_backward(x2d, weight, block_mask)
        return y2d.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, gy):
        from sparsetrain.kernels.bsr_matmul import block_sparse_input_grad

        x2d, weight, block_mask = ctx.saved_tensors
        gy2d = _row_major(gy.reshape(-1, gy.shape[-1]))
        need_x, need_w, need_b, need_mask = ctx.needs_input_grad[:4]
        grad_x = grad_w = grad_b = grad_mask = None
        if need_x:
            grad_x = block_sparse_input_grad(gy2d, weight, ctx.index).reshape(ctx.x_shape)
        if need_w or need_mask:
            dense = gy2d.t() @ x2d  # dL/dW_s for every block, pruned ones too
            b = ctx.index.block_size
            blocks = dense.view(weight.shape[0] // b, b, weight.shape[1] // b, b)
            if need_w:
                masked = ctx.grad_mode == "masked"
                grad_w = (blocks * block_mask.to(dense.dtype)[:, None, :, None]).view_as(dense) if masked else dense
            if need_mask:
                products = blocks * weight.view_as(blocks)
                grad_mask = products.sum(dim=(1, 3), dtype=torch.float32).to(block_mask.dtype)
        if need_b:
            # Summing thousands of bf16 rows in bf16 loses the small ones.
            grad_b = gy2d.sum(0, dtype=torch.float32).to(ctx.bias_dtype)
        return grad_x, grad_w, grad_b, grad_mask, None, None


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
    from sparsetrain.kernels.bsr_matmul import block_sparse_linear as kernel_linear

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
