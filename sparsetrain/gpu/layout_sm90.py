"""cuSPARSELt 0.8's compressed 2:4 layout on sm90 (H100), written and read in pure torch.

`torch._cslt_compress` of an (m, k) fp16/bf16 matrix returns (m, k/2 + k/16) elements: the m*k/2
kept values compacted row-major, then one 4-bit nibble per group of 4 columns, two per byte, low
nibble first. A nibble holds the kept positions i < j of its group as `i | j << 2`. Nibbles are
not stored row-major: see `_nibble_positions`. The layout was recovered on an H100 and matched
`_cslt_compress` bit for bit (docs/design.md); other GPUs use other layouts.
"""
import torch
from torch import Tensor

from sparsetrain.sparse.masks import mask_24

TILE = 64  # the layout is built from 64 x 64 tiles of the matrix

# (bit of the row, bit of the in-tile nibble offset) and the same for the group (column // 4).
_ROW_BITS = ((3, 0), (0, 4), (1, 5), (2, 6), (4, 7), (5, 8))
_GROUP_BITS = ((2, 1), (0, 2), (1, 3), (3, 9))
_NIBBLES_PER_TILE = 1024  # 64 rows x 16 groups


def _scatter_bits(x: Tensor, bit_map) -> Tensor:
    out = torch.zeros_like(x)
    for src, dst in bit_map:
        out |= ((x >> src) & 1) << dst
    return out


def _nibble_positions(m: int, k: int, device) -> Tensor:
    """(m, k/4) int64: the index, in the metadata's nibble stream, of the nibble of (row, group)."""
    rows = torch.arange(m, device=device)
    groups = torch.arange(k // 4, device=device)
    # The position is a sum of a row-only and a group-only term, so it broadcasts.
    row_term = (rows // TILE) * (k // TILE) * _NIBBLES_PER_TILE + _scatter_bits(rows, _ROW_BITS)
    group_term = (groups // 16) * _NIBBLES_PER_TILE + _scatter_bits(groups, _GROUP_BITS)
    return row_term[:, None] + group_term[None, :]


def _check_shape_and_dtype(m: int, k: int, dtype: torch.dtype) -> None:
    if m % TILE or k % TILE:
        raise ValueError(f"the sm90 layout needs both dims to be multiples of {TILE}, got {m}x{k}; "
                         "pad the matrix or use compress='cslt'")
    if dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"the sm90 layout is known for fp16/bf16 only, got {dtype}; cast the matrix first")


def compressed_shape(m: int, k: int) -> tuple[int, int]:
    """Shape of the compressed (m, k) matrix, as `torch._cslt_compress` returns it."""
    return m, k // 2 + k // 16


def compress_sm90(w_masked: Tensor) -> Tensor:
    """Compress a 2:4-sparse (m, k) fp16/bf16 matrix exactly as `torch._cslt_compress` does on sm90.

    Each group of 4 must hold at most 2 nonzeros (extra ones are dropped). Groups with fewer keep
    their nonzeros plus the highest-index zero slots, as cuSPARSELt 0.8 does on sm90 (measured:
    docs/design.md), so the bytes equal `_cslt_compress`'s for any input. A stored
    zero keeps its sign.
    """
    if w_masked.dim() != 2:
        raise ValueError(f"compress_sm90 needs a 2-D matrix, got shape {tuple(w_masked.shape)}")
    m, k = w_masked.shape
    _check_shape_and_dtype(m, k, w_masked.dtype)
    groups = w_masked.unflatten(-1, (k // 4, 4))
    slot = torch.arange(4, device=w_masked.device)
    # Nonzeros outrank zeros (-0 is a zero); among nonzeros the lower slot wins, among zeros the higher.
    keep = mask_24(torch.where(groups != 0, 8 - slot, slot).float())
    first = torch.where(keep, slot, 4).amin(-1)
    second = torch.where(keep, slot, -1).amax(-1)
    values = groups.gather(-1, torch.stack([first, second], -1)).reshape(-1)
    nibbles = (first | (second << 2)).to(torch.uint8)
    stream = torch.empty(m * k // 4, dtype=torch.uint8, device=w_masked.device)
    stream[_nibble_positions(m, k, w_masked.device).reshape(-1)] = nibbles.reshape(-1)
    metadata = stream[0::2] | (stream[1::2] << 4)
    packed = torch.cat([values.view(torch.uint8), metadata])
    return packed.view(w_masked.dtype).view(compressed_shape(m, k))


def decompress_sm90(compressed: Tensor, m: int, k: int) -> Tensor:
    """Inverse of `compress_sm90`: the dense (m, k) matrix with zeros at the pruned positions."""
    _check_shape_and_dtype(m, k, compressed.dtype)
    if compressed.numel() != m * (k // 2 + k // 16):
        raise ValueError(f"a compressed {m}x{k} matrix has {m * (k // 2 + k // 16)} elements, got "
                         f"{compressed.numel()}; pass the (m, k) of the matrix that was compressed")
    flat = compressed.reshape(-1)
    values = flat[: m * k // 2].view(m, k // 4, 2)
    metadata = flat[m * k // 2:].view(torch.uint8)
    stream = torch.stack([metadata & 0xF, metadata >> 4], -1).reshape(-1)
    nibbles = stream[_nibble_positions(m, k, compressed.device)].long()
    slots = torch.stack([nibbles & 3, nibbles >> 2], -1)
    dense = torch.zeros(m, k // 4, 4, dtype=compressed.dtype, device=compressed.device)
    return dense.scatter_(-1, slots, values).view(m, k)
