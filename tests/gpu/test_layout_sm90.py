"""The sm90 compressed layout (sparsetrain/gpu/layout_sm90.py): compress_sm90 writes the bytes a plain python
re-derivation of docs/design.md's description gives, decompress_sm90 inverts it, and on an sm90 GPU compress_sm90
writes the bytes torch._cslt_compress writes."""
import numpy as np
import pytest
import torch

from sparsetrain.gpu.layout_sm90 import compress_sm90, decompress_sm90
from sparsetrain.sparse.masks import mask_24, mask_24_transposable
from tests.gpu_checks import cpu_randn, describe_mismatch, needs_cusparselt, require_sm90

HALF = [torch.bfloat16, torch.float16]


def random_24(m, k, dtype, seed=0, transposable=False):
    """A masked (m, k) matrix whose kept values are all nonzero, and its mask."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(m, k, generator=gen).to(dtype)
    w[w == 0] = 1
    mask = (mask_24_transposable if transposable else mask_24)(torch.rand(m, k, generator=gen))
    return w.masked_fill(~mask, 0), mask


# ---- the sm90 layout, re-derived in plain python from the description in docs/design.md ----

def sm90_nibble_index(r: int, g: int, k: int) -> int:
    inner_bits = [(r >> 3) & 1, (g >> 2) & 1, g & 1, (g >> 1) & 1, r & 1,
                  (r >> 1) & 1, (r >> 2) & 1, (r >> 4) & 1, (r >> 5) & 1, (g >> 3) & 1]
    inner = sum(bit << i for i, bit in enumerate(inner_bits))
    return ((r // 64) * (k // 64) + g // 16) * 1024 + inner


def python_compress_bytes(w_masked: torch.Tensor) -> bytes:
    m, k = w_masked.shape
    bits = w_masked.view(torch.int16).numpy().astype(np.uint16)
    values, metadata = [], bytearray(m * k // 8)
    for r in range(m):
        for g in range(k // 4):
            kept = [c for c in range(4) if bits[r, 4 * g + c] & 0x7FFF]
            assert len(kept) == 2, "the python reference wants exactly 2 nonzeros per group"
            values += [bits[r, 4 * g + c] for c in kept]
            index = sm90_nibble_index(r, g, k)
            metadata[index // 2] |= (kept[0] | kept[1] << 2) << (4 * (index % 2))
    return np.array(values, dtype=np.uint16).tobytes() + bytes(metadata)


class TestLayoutSm90:
    @pytest.mark.parametrize("m, k", [(64, 64), (64, 128), (128, 192), (192, 64)])
    @pytest.mark.parametrize("dtype", HALF)
    def test_matches_the_formula_bytewise(self, m, k, dtype):
        w_masked, _ = random_24(m, k, dtype, seed=m + k)
        compressed = compress_sm90(w_masked)
        assert compressed.shape == (m, k // 2 + k // 16) and compressed.dtype == dtype
        assert compressed.contiguous().view(torch.uint8).numpy().tobytes() == python_compress_bytes(w_masked)

    @pytest.mark.parametrize("pattern, nibble", [([1, 0, 1, 0], 0x8), ([0, 1, 0, 1], 0xD),
                                                 ([1, 1, 0, 0], 0x4), ([0, 0, 1, 1], 0xE)])
    def test_nibble_of_each_pattern(self, pattern, nibble):
        mask = torch.tensor(pattern, dtype=torch.bool).repeat(64, 16)
        compressed = compress_sm90(torch.ones(64, 64, dtype=torch.bfloat16) * mask)
        metadata = compressed.reshape(-1)[64 * 32:].view(torch.uint8)
        assert (metadata == (nibble | nibble << 4)).all()

    def test_values_come_first_row_major(self):
        w_masked, mask = random_24(128, 128, torch.bfloat16, seed=1)
        values = compress_sm90(w_masked).reshape(-1)[: 128 * 64]
        assert torch.equal(values, w_masked[mask])

    @pytest.mark.parametrize("dtype", HALF)
    @pytest.mark.parametrize("transposable", [False, True])
    def test_round_trip(self, dtype, transposable):
        w_masked, _ = random_24(192, 320, dtype, seed=2, transposable=transposable)
        assert torch.equal(decompress_sm90(compress_sm90(w_masked), 192, 320), w_masked)

    def test_round_trip_with_zeros_among_kept_values(self):
        w_masked, _ = random_24(64, 128, torch.bfloat16, seed=3)
        w_masked[::3] = 0
        w_masked[1, :64] = 0
        assert torch.equal(decompress_sm90(compress_sm90(w_masked), 64, 128), w_masked)
        zeros = torch.zeros(64, 64, dtype=torch.float16)
        assert torch.equal(decompress_sm90(compress_sm90(zeros), 64, 64), zeros)

    def test_groups_with_fewer_than_2_nonzeros_store_the_highest_zero_slots(self):
        """cuSPARSELt 0.8's rule on sm90 (the H100 probe, docs/design.md): the nonzeros, then
        the highest-index zero slots; -0 is a zero and a stored zero keeps its sign."""
        w = torch.zeros(64, 64, dtype=torch.bfloat16)
        w[0, :4] = torch.tensor([1.0, 0.0, -0.0, 0.0])  # n000 -> slots 0, 3
        w[0, 4:8] = torch.tensor([0.0, 0.0, -0.0, 2.0])  # 000n -> 2, 3
        w[0, 8:12] = torch.tensor([0.0, -0.0, -0.0, -0.0])  # 0000 -> 2, 3
        w[0, 12:16] = torch.tensor([0.0, 3.0, -0.0, 0.0])  # 0n00 -> 1, 3
        compressed = compress_sm90(w)
        values = compressed.reshape(-1)[:8].view(torch.int16).tolist()
        assert values == [16256, 0, -32768, 16384, -32768, -32768, 16448, 0]
        metadata = compressed.reshape(-1)[64 * 32:].view(torch.uint8)
        # Row 0's groups 0..3 sit at nibbles 0, 4, 8, 12: the low halves of bytes 0, 2, 4, 6.
        assert [int(metadata[b]) & 0xF for b in (0, 2, 4, 6)] == [0 | 3 << 2, 2 | 3 << 2, 2 | 3 << 2, 1 | 3 << 2]

    def test_rejects_what_the_layout_does_not_cover(self):
        with pytest.raises(ValueError, match="multiples of 64"):
            compress_sm90(torch.zeros(64, 96, dtype=torch.bfloat16))
        with pytest.raises(ValueError, match="fp16/bf16"):
            compress_sm90(torch.zeros(64, 64))
        with pytest.raises(ValueError, match="2-D"):
            compress_sm90(torch.zeros(2, 64, 64, dtype=torch.bfloat16))
        with pytest.raises(ValueError, match="the matrix that was compressed"):
            decompress_sm90(torch.zeros(64, 36, dtype=torch.bfloat16), 64, 128)


# ---- on the GPU: compress_sm90 writes the bytes torch._cslt_compress writes ----

@pytest.mark.gpu
@needs_cusparselt
@pytest.mark.parametrize("dtype", HALF, ids=["bf16", "fp16"])
@pytest.mark.parametrize("shape", [(64, 128), (192, 320), (768, 3072), (3072, 768), (1024, 4096), (4096, 1024)])
@pytest.mark.parametrize("transposable", [False, True], ids=["rowwise", "transposable"])
@pytest.mark.parametrize("kind", ["nonzero", "zeros"])
def test_compress_sm90_equals_cslt_compress(dtype, shape, transposable, kind):
    """'nonzero': 2 nonzeros per group. 'zeros': ~60% exact +0/-0, so many groups keep 0 or 1
    nonzeros and cuSPARSELt's zero-slot rule (highest-index zeros, sign kept) decides the bytes."""
    require_sm90()
    m, k = shape
    w = cpu_randn(m, k, seed=m * 7 + k, dtype=dtype)
    w[w == 0] = 1
    if kind == "zeros":
        drop = cpu_randn(m, k, seed=m * 3 + k) < 0.25
        w = torch.where(drop, torch.zeros((), dtype=dtype), w)
        w = torch.where(cpu_randn(m, k, seed=m * 5 + k) < 0, -w, w)  # half the zeros become -0
    mask = (mask_24_transposable if transposable else mask_24)(cpu_randn(m, k, seed=m + k).cuda().abs())
    w_masked = (w.cuda() * mask)
    reference, ours = torch._cslt_compress(w_masked), compress_sm90(w_masked)
    assert ours.shape == reference.shape, f"shape {tuple(ours.shape)} != _cslt_compress's {tuple(reference.shape)}"
    ours_bits, reference_bits = ours.reshape(-1).view(torch.int16), reference.reshape(-1).view(torch.int16)
    n_values = m * k // 2
    values_ok = torch.equal(ours_bits[:n_values], reference_bits[:n_values])
    metadata_ok = torch.equal(ours_bits[n_values:], reference_bits[n_values:])
    assert values_ok and metadata_ok, (
        f"values {'equal' if values_ok else describe_mismatch(ours_bits[:n_values], reference_bits[:n_values])}; "
        f"metadata {'equal' if metadata_ok else describe_mismatch(ours_bits[n_values:], reference_bits[n_values:])}")
