"""Block-sparse masks: by block norm or by learned per-block scores (DRESS / superblock).

A weight of shape (m, k) is cut into (m/b, k/b) tiles of b x b; a block mask has one entry per
tile. `w_eff = w * expand_block_mask(BlockScoreSTE.apply(scores, level), b)` trains the scores
and the weights together: the forward uses the hard top-k mask, the backward hands the scores
the gradient the mask received (arXiv 2207.00670).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from sparsetrain.sparse.config import BlockConfig


def check_block_divisible(shape: Sequence[int], block_size: int) -> None:
    """Raise ValueError if a (m, k) weight cannot be tiled by block_size x block_size."""
    m, k = shape
    if m % block_size or k % block_size:
        raise ValueError(
            f"layer weight is {m}x{k} and block size {block_size} does not divide both dims; "
            f"pick a block size that divides {m} and {k}, or leave this layer dense"
        )


def block_norms(w2d: Tensor, block_size: int) -> Tensor:
    """L2 norm of every block_size x block_size tile of a 2-D weight, in fp32: (m/b, k/b)."""
    check_block_divisible(w2d.shape, block_size)
    m, k = w2d.shape
    tiles = w2d.detach().float().reshape(m // block_size, block_size, k // block_size, block_size)
    return tiles.square().sum(dim=(1, 3)).sqrt()


def kept_block_count(num_blocks: int, sparsity: float) -> int:
    """round((1 - sparsity) * num_blocks), at least 1 (Python's round: halves go to even)."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity={sparsity} must be in [0, 1): it is the fraction of blocks pruned")
    return max(1, round((1.0 - sparsity) * num_blocks))


def block_mask_from_scores(scores: Tensor, sparsity: float) -> Tensor:
    """Bool mask of scores' shape keeping the top (1 - sparsity) fraction of blocks.

    Ties go to the lower flat index: a stable descending sort keeps equal scores in index order,
    so every device and every DDP rank picks the same blocks.
    """
    flat = scores.detach().flatten()
    keep = kept_block_count(flat.numel(), sparsity)
    order = torch.sort(flat, descending=True, stable=True).indices
    # index_fill_, not `mask[...] = True`: a Python scalar there is a host-to-device copy, which a CUDA
    # graph capture of a DRESS step refuses.
    return torch.zeros_like(flat, dtype=torch.bool).index_fill_(0, order[:keep], True).view(scores.shape)


def expand_block_mask(block_mask: Tensor, block_size: int) -> Tensor:
    """(m/b, k/b) -> (m, k), each entry repeated over its tile. Differentiable for float masks:
    the gradient of a tile sums back to its block."""
    mb, kb = block_mask.shape
    tiles = block_mask[:, None, :, None].expand(mb, block_size, kb, block_size)
    return tiles.reshape(mb * block_size, kb * block_size)


class BlockScoreSTE(torch.autograd.Function):
    """Forward: the hard top-k block mask of the scores, as a float tensor of the scores' dtype.
    Backward: the mask's gradient goes to the scores unchanged (straight-through)."""

    @staticmethod
    def forward(ctx, scores: Tensor, sparsity: float) -> Tensor:
        return block_mask_from_scores(scores, sparsity).to(scores.dtype)

    @staticmethod
    def backward(ctx, grad_mask: Tensor) -> tuple[Tensor, None]:
        return grad_mask, None


def flip_rate(old_mask: Tensor, new_mask: Tensor) -> float:
    """Fraction of mask entries that changed between two masks of the same shape."""
    if old_mask.shape != new_mask.shape:
        raise ValueError(f"masks differ in shape: {tuple(old_mask.shape)} vs {tuple(new_mask.shape)}")
    if old_mask.numel() == 0:
        return 0.0
    return torch.count_nonzero(old_mask.bool() ^ new_mask.bool()).item() / old_mask.numel()


def block_layers(model: nn.Module) -> list[nn.Module]:
    """The block-sparse layers of a model (modules whose sparse_config is a BlockConfig)."""
    return [m for m in model.modules() if isinstance(getattr(m, "sparse_config", None), BlockConfig)]


def set_block_level(model: nn.Module, level: float) -> None:
    """Switch every block layer to sparsity `level`; their masks follow at once.

    DRESS multi-subnet training: for each level, set it, run the forward, weight the loss; the
    subnets share the weights, so one backward of the weighted sum trains them all.
    """
    for layer in block_layers(model):
        layer.set_level(level)
