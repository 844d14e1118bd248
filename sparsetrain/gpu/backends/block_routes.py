"""Which route a block layer runs where it runs, and why, in one sentence for the layer table.

Routes of a block layer (BlockConfig.backend):
  "triton_bsr"  forward and input grad through `sparsetrain.gpu.kernels.bsr_matmul`, which read only the kept
                blocks of the dense weight; the weight grad too under grad_mode="masked" (pruned blocks
                get none), else one dense GEMM (the STE and the DRESS score gradient need all of it).
  "emulated"    F.linear of the masked weight: any device and dtype; the reference the kernels match.
  "auto"        triton_bsr where it can run (CUDA, fp16/bf16, blocks of 32/64) and wins, emulated elsewhere:
                16x16 blocks measured slower than cuBLAS, and at levels under AUTO_MIN_SPARSITY (a
                schedule's ramp) a forward runs masked dense even where the kernels can run.
"""
import torch

from sparsetrain.sparse.config import BLOCK_BACKENDS

KERNEL_BLOCK_SIZES = (16, 32, 64)
KERNEL_DTYPES = (torch.float16, torch.bfloat16)
# At ViT-L MLP shapes on an H100, 64x64 blocks break even with cuBLAS a little above 50% sparse
# (`scripts/bench_block.py --only gemm`), so auto starts at 60%.
AUTO_MIN_SPARSITY = 0.6
# Same benchmark: 16x16 blocks stay slower than cuBLAS even at 90% (every 16-wide output tile re-reads its rows of x).
AUTO_BLOCK_SIZES = (32, 64)


def _kernel_blockers(block_size: int, device: torch.device, dtype: torch.dtype) -> list[str]:
    """Why the kernels cannot run this layer here, one short clause per reason (empty if they can)."""
    from sparsetrain.gpu import kernels

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
        return "emulated", (f"emulated (masked dense): {block_size}x{block_size} blocks measured slower than cuBLAS on an "
                            "H100 (ViT-L MLP, 90% sparse: scripts/bench_block.py); sparsity.backend=triton_bsr forces the "
                            "kernels")
    reason = "triton_bsr: forward and input grad skip pruned blocks, weight grad too once the mask is final"
    if requested == "auto":
        reason += f"; masked dense while the level is under {AUTO_MIN_SPARSITY:.0%} (kernels measured slower there)"
    return "triton_bsr", reason


def kernel_serves(requested: str, route: str, level: float) -> bool:
    """Whether this forward runs on the kernels: always when forced, under auto only where they win."""
    return route == "triton_bsr" and (requested == "triton_bsr" or level >= AUTO_MIN_SPARSITY)
