"""Fast-path kernels (Triton) for 2:4 training on Hopper. Each one has a pure-torch reference
(`sparsetrain.sparse.masks`, `sparsetrain.gpu.layout_sm90`) that it matches bit for bit (see
tests/gpu/test_prune_compress.py).

Import is cheap and never fails: where Triton is missing, `available()` says so and the kernel
functions raise a RuntimeError that names the fallback.

`sparsetrain.gpu.kernels.bsr_matmul` (imported on demand) holds the block-sparse matmuls of block layers,
tuned per shape by `bsr_autotune`.
`sparsetrain.gpu.kernels.cslt_plans.sparse_mm` (imported on demand) is torch._cslt_sparse_mm with the
cuSPARSELt plan built once per shape, so a call costs a fraction of the op's host time
(`scripts/bench.py --only c` measures both).
"""
import importlib.util

import torch

_HAS_TRITON = importlib.util.find_spec("triton") is not None


def available(device=None) -> bool:
    """True where the Triton kernels can run: Triton installed and a CUDA device of sm80 or newer."""
    if not (_HAS_TRITON and torch.cuda.is_available()):
        return False
    return torch.cuda.get_device_capability(device)[0] >= 8


def _missing(*_, **__):
    raise RuntimeError("sparsetrain.gpu.kernels needs Triton; install it or use the torch-op route "
                       "(masks.mask_24_transposable + torch._cslt_compress)")


if _HAS_TRITON:
    from sparsetrain.gpu.kernels.prune_compress import (compress_masked, compress_pruned, prune_activations,
                                                    prune_compress_into, prune_compress_transposable)
else:  # keep the names importable so callers can branch on available()
    compress_masked = compress_pruned = prune_activations = prune_compress_into = prune_compress_transposable = _missing

__all__ = ["available", "compress_masked", "compress_pruned", "prune_activations", "prune_compress_into",
           "prune_compress_transposable"]
