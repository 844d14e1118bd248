"""2:4 masks: row-wise and 4x4-tile transposable, identical on CPU and CUDA.

Both masks are decided by comparisons and additions done in a fixed order in float32, never by
topk or sort, whose tie-breaking differs between devices. Ties go to the lower index (row mask)
or to the lower pattern index (transposable mask, see `TRANSPOSABLE_PATTERNS`).
"""
import itertools

import torch
import torch.nn.functional as F
from torch import Tensor

# The 6 ways to keep 2 of 4 columns, in lexicographic order.
_PAIRS = tuple(itertools.combinations(range(4), 2))

# Tiles scored per chunk in mask_24_transposable: bounds its working memory to about 50 MB.
_TILE_CHUNK = 1 << 16

# Sum of at most 8 scores (two per row, four rows) cannot overflow once each is within this bound.
_SCORE_BOUND = torch.finfo(torch.float32).max / 8


def _transposable_pair_table() -> Tensor:
    """(90, 4) int64: for each pattern, the index into _PAIRS kept by each of the 4 rows.

    Patterns are in lexicographic order of their 4 pair indices; only those that keep exactly 2
    per column are listed. The first one (rows keep 01, 01, 23, 23) wins when all scores tie.
    """
    valid = []
    for rows in itertools.product(range(len(_PAIRS)), repeat=4):
        column_counts = [0, 0, 0, 0]
        for pair_index in rows:
            for col in _PAIRS[pair_index]:
                column_counts[col] += 1
        if column_counts == [2, 2, 2, 2]:
            valid.append(rows)
    return torch.tensor(valid, dtype=torch.int64)


def _pattern_masks(pair_table: Tensor) -> Tensor:
    pair_masks = torch.zeros(len(_PAIRS), 4, dtype=torch.bool)
    for i, (a, b) in enumerate(_PAIRS):
        pair_masks[i, a] = pair_masks[i, b] = True
    return pair_masks[pair_table]


_PAIR_TABLE = _transposable_pair_table()
TRANSPOSABLE_PATTERNS = _pattern_masks(_PAIR_TABLE)  # (90, 4, 4) bool, in tie-break order
_PAIR_COLUMNS = torch.tensor(_PAIRS).t().contiguous()  # (2, 6): first and second column of each pair
_TABLES_ON_DEVICE: dict[torch.device, tuple[Tensor, Tensor, Tensor]] = {}


def _tables_on(device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """(pair table, pair columns, patterns) on `device`, copied there once: a CUDA graph capture
    allows no host-to-device copy. While torch.compile traces they are plain copies (graph constants)."""
    tables = (_PAIR_TABLE, _PAIR_COLUMNS, TRANSPOSABLE_PATTERNS)
    if torch.compiler.is_compiling():
        return tuple(t.to(device) for t in tables)
    if device not in _TABLES_ON_DEVICE:
        _TABLES_ON_DEVICE[device] = tuple(t.to(device) for t in tables)
    return _TABLES_ON_DEVICE[device]


def _check_groups_of_four(size: int, what: str) -> None:
    if size % 4:
        raise ValueError(f"2:4 masks need {what} to be a multiple of 4, got {size}; "
                         "pad the tensor or leave this layer dense")


def mask_24(scores: Tensor) -> Tensor:
    """Keep the 2 largest of every 4 consecutive scores along the last dim (ties: lower index)."""
    if scores.dim() == 0:
        raise ValueError("mask_24 needs at least 1 dim; pass the score tensor, not a scalar")
    _check_groups_of_four(scores.shape[-1], "the last dim")
    # NaN compares false both ways, which would keep 3 of 4: make it the least preferred instead.
    s = torch.nan_to_num(scores.float(), nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))
    columns = s.unflatten(-1, (-1, 4)).unbind(-1)
    keep = []
    for i, ci in enumerate(columns):
        beaten_by = torch.zeros_like(ci, dtype=torch.int8)
        for j, cj in enumerate(columns):
            if j != i:
                beaten_by += (cj >= ci if j < i else cj > ci).to(torch.int8)
        keep.append(beaten_by < 2)
    return torch.stack(keep, -1).flatten(-2)


def _bounded_float32(scores: Tensor) -> Tensor:
    s = torch.nan_to_num(scores.float(), nan=-_SCORE_BOUND, posinf=_SCORE_BOUND, neginf=-_SCORE_BOUND)
    return s.clamp(-_SCORE_BOUND, _SCORE_BOUND)


def _best_patterns(tiles: Tensor) -> Tensor:
    """Index of the highest-scoring transposable pattern of each (4, 4) tile, first max on ties."""
    pair_table, (first_cols, second_cols), _ = _tables_on(tiles.device)
    best = torch.empty(tiles.shape[0], dtype=torch.int64, device=tiles.device)
    for start in range(0, tiles.shape[0], _TILE_CHUNK):
        chunk = tiles[start:start + _TILE_CHUNK]
        pair_sums = chunk[..., first_cols] + chunk[..., second_cols]  # (tiles, 4 rows, 6 pairs)
        total = pair_sums[:, 0].index_select(1, pair_table[:, 0])
        for row in range(1, 4):
            total = total + pair_sums[:, row].index_select(1, pair_table[:, row])
        best[start:start + _TILE_CHUNK] = total.argmax(1)
    return best


def mask_24_transposable(scores: Tensor) -> Tensor:
    """2-D mask keeping 2 per row and 2 per column in every 4x4 tile, maximising the kept score sum.

    Each tile picks among the 90 valid patterns (`TRANSPOSABLE_PATTERNS`) the one with the largest
    float32 sum (pair sums per row, then rows added in order); ties go to the lowest pattern index.
    """
    if scores.dim() != 2:
        raise ValueError(f"mask_24_transposable needs a 2-D (out, in) tensor, got shape {tuple(scores.shape)}; "
                         "reshape convolution weights to 2-D first")
    m, k = scores.shape
    _check_groups_of_four(m, "the row count")
    _check_groups_of_four(k, "the column count")
    tiles = _bounded_float32(scores).reshape(m // 4, 4, k // 4, 4).transpose(1, 2).reshape(-1, 4, 4)
    tile_masks = _tables_on(scores.device)[2][_best_patterns(tiles)]
    return tile_masks.view(m // 4, k // 4, 4, 4).transpose(1, 2).reshape(m, k)


def is_24(mask: Tensor, dim: int = -1) -> bool:
    """True when every group of 4 along `dim` keeps exactly 2."""
    moved = mask.movedim(dim, -1)
    if moved.shape[-1] % 4:
        return False
    return bool((moved.unflatten(-1, (-1, 4)).sum(-1) == 2).all())


def is_transposable_24(mask: Tensor) -> bool:
    """True for a 2-D mask with exactly 2 kept per row and per column of every 4x4 tile."""
    return mask.dim() == 2 and is_24(mask, -1) and is_24(mask, 0)


def mask_24_activations(x2d: Tensor, transposable: bool) -> Tensor:
    """2:4 mask of activations (tokens, features) by |x|: row-wise (2 of every 4 features of a token), or
    transposable over 4x4 tiles of (tokens, features), a ragged last tile padded with zero rows."""
    scores = x2d.abs()
    if not transposable:
        return mask_24(scores)
    rows = x2d.shape[0]
    return mask_24_transposable(F.pad(scores, (0, 0, 0, -rows % 4)))[:rows]
