import itertools

import pytest
import torch

from sparsetrain.sparse import masks
from sparsetrain.sparse.masks import (TRANSPOSABLE_PATTERNS, is_24, is_transposable_24, mask_24,
                                      mask_24_transposable)
from tests.gpu_checks import cpu_randn, describe_mismatch

NAN, INF = float("nan"), float("inf")


def reference_mask_24(scores: torch.Tensor) -> torch.Tensor:
    """Per group of 4: the 2 largest, ties to the lower index, NaN least preferred (plain python)."""
    flat = scores.float().reshape(-1, 4).tolist()
    keep = []
    for group in flat:
        key = [float("-inf") if v != v else v for v in group]
        chosen = sorted(range(4), key=lambda i: (-key[i], i))[:2]
        keep.append([i in chosen for i in range(4)])
    return torch.tensor(keep).reshape(scores.shape)


def all_transposable_tiles() -> list[tuple[tuple[int, ...], ...]]:
    """Every 4x4 0/1 tile with 2 per row and column, as per-row kept columns, in lexicographic order."""
    tiles = []
    for rows in itertools.product(itertools.combinations(range(4), 2), repeat=4):
        if all(sum(col in row for row in rows) == 2 for col in range(4)):
            tiles.append(rows)
    return sorted(tiles)


def tile_mask(rows) -> torch.Tensor:
    mask = torch.zeros(4, 4, dtype=torch.bool)
    for r, cols in enumerate(rows):
        mask[r, list(cols)] = True
    return mask


def brute_force_transposable(scores: torch.Tensor) -> torch.Tensor:
    """Best tile pattern by exhaustive search, first in lexicographic order on exact ties."""
    tiles = [tile_mask(rows) for rows in all_transposable_tiles()]
    s = scores.double()
    out = torch.zeros_like(scores, dtype=torch.bool)
    for i in range(0, s.shape[0], 4):
        for j in range(0, s.shape[1], 4):
            block = s[i:i + 4, j:j + 4]
            sums = [float(block[t].sum()) for t in tiles]
            out[i:i + 4, j:j + 4] = tiles[sums.index(max(sums))]
    return out


class TestMask24:
    @pytest.mark.parametrize("shape", [(4,), (3, 8), (2, 5, 16), (7, 64)])
    def test_matches_reference_on_random_scores(self, shape):
        scores = torch.randn(shape, generator=torch.Generator().manual_seed(0))
        mask = mask_24(scores)
        assert mask.dtype == torch.bool and mask.shape == scores.shape
        assert torch.equal(mask, reference_mask_24(scores))

    def test_matches_reference_with_many_ties(self):
        scores = torch.randint(0, 3, (64, 32), generator=torch.Generator().manual_seed(1)).float()
        assert torch.equal(mask_24(scores), reference_mask_24(scores))

    @pytest.mark.parametrize("group, kept", [
        ([1.0, 1.0, 1.0, 1.0], [1, 1, 0, 0]),
        ([0.0, 0.0, 0.0, 0.0], [1, 1, 0, 0]),
        ([0.0, -0.0, 0.0, -0.0], [1, 1, 0, 0]),
        ([-0.0, 0.0, 1.0, -0.0], [1, 0, 1, 0]),
        ([1.0, 2.0, 2.0, 2.0], [0, 1, 1, 0]),
        ([2.0, 1.0, 2.0, 1.0], [1, 0, 1, 0]),
        ([-1.0, -2.0, -3.0, -4.0], [1, 1, 0, 0]),
        ([-4.0, -3.0, -2.0, -1.0], [0, 0, 1, 1]),
        ([NAN, 1.0, 2.0, 3.0], [0, 0, 1, 1]),
        ([NAN, NAN, NAN, NAN], [1, 1, 0, 0]),
        ([INF, -INF, 0.0, INF], [1, 0, 0, 1]),
        ([-INF, -INF, NAN, -INF], [1, 1, 0, 0]),
    ])
    def test_adversarial_groups(self, group, kept):
        assert mask_24(torch.tensor(group)).tolist() == [bool(v) for v in kept]

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
    def test_any_float_dtype_scores_as_float32(self, dtype):
        scores = torch.randn(16, 32, generator=torch.Generator().manual_seed(2)).to(dtype)
        assert torch.equal(mask_24(scores), mask_24(scores.float()))

    def test_deterministic(self):
        scores = torch.randint(0, 4, (128, 128), generator=torch.Generator().manual_seed(3)).float()
        assert torch.equal(mask_24(scores), mask_24(scores.clone()))
        assert torch.equal(mask_24_transposable(scores), mask_24_transposable(scores.clone()))

    def test_rejects_ragged_last_dim(self):
        with pytest.raises(ValueError, match="multiple of 4"):
            mask_24(torch.randn(3, 6))


class TestTransposablePatterns:
    def test_the_90_patterns_in_lexicographic_order(self):
        expected = torch.stack([tile_mask(rows) for rows in all_transposable_tiles()])
        assert len(expected) == 90
        assert torch.equal(TRANSPOSABLE_PATTERNS, expected)


class TestMask24Transposable:
    @pytest.mark.parametrize("shape", [(4, 4), (8, 12), (16, 32)])
    def test_optimal_on_random_scores(self, shape):
        scores = torch.rand(shape, generator=torch.Generator().manual_seed(4))
        mask = mask_24_transposable(scores)
        assert is_transposable_24(mask)
        # Random floats make exact ties practically impossible, so the best pattern is unique.
        assert torch.equal(mask, brute_force_transposable(scores))

    def test_ties_go_to_the_lowest_pattern(self):
        # Small integers: every sum is exact, and ties are everywhere.
        scores = torch.randint(0, 3, (16, 16), generator=torch.Generator().manual_seed(5)).float()
        assert torch.equal(mask_24_transposable(scores), brute_force_transposable(scores))

    @pytest.mark.parametrize("value", [0.0, -0.0, 1.0, -3.0, NAN, INF, -INF])
    def test_constant_tiles_take_the_first_pattern(self, value):
        mask = mask_24_transposable(torch.full((8, 8), value))
        assert torch.equal(mask, TRANSPOSABLE_PATTERNS[0].repeat(2, 2))

    def test_signed_zeros_tie(self):
        scores = torch.tensor([0.0, -0.0]).repeat(8, 4)
        assert torch.equal(mask_24_transposable(scores), TRANSPOSABLE_PATTERNS[0].repeat(2, 2))

    def test_negative_scores(self):
        scores = -torch.rand(8, 8, generator=torch.Generator().manual_seed(6))
        assert torch.equal(mask_24_transposable(scores), brute_force_transposable(scores))

    def test_nan_and_inf_still_give_a_transposable_mask(self):
        scores = torch.randn(16, 16, generator=torch.Generator().manual_seed(7))
        scores[0, 0], scores[1, 5], scores[6, 6], scores[9, :4] = NAN, INF, -INF, INF
        mask = mask_24_transposable(scores)
        assert is_transposable_24(mask)
        assert mask[1, 5] and not mask[0, 0]

    def test_huge_scores_do_not_overflow_the_sum(self):
        big = torch.finfo(torch.float32).max
        scores = torch.tensor([[big, big, 0.0, 0.0]] * 2 + [[0.0, 0.0, big, big]] * 2)
        scores[2, 0] = -big
        assert is_transposable_24(mask_24_transposable(scores))

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
    def test_half_scores_equal_float32_scores(self, dtype):
        scores = torch.randn(32, 64, generator=torch.Generator().manual_seed(8)).to(dtype)
        assert torch.equal(mask_24_transposable(scores), mask_24_transposable(scores.float()))

    def test_non_contiguous_scores(self):
        scores = torch.rand(32, 16, generator=torch.Generator().manual_seed(12))
        assert torch.equal(mask_24_transposable(scores.t()), mask_24_transposable(scores.t().contiguous()))
        assert torch.equal(mask_24(scores.t()), mask_24(scores.t().contiguous()))

    def test_chunking_does_not_change_the_result(self, monkeypatch):
        scores = torch.randint(0, 5, (32, 48), generator=torch.Generator().manual_seed(9)).float()
        whole = mask_24_transposable(scores)
        monkeypatch.setattr(masks, "_TILE_CHUNK", 5)
        assert torch.equal(mask_24_transposable(scores), whole)

    def test_vit_sized_weight(self):
        scores = torch.randn(1024, 4096, generator=torch.Generator().manual_seed(10)).to(torch.bfloat16).abs()
        assert is_transposable_24(mask_24_transposable(scores))

    def test_never_beats_the_row_wise_optimum(self):
        # The transposable mask is a row-wise 2:4 mask too, so it cannot beat the row-wise optimum.
        scores = torch.rand(64, 64, generator=torch.Generator().manual_seed(11))
        row_best = (scores * mask_24(scores)).sum()
        assert (scores * mask_24_transposable(scores)).sum() <= row_best

    @pytest.mark.parametrize("shape", [(8,), (2, 4, 4), (6, 8), (8, 6)])
    def test_rejects_bad_shapes(self, shape):
        with pytest.raises(ValueError):
            mask_24_transposable(torch.rand(shape))


class TestChecks:
    def test_is_24(self):
        assert is_24(torch.tensor([True, False, True, False, False, False, True, True]))
        assert not is_24(torch.tensor([True, True, True, False]))
        assert not is_24(torch.tensor([True, False]))
        column_mask = torch.tensor([[1, 0], [1, 1], [0, 0], [0, 1]], dtype=torch.bool)
        assert is_24(column_mask, dim=0) and not is_24(column_mask)

    def test_is_transposable_24(self):
        assert is_transposable_24(TRANSPOSABLE_PATTERNS[17].repeat(2, 3))
        row_only = torch.tensor([[1, 1, 0, 0]] * 4, dtype=torch.bool)
        assert is_24(row_only) and not is_transposable_24(row_only)
        assert not is_transposable_24(TRANSPOSABLE_PATTERNS[0].flatten())


# ---- masks: the GPU decides exactly as the CPU ----

@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(4096, 1024), (1024, 4096), (768, 3072), (64, 64)])
@pytest.mark.parametrize("ties", [False, True], ids=["random", "ties"])
def test_masks_equal_on_cpu_and_gpu(shape, ties):
    scores = cpu_randn(*shape, seed=shape[0] + shape[1], dtype=torch.bfloat16)
    if ties:  # few distinct values, signed zeros included
        scores = (scores * 2).round() * 0.5
        scores[::7] = -0.0
    for name, make_mask in (("mask_24", mask_24), ("mask_24_transposable", mask_24_transposable)):
        for score in (scores.abs(), scores):
            on_cpu, on_gpu = make_mask(score), make_mask(score.cuda()).cpu()
            assert torch.equal(on_cpu, on_gpu), f"{name} {shape}: {describe_mismatch(on_gpu, on_cpu)}"


@pytest.mark.gpu
def test_transposable_mask_of_a_big_weight_stays_small():
    scores = cpu_randn(4096, 4096, seed=1, dtype=torch.bfloat16).cuda().abs()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    mask_24_transposable(scores)
    torch.cuda.synchronize()
    extra_mib = (torch.cuda.max_memory_allocated() - before) / 2**20
    assert extra_mib < 512, f"mask_24_transposable of 4096x4096 used {extra_mib:.0f} MiB of GPU memory"
