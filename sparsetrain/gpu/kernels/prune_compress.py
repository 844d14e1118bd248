"""One Triton pass that prunes a weight to transposable 2:4 and writes it compressed both ways.

For an (m, k) fp16/bf16 matrix W, one program reads one 64 x 64 block (256 tiles of 4 x 4) and
writes, in cuSPARSELt 0.8's sm90 layout (see `sparsetrain.gpu.layout_sm90`):
  - W*mask compressed, as `torch._cslt_compress(W * mask)` returns it;
  - (W*mask)^T compressed, as `torch._cslt_compress((W * mask).t().contiguous())` returns it;
  - optionally the bool mask, and W*mask itself (activations keep it for the weight gradient).
The layout is built from 64 x 64 blocks whose metadata is one contiguous 512-byte chunk, so a
program owns its block's outputs entirely: no atomics, no second pass.

Where the mask comes from (MODE):
  PRUNE  - the transposable pattern chosen exactly as `masks.mask_24_transposable(W.abs())`:
           same 90 patterns in the same order, same float32 sums in the same order, first max.
  MASK   - a given bool mask (2:4 per row, and per column when the transpose is written).
  VALUES - W is already pruned: kept = nonzero, as `_cslt_compress` sees it.
  ROWS   - the 2 largest |W| of every group of 4 along a row, exactly as `masks.mask_24(W.abs())`
           (ties to the lower index); row-wise only, so no transpose. Activation 2:4 uses it.
A group whose kept values are not all nonzero is stored as cuSPARSELt stores W*mask: its nonzeros
plus the highest-index zeros (measured on sm90; the sign of a zero is the product's sign, as in
`W * mask`).
"""
import torch
import triton
import triton.language as tl

MODE_PRUNE, MODE_MASK, MODE_VALUES, MODE_ROWS = 0, 1, 2, 3
BLOCK = 64  # rows and columns per program: one metadata chunk of the sm90 layout
NUM_WARPS = 2  # 64 threads for 256 tiles: the fastest of 2/4/8 in `scripts/bench.py --only b`
COALESCE = True  # stores in natural tile order (v2); False is v1's order, kept to compare
# mask_24_transposable clamps scores to float32 max / 8 so that a sum of 8 never overflows; so do
# we. The kernel spells it as a literal (a compile-time float); tests check the two agree.
SCORE_BOUND = 4.2535293329816107e37


# ----------------------------------------------------------------------------------------------
# Index helpers. Tiles of a block are numbered by (u, v) in 0..15, not by tile row/column (ti, tj):
# u's bits are (ti bit 3, ti bit 1, ti bit 2, ti bit 0), likewise v for tj. In that order, the 8
# nibbles of one 32-bit metadata word sit in sub-blocks that a reshape plus a sum can gather, for
# the matrix (reduce over u bit 2 and v bits 1, 0) and for its transpose (u bits 1, 0 and v bit 2).
# ----------------------------------------------------------------------------------------------
@triton.jit
def _tile_of(u):
    return (u & 8) | ((u >> 1) & 2) | ((u << 1) & 4) | (u & 1)


@triton.jit
def _bit(x, b: tl.constexpr):
    return (x >> b) & 1


@triton.jit
def _nibble_inner(r, g):
    """Position of the nibble of (row r, group g) inside its block's 1024-nibble chunk (sm90)."""
    return (_bit(r, 3) | (_bit(g, 2) << 1) | (_bit(g, 0) << 2) | (_bit(g, 1) << 3) | (_bit(r, 0) << 4)
            | (_bit(r, 1) << 5) | (_bit(r, 2) << 6) | (_bit(r, 4) << 7) | (_bit(r, 5) << 8) | (_bit(g, 3) << 9))


@triton.jit
def _store_meta_rows(meta_ptr, chunk_base, nib, r, g, T: tl.constexpr):
    """Pack (T, T) nibbles of the matrix into 32-bit words and store them (8 nibbles a word)."""
    inner = _nibble_inner(r, g)
    part = nib.to(tl.uint32) << ((inner & 7) * 4).to(tl.uint32)
    word = tl.reshape(part, (2, 2, 4, 4, 4))
    word = tl.sum(tl.sum(word, axis=4), axis=1)
    idx = tl.reshape(inner >> 3, (2, 2, 4, 4, 4))
    idx = tl.max(tl.max(idx, axis=4), axis=1)
    tl.store(meta_ptr + chunk_base + idx, word.to(tl.int32, bitcast=True))


@triton.jit
def _store_meta_cols(meta_ptr, chunk_base, nib, r, g, T: tl.constexpr):
    """Same for the transpose's nibbles, whose words gather over u bits 1, 0 and v bit 2."""
    inner = _nibble_inner(r, g)
    part = nib.to(tl.uint32) << ((inner & 7) * 4).to(tl.uint32)
    word = tl.reshape(part, (4, 4, 2, 2, 4))
    word = tl.sum(tl.sum(word, axis=3), axis=1)
    idx = tl.reshape(inner >> 3, (4, 4, 2, 2, 4))
    idx = tl.max(tl.max(idx, axis=3), axis=1)
    tl.store(meta_ptr + chunk_base + idx, word.to(tl.int32, bitcast=True))


# ----------------------------------------------------------------------------------------------
# Per-tile math.
# ----------------------------------------------------------------------------------------------
@triton.jit
def _load_quad(ptr, rows, cols, row_stride, T: tl.constexpr):
    """Four (T, T) tensors: elements (row, col + 0..3) of every tile, one 8-byte load each."""
    offs = rows.to(tl.int64)[:, :, None] * row_stride + cols[:, :, None] + tl.arange(0, 4)[None, None, :]
    # Tell the compiler what the bit-shuffled tile numbering hides: 4 contiguous, aligned elements.
    offs = tl.max_contiguous(tl.multiple_of(offs, (1, 1, 4)), (1, 1, 4))
    x = tl.reshape(tl.load(ptr + offs), (T, T, 2, 2))
    even, odd = tl.split(x)
    x0, x2 = tl.split(even)
    x1, x3 = tl.split(odd)
    return x0, x1, x2, x3


@triton.jit
def _score(x):
    """|x| in float32, NaN and overflow handled as mask_24_transposable handles them."""
    s = tl.abs(x.to(tl.float32))
    # NaN test first: minimum() may return the bound for a NaN (fminf semantics).
    return tl.where(s != s, -4.2535293329816107e37, tl.minimum(s, 4.2535293329816107e37))  # SCORE_BOUND


@triton.jit
def _row_score(x):
    """|x| in float32 with NaN as -inf, as mask_24 scores it (only compared, so no bound is needed)."""
    s = tl.abs(x.to(tl.float32))
    return tl.where(s != s, float("-inf"), s)


@triton.jit
def _top2_of_4(x0, x1, x2, x3):
    """Keep-bits of the 2 largest |x| of each group, ties to the lower index: mask_24's count of the
    entries that beat each one (an earlier entry wins a tie) must be below 2."""
    s0, s1, s2, s3 = _row_score(x0), _row_score(x1), _row_score(x2), _row_score(x3)
    k0 = (s1 > s0).to(tl.int32) + (s2 > s0).to(tl.int32) + (s3 > s0).to(tl.int32) < 2
    k1 = (s0 >= s1).to(tl.int32) + (s2 > s1).to(tl.int32) + (s3 > s1).to(tl.int32) < 2
    k2 = (s0 >= s2).to(tl.int32) + (s1 >= s2).to(tl.int32) + (s3 > s2).to(tl.int32) < 2
    k3 = (s0 >= s3).to(tl.int32) + (s1 >= s3).to(tl.int32) + (s2 >= s3).to(tl.int32) < 2
    return k0.to(tl.int32), k1.to(tl.int32), k2.to(tl.int32), k3.to(tl.int32)


@triton.jit
def _store_kept_quad(ptr, rows, cols, row_stride, T: tl.constexpr, x0, x1, x2, x3, k0, k1, k2, k3):
    """Store x * keep for elements (row, col + 0..3) of every tile: `_load_quad`'s inverse."""
    offs = rows.to(tl.int64)[:, :, None] * row_stride + cols[:, :, None] + tl.arange(0, 4)[None, None, :]
    offs = tl.max_contiguous(tl.multiple_of(offs, (1, 1, 4)), (1, 1, 4))
    zero = tl.zeros(x0.shape, x0.dtype)  # +0, as masked_fill writes
    x = tl.join(tl.join(tl.where(k0 != 0, x0, zero), tl.where(k2 != 0, x2, zero)),
                tl.join(tl.where(k1 != 0, x1, zero), tl.where(k3 != 0, x3, zero)))  # (T, T, 2, 2)
    tl.store(ptr + offs, tl.reshape(x, (T, T, 4)))


@triton.jit
def _pair_sum(s0, s1, s2, s3, P: tl.constexpr):
    """Sum of the pair number P of (0,1),(0,2),(0,3),(1,2),(1,3),(2,3), lower column first."""
    if P == 0:
        r = s0 + s1
    elif P == 1:
        r = s0 + s2
    elif P == 2:
        r = s0 + s3
    elif P == 3:
        r = s1 + s2
    elif P == 4:
        r = s1 + s3
    else:
        r = s2 + s3
    return r


@triton.jit
def _best_pattern(s00, s01, s02, s03, s10, s11, s12, s13, s20, s21, s22, s23, s30, s31, s32, s33):
    """Keep-bits (bit 4a+c = row a, column c) of the best transposable pattern of every tile.

    Walks the 90 patterns in mask_24_transposable's order (lexicographic in the 4 pair indices,
    only those with 2 per column) with a strict '>' so that the first maximum wins, and adds
    exactly as it does: pair sums per row, then ((row0 + row1) + row2) + row3.
    """
    best = tl.full(s00.shape, float("-inf"), tl.float32)
    best_bits = tl.zeros(s00.shape, tl.int32)
    for p0 in tl.static_range(6):
        r0 = _pair_sum(s00, s01, s02, s03, p0)
        for p1 in tl.static_range(6):
            t1 = r0 + _pair_sum(s10, s11, s12, s13, p1)
            for p2 in tl.static_range(6):
                t2 = t1 + _pair_sum(s20, s21, s22, s23, p2)
                for p3 in tl.static_range(6):
                    # Column bits of each row's pair (bit c = column c), all compile-time.
                    b0 = (1 << ((p0 >= 3) + (p0 >= 5))) | (1 << (p0 + 1 - 2 * (p0 >= 3) - (p0 >= 5)))
                    b1 = (1 << ((p1 >= 3) + (p1 >= 5))) | (1 << (p1 + 1 - 2 * (p1 >= 3) - (p1 >= 5)))
                    b2 = (1 << ((p2 >= 3) + (p2 >= 5))) | (1 << (p2 + 1 - 2 * (p2 >= 3) - (p2 >= 5)))
                    b3 = (1 << ((p3 >= 3) + (p3 >= 5))) | (1 << (p3 + 1 - 2 * (p3 >= 3) - (p3 >= 5)))
                    # Rows keep 2 each, so 2 per column <=> every column is hit, i.e. the OR is 0xF
                    # and no column is hit 3+ times, i.e. the sum of all bits is 8 with all 4 set
                    # twice: equivalent to (b0 ^ b1 ^ b2 ^ b3) == 0 together with the OR being 0xF.
                    if ((b0 ^ b1 ^ b2 ^ b3) == 0) & ((b0 | b1 | b2 | b3) == 15):
                        total = t2 + _pair_sum(s30, s31, s32, s33, p3)
                        better = total > best
                        best = tl.where(better, total, best)
                        best_bits = tl.where(better, b0 | (b1 << 4) | (b2 << 8) | (b3 << 12), best_bits)
    return best_bits


@triton.jit
def _positions(k0, k1, k2, k3, z0, z1, z2, z3):
    """Stored slots (i, j) of a group, as cuSPARSELt 0.8 on sm90 picks them from W*mask.

    k: kept (0/1), z: value is a zero of either sign (0/1). Measured on the H100 (docs/design.md):
    the nonzeros first, then the highest-index zero slots, e.g. (n,0,0,0) -> (0,3),
    (0,0,0,n) -> (2,3), all zeros -> (2,3). With two kept nonzeros it is just the kept slots.
    """
    n0 = k0 & (1 - z0)
    n1 = k1 & (1 - z1)
    n2 = k2 & (1 - z2)
    n3 = k3 & (1 - z3)
    total = n0 + n1 + n2 + n3
    # A zero slot is stored if the nonzeros plus the zero slots above it leave room (< 2).
    c3 = (n3 == 1) | (total < 2)
    c2 = (n2 == 1) | (total + (1 - n3) < 2)
    c1 = (n1 == 1) | (total + (1 - n3) + (1 - n2) < 2)
    c0 = (n0 == 1) | (total + (1 - n3) + (1 - n2) + (1 - n1) < 2)
    i = tl.where(c0, 0, tl.where(c1, 1, 2))
    j = tl.where(c3, 3, tl.where(c2, 2, 1))
    return i, j


@triton.jit
def _pick(x0, x1, x2, x3, i):
    return tl.where(i == 0, x0, tl.where(i == 1, x1, tl.where(i == 2, x2, x3)))


@triton.jit
def _kept_bits(x, k):
    """16-bit pattern of x * mask: a pruned entry is a zero with x's sign, as `w * mask` gives it.

    Done on the bits, because float code may drop the sign of a zero (and an interpreter does).
    Inf/NaN weights are outside the contract (their product with 0 is NaN).
    """
    xb = x.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    return tl.where(k == 1, xb, xb & 0x8000)


@triton.jit
def _group_out(x0, x1, x2, x3, k0, k1, k2, k3):
    """Values word and nibble of one group of 4 (a row of a tile, or a column of it)."""
    y0 = _kept_bits(x0, k0)
    y1 = _kept_bits(x1, k1)
    y2 = _kept_bits(x2, k2)
    y3 = _kept_bits(x3, k3)
    # A zero of either sign is a zero to cuSPARSELt's compressor.
    i, j = _positions(k0, k1, k2, k3, ((y0 & 0x7FFF) == 0).to(tl.int32), ((y1 & 0x7FFF) == 0).to(tl.int32),
                      ((y2 & 0x7FFF) == 0).to(tl.int32), ((y3 & 0x7FFF) == 0).to(tl.int32))
    # Two 16-bit values a 32-bit word, the first in the low half (little-endian order).
    word = _pick(y0, y1, y2, y3, i) | (_pick(y0, y1, y2, y3, j) << 16)
    return word, i | (j << 2)


@triton.jit
def _keep_bits_of(bits, a: tl.constexpr):
    return _bit(bits, 4 * a), _bit(bits, 4 * a + 1), _bit(bits, 4 * a + 2), _bit(bits, 4 * a + 3)


@triton.jit
def _natural(x):
    """(16, 16) tensor from (u, v) order to natural (tile row, tile column) order.

    Stores then see consecutive addresses along the last axis, so the compiler can coalesce
    them; in (u, v) order it cannot prove that and writes each word on its own.
    """
    x = tl.reshape(tl.permute(tl.reshape(x, (2, 2, 2, 2, 16)), (0, 2, 1, 3, 4)), (16, 16))
    return tl.reshape(tl.permute(tl.reshape(x, (16, 2, 2, 2, 2)), (0, 1, 3, 2, 4)), (16, 16))


@triton.jit
def _row_ptrs(ptr, grow, ggroup, bi, bj, a: tl.constexpr, K, COALESCE: tl.constexpr):
    """Where row a of every tile goes, one 32-bit word per (tile row, tile column), row-major (m, k/4):
    in natural tile order when COALESCE (pair with `_in_row_order`), else in (u, v) order."""
    if COALESCE:
        n = tl.arange(0, 16)
        rows = bi * 64 + 4 * n[:, None] + a
        return ptr + rows.to(tl.int64) * (K // 4) + bj * 16 + n[None, :]
    else:
        return ptr + grow.to(tl.int64) * (K // 4) + ggroup


@triton.jit
def _in_row_order(word, COALESCE: tl.constexpr):
    if COALESCE:
        return _natural(word)
    else:
        return word


@triton.jit
def _store_rows(ptr, word, grow, ggroup, bi, bj, a: tl.constexpr, K, COALESCE: tl.constexpr):
    """Store one 32-bit word per (tile row, tile column) of row a of every tile, row-major (m, k/4)."""
    tl.store(_row_ptrs(ptr, grow, ggroup, bi, bj, a, K, COALESCE), _in_row_order(word, COALESCE))


@triton.jit
def _store_cols(ptr, word, gcol, ggroup, bi, bj, b: tl.constexpr, M, COALESCE: tl.constexpr):
    """Store one word per tile for column b of every tile, into the transpose's (k, m/4) rows."""
    if COALESCE:
        n = tl.arange(0, 16)
        cols = bj * 64 + 4 * n[:, None] + b
        tl.store(ptr + cols.to(tl.int64) * (M // 4) + bi * 16 + n[None, :], tl.trans(_natural(word)))
    else:
        tl.store(ptr + gcol.to(tl.int64) * (M // 4) + ggroup, word)


@triton.jit
def _row_out(vals_ptr, meta_ptr, chunk_base, x0, x1, x2, x3, k0, k1, k2, k3,
             grow, ggroup, lrow, lgroup, bi, bj, a: tl.constexpr, K, T: tl.constexpr, COALESCE: tl.constexpr):
    """Write row-group outputs of the matrix for one row a of every tile."""
    word, nib = _group_out(x0, x1, x2, x3, k0, k1, k2, k3)
    _store_rows(vals_ptr, word, grow, ggroup, bi, bj, a, K, COALESCE)
    _store_meta_rows(meta_ptr, chunk_base, nib, lrow, lgroup, T)


@triton.jit
def _col_out(vals_ptr, meta_ptr, chunk_base, x0, x1, x2, x3, k0, k1, k2, k3,
             gcol, ggroup, lcol, lgroup, bi, bj, b: tl.constexpr, M, T: tl.constexpr, COALESCE: tl.constexpr):
    """Write the transpose's outputs for one column b of every tile (row b of the transposed tile)."""
    word, nib = _group_out(x0, x1, x2, x3, k0, k1, k2, k3)
    _store_cols(vals_ptr, word, gcol, ggroup, bi, bj, b, M, COALESCE)
    _store_meta_cols(meta_ptr, chunk_base, nib, lcol, lgroup, T)


@triton.jit
def _store_mask_row(mask_ptr, grow, ggroup, bi, bj, a: tl.constexpr, K, k0, k1, k2, k3, COALESCE: tl.constexpr,
                    COUNT_FLIPS: tl.constexpr):
    """Store row a of every tile's bool mask (4 bytes a word); return how many entries changed from what
    the mask held there before when COUNT_FLIPS (this program owns these bytes: no race), else 0."""
    ptrs = _row_ptrs(mask_ptr, grow, ggroup, bi, bj, a, K, COALESCE)
    word = _in_row_order(k0 | (k1 << 8) | (k2 << 16) | (k3 << 24), COALESCE)
    flips = 0
    if COUNT_FLIPS:
        changed = (tl.load(ptrs) ^ word) & 0x01010101  # a bool byte is 0 or 1
        flips = tl.sum((changed & 0xFF) + ((changed >> 8) & 0xFF) + ((changed >> 16) & 0xFF) + (changed >> 24))
    tl.store(ptrs, word)
    return flips


@triton.jit
def _load_keep(mask_ptr, rows, cols, K, T: tl.constexpr):
    m0, m1, m2, m3 = _load_quad(mask_ptr, rows, cols, K, T)
    return (m0 != 0).to(tl.int32), (m1 != 0).to(tl.int32), (m2 != 0).to(tl.int32), (m3 != 0).to(tl.int32)


@triton.jit
def _prune_compress_kernel(w_ptr, mask_in_ptr, out_ptr, out_t_ptr, mask_out_ptr, flips_ptr, values_ptr, M, K,
                           MODE: tl.constexpr, WRITE_T: tl.constexpr, WRITE_MASK: tl.constexpr,
                           COUNT_FLIPS: tl.constexpr, WRITE_VALUES: tl.constexpr, COALESCE: tl.constexpr):
    T: tl.constexpr = 16  # tiles per block side
    bi = tl.program_id(0)
    bj = tl.program_id(1)
    ti = _tile_of(tl.arange(0, T))[:, None]  # (T, 1): tile row of u
    tj = _tile_of(tl.arange(0, T))[None, :]  # (1, T): tile column of v
    row0 = bi * 64 + 4 * ti
    col0 = bj * 64 + 4 * tj

    x00, x01, x02, x03 = _load_quad(w_ptr, row0 + 0, col0, K, T)
    x10, x11, x12, x13 = _load_quad(w_ptr, row0 + 1, col0, K, T)
    x20, x21, x22, x23 = _load_quad(w_ptr, row0 + 2, col0, K, T)
    x30, x31, x32, x33 = _load_quad(w_ptr, row0 + 3, col0, K, T)

    if MODE == 0:
        bits = _best_pattern(_score(x00), _score(x01), _score(x02), _score(x03),
                             _score(x10), _score(x11), _score(x12), _score(x13),
                             _score(x20), _score(x21), _score(x22), _score(x23),
                             _score(x30), _score(x31), _score(x32), _score(x33))
        k00, k01, k02, k03 = _keep_bits_of(bits, 0)
        k10, k11, k12, k13 = _keep_bits_of(bits, 1)
        k20, k21, k22, k23 = _keep_bits_of(bits, 2)
        k30, k31, k32, k33 = _keep_bits_of(bits, 3)
    elif MODE == 3:
        k00, k01, k02, k03 = _top2_of_4(x00, x01, x02, x03)
        k10, k11, k12, k13 = _top2_of_4(x10, x11, x12, x13)
        k20, k21, k22, k23 = _top2_of_4(x20, x21, x22, x23)
        k30, k31, k32, k33 = _top2_of_4(x30, x31, x32, x33)
    elif MODE == 1:
        k00, k01, k02, k03 = _load_keep(mask_in_ptr, row0 + 0, col0, K, T)
        k10, k11, k12, k13 = _load_keep(mask_in_ptr, row0 + 1, col0, K, T)
        k20, k21, k22, k23 = _load_keep(mask_in_ptr, row0 + 2, col0, K, T)
        k30, k31, k32, k33 = _load_keep(mask_in_ptr, row0 + 3, col0, K, T)
    else:
        one = tl.full(ti.shape, 1, tl.int32) + tl.zeros(tj.shape, tl.int32)
        k00, k01, k02, k03 = one, one, one, one
        k10, k11, k12, k13 = one, one, one, one
        k20, k21, k22, k23 = one, one, one, one
        k30, k31, k32, k33 = one, one, one, one

    if WRITE_VALUES:
        _store_kept_quad(values_ptr, row0 + 0, col0, K, T, x00, x01, x02, x03, k00, k01, k02, k03)
        _store_kept_quad(values_ptr, row0 + 1, col0, K, T, x10, x11, x12, x13, k10, k11, k12, k13)
        _store_kept_quad(values_ptr, row0 + 2, col0, K, T, x20, x21, x22, x23, k20, k21, k22, k23)
        _store_kept_quad(values_ptr, row0 + 3, col0, K, T, x30, x31, x32, x33, k30, k31, k32, k33)

    # The matrix: row a of each tile is a group; values are word-addressed (2 values a word).
    vals_ptr = out_ptr
    meta_ptr = out_ptr + M * (K // 4)  # metadata words start after m*k/2 values
    chunk = (bi * (K // 64) + bj) * 128
    grp = bj * 16 + tj
    _row_out(vals_ptr, meta_ptr, chunk, x00, x01, x02, x03, k00, k01, k02, k03, row0 + 0, grp, 4 * ti + 0, tj, bi, bj, 0, K, T, COALESCE)
    _row_out(vals_ptr, meta_ptr, chunk, x10, x11, x12, x13, k10, k11, k12, k13, row0 + 1, grp, 4 * ti + 1, tj, bi, bj, 1, K, T, COALESCE)
    _row_out(vals_ptr, meta_ptr, chunk, x20, x21, x22, x23, k20, k21, k22, k23, row0 + 2, grp, 4 * ti + 2, tj, bi, bj, 2, K, T, COALESCE)
    _row_out(vals_ptr, meta_ptr, chunk, x30, x31, x32, x33, k30, k31, k32, k33, row0 + 3, grp, 4 * ti + 3, tj, bi, bj, 3, K, T, COALESCE)

    if WRITE_T:
        # The transpose (k, m): column b of each tile is a group; its block is (bj, bi).
        vals_t_ptr = out_t_ptr
        meta_t_ptr = out_t_ptr + K * (M // 4)
        chunk_t = (bj * (M // 64) + bi) * 128
        grp_t = bi * 16 + ti
        _col_out(vals_t_ptr, meta_t_ptr, chunk_t, x00, x10, x20, x30, k00, k10, k20, k30, col0 + 0, grp_t, 4 * tj + 0, ti, bi, bj, 0, M, T, COALESCE)
        _col_out(vals_t_ptr, meta_t_ptr, chunk_t, x01, x11, x21, x31, k01, k11, k21, k31, col0 + 1, grp_t, 4 * tj + 1, ti, bi, bj, 1, M, T, COALESCE)
        _col_out(vals_t_ptr, meta_t_ptr, chunk_t, x02, x12, x22, x32, k02, k12, k22, k32, col0 + 2, grp_t, 4 * tj + 2, ti, bi, bj, 2, M, T, COALESCE)
        _col_out(vals_t_ptr, meta_t_ptr, chunk_t, x03, x13, x23, x33, k03, k13, k23, k33, col0 + 3, grp_t, 4 * tj + 3, ti, bi, bj, 3, M, T, COALESCE)

    if WRITE_MASK:
        flips = _store_mask_row(mask_out_ptr, row0 + 0, grp, bi, bj, 0, K, k00, k01, k02, k03, COALESCE, COUNT_FLIPS)
        flips += _store_mask_row(mask_out_ptr, row0 + 1, grp, bi, bj, 1, K, k10, k11, k12, k13, COALESCE, COUNT_FLIPS)
        flips += _store_mask_row(mask_out_ptr, row0 + 2, grp, bi, bj, 2, K, k20, k21, k22, k23, COALESCE, COUNT_FLIPS)
        flips += _store_mask_row(mask_out_ptr, row0 + 3, grp, bi, bj, 3, K, k30, k31, k32, k33, COALESCE, COUNT_FLIPS)
        if COUNT_FLIPS:
            tl.atomic_add(flips_ptr, flips.to(tl.int64))


# ----------------------------------------------------------------------------------------------
# Host side.
# ----------------------------------------------------------------------------------------------
def _check(w: torch.Tensor) -> None:
    if w.dim() != 2:
        raise ValueError(f"prune_compress needs a 2-D (out, in) weight, got shape {tuple(w.shape)}")
    m, k = w.shape
    if m % BLOCK or k % BLOCK:
        raise ValueError(f"the sm90 layout needs both dims to be multiples of {BLOCK}, got {m}x{k}; "
                         "leave this layer dense or use the torch-op route")
    if w.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"prune_compress handles fp16/bf16 only, got {w.dtype}; cast the weight first")


def _compressed_empty(m: int, k: int, like: torch.Tensor) -> torch.Tensor:
    # Same shape as torch._cslt_compress returns on sm90: (m, k/2 + k/16) elements.
    return torch.empty(m, k // 2 + k // 16, dtype=like.dtype, device=like.device)


def _launch(w, mask, mode, transposed, want_mask, mask_out=None, flips=None, want_values=False):
    _check(w)
    w = w.contiguous()
    m, k = w.shape
    out = _compressed_empty(m, k, w)
    out_t = _compressed_empty(k, m, w) if transposed else out
    if mask_out is None and want_mask:
        mask_out = torch.empty(m, k, dtype=torch.bool, device=w.device)
    mask_in = w
    if mode == MODE_MASK:
        if mask is None or mask.shape != w.shape:
            raise ValueError(f"the mask must have the weight's shape {tuple(w.shape)}")
        mask_in = mask.contiguous().view(torch.uint8)
    values = torch.empty_like(w) if want_values else None
    grid = (m // BLOCK, k // BLOCK)
    _prune_compress_kernel[grid](
        w, mask_in, out.view(torch.int32), out_t.view(torch.int32),
        out.view(torch.int32) if mask_out is None else mask_out.view(torch.int32),
        out if flips is None else flips, w if values is None else values, m, k,
        MODE=mode, WRITE_T=transposed, WRITE_MASK=mask_out is not None, COUNT_FLIPS=flips is not None,
        WRITE_VALUES=want_values, COALESCE=COALESCE, num_warps=NUM_WARPS)
    if want_values:
        return out, (out_t if transposed else None), mask_out, values
    return out, (out_t if transposed else None), mask_out


def prune_compress_transposable(w: torch.Tensor, want_mask: bool = True):
    """Transposable 2:4 mask by |w| (== masks.mask_24_transposable(w.abs())), compressed both ways.

    Returns (c, c_t, mask): c == torch._cslt_compress(w * mask) and
    c_t == torch._cslt_compress((w * mask).t().contiguous()) bit for bit on sm90; mask is None
    unless asked for.
    """
    return _launch(w, None, MODE_PRUNE, True, want_mask)


def prune_compress_into(w: torch.Tensor, mask: torch.Tensor, flips: torch.Tensor):
    """prune_compress_transposable that writes the new mask over `mask` in place and adds the number of
    entries that changed to `flips`, in the same launch: a training step's mask refresh without the
    torch ops (xor, count, add, copy) that cost four more launches and ~5 passes over the mask.

    mask: contiguous bool, w's shape, holding the previous mask. flips: int64 scalar on w's device.
    Returns (c, c_t) as prune_compress_transposable does.
    """
    if mask.dtype != torch.bool or mask.shape != w.shape or not mask.is_contiguous():
        raise ValueError(f"mask must be a contiguous bool tensor of the weight's shape {tuple(w.shape)}")
    if flips.dtype != torch.int64 or flips.numel() != 1 or flips.device != w.device:
        raise ValueError("flips must be a one-element int64 tensor on the weight's device")
    c, c_t, _ = _launch(w, None, MODE_PRUNE, True, True, mask_out=mask, flips=flips)
    return c, c_t


def prune_activations(x: torch.Tensor, transposable: bool):
    """2:4-prune activations x (tokens, features) by |x| and compress them, in one pass.

    Row-wise (2 of every 4 features of a token) as masks.mask_24(x.abs()), or transposable (also 2 of
    every 4 tokens of a feature, in 4x4 tiles) as masks.mask_24_transposable(x.abs()). Returns
    (c, c_t, mask, x_sparse): x*mask compressed, its transpose compressed (transposable only, else
    None), the mask, and x*mask (pruned entries +0). Pad the tokens to a multiple of 64 with zeros.
    """
    return _launch(x, None, MODE_PRUNE if transposable else MODE_ROWS, transposable, True, want_values=True)


def compress_masked(w: torch.Tensor, mask: torch.Tensor, transposed: bool = True):
    """Compress w * mask (and its transpose) for a given 2:4 mask; the transpose needs it transposable.

    Returns (c, c_t or None). Same bits as torch._cslt_compress of w * mask (and of its transpose).
    """
    c, c_t, _ = _launch(w, mask, MODE_MASK, transposed, False)
    return c, c_t


def compress_pruned(w_masked: torch.Tensor, transposed: bool = True):
    """Drop-in for torch._cslt_compress(w_masked) (and of w_masked.t().contiguous()) in one pass.

    w_masked already holds at most 2 nonzeros per group of 4 (and per column group when transposed).
    """
    c, c_t, _ = _launch(w_masked, None, MODE_VALUES, transposed, False)
    return c, c_t
