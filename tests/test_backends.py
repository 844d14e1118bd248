import warnings

import numpy as np
import pytest
import torch

from sparsetrain.sparse import backends
from sparsetrain.sparse.backends import CuSparseLtBackend, EmulatedBackend, resolve_backend
from sparsetrain.sparse.functions import activation_sparse_linear, weight_sparse_linear
from sparsetrain.sparse.layout_sm90 import compress_sm90, decompress_sm90
from sparsetrain.sparse.masks import mask_24, mask_24_transposable

HALF = [torch.bfloat16, torch.float16]


def random_24(m, k, dtype, seed=0, transposable=False):
    """A masked (m, k) matrix whose kept values are all nonzero, and its mask."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(m, k, generator=gen).to(dtype)
    w[w == 0] = 1
    mask = (mask_24_transposable if transposable else mask_24)(torch.rand(m, k, generator=gen))
    return w.masked_fill(~mask, 0), mask


# ---- the sm90 layout, re-derived in plain python from the description in gpu-facts.md ----

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

    def test_group_with_one_nonzero_keeps_it_and_the_first_zero(self):
        w = torch.zeros(64, 64, dtype=torch.bfloat16)
        w[0, 2] = 5
        metadata = compress_sm90(w).reshape(-1)[64 * 32:].view(torch.uint8)
        assert metadata[0] & 0xF == (0 | 2 << 2)

    def test_rejects_what_the_layout_does_not_cover(self):
        with pytest.raises(ValueError, match="multiples of 64"):
            compress_sm90(torch.zeros(64, 96, dtype=torch.bfloat16))
        with pytest.raises(ValueError, match="fp16/bf16"):
            compress_sm90(torch.zeros(64, 64))
        with pytest.raises(ValueError, match="2-D"):
            compress_sm90(torch.zeros(2, 64, 64, dtype=torch.bfloat16))
        with pytest.raises(ValueError, match="the matrix that was compressed"):
            decompress_sm90(torch.zeros(64, 36, dtype=torch.bfloat16), 64, 128)


class TestEmulatedBackend:
    @pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
    def test_masked_dense_products(self, dtype):
        gen = torch.Generator().manual_seed(4)
        x, gy = torch.randn(10, 32, generator=gen).to(dtype), torch.randn(10, 16, generator=gen).to(dtype)
        w_masked, _ = random_24(16, 32, dtype, seed=5)
        backend = EmulatedBackend()
        y, ctx = backend.linear(x, w_masked, need_input_grad=True)
        assert torch.equal(y, x @ w_masked.t())
        assert torch.equal(backend.input_grad(gy, ctx), gy @ w_masked)
        assert backend.linear(x, w_masked, need_input_grad=False)[1] is None
        assert torch.equal(backend.sparse_input_linear(x, w_masked), x @ w_masked.t())
        assert torch.equal(backend.sparse_input_weight_grad(gy, x, transposable=True), gy.t() @ x)


class TestResolveBackend:
    def test_emulated_on_cpu_says_why(self):
        backend, reason = resolve_backend("auto", 4096, 1024, "cpu", torch.bfloat16, True)
        assert isinstance(backend, EmulatedBackend)
        assert reason == "emulated: runs on cpu, cuSPARSELt needs CUDA"

    def test_every_reason_is_listed(self):
        _, reason = resolve_backend("auto", 96, 100, "cpu", torch.float32, False)
        assert reason.startswith("emulated: runs on cpu")
        assert "compute dtype float32 is not fp16/bf16" in reason
        assert "out_features 96 is not a multiple of 64" in reason
        assert "in_features 100 is not a multiple of 64" in reason

    def test_emulated_when_asked(self):
        backend, reason = resolve_backend("emulated", 4096, 1024, "cpu", torch.bfloat16, True)
        assert isinstance(backend, EmulatedBackend) and reason == "emulated: requested (masked dense)"

    @pytest.mark.parametrize("device, dtype", [("cpu", torch.bfloat16), ("cpu", torch.float32)])
    def test_cusparselt_where_it_cannot_run_names_the_fix(self, device, dtype):
        with pytest.raises(ValueError, match="Use sparsity.backend=auto or emulated, or train in bf16-mixed on CUDA"):
            resolve_backend("cusparselt", 4096, 1024, device, dtype, True)

    def test_unknown_names_list_the_valid_ones(self):
        with pytest.raises(ValueError, match="'auto', 'emulated', 'cusparselt'"):
            resolve_backend("cutlass", 4096, 1024, "cpu", torch.bfloat16, True)
        with pytest.raises(ValueError, match="'cslt', 'direct'"):
            resolve_backend("auto", 4096, 1024, "cpu", torch.bfloat16, True, compress="tile")
        with pytest.raises(ValueError, match="'cslt', 'direct'"):
            CuSparseLtBackend(sparse_input_grad=True, compress="tile")


@pytest.fixture
def pretend_cuda(monkeypatch):
    """Make resolve_backend believe an H100 with cuSPARSELt is present (no CUDA call is made)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.backends.cusparselt, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    return monkeypatch


class TestResolveBackendOnCuda:
    def test_auto_picks_cusparselt_with_sparse_input_grad(self, pretend_cuda):
        backend, reason = resolve_backend("auto", 4096, 1024, "cuda", torch.bfloat16, True)
        assert isinstance(backend, CuSparseLtBackend) and backend.sparse_input_grad
        assert backend.compress_route == "cslt"
        assert reason == "cuSPARSELt: forward and input grad 2:4 (transposable mask), weight grad dense"

    def test_row_wise_mask_keeps_input_grad_dense(self, pretend_cuda):
        backend, reason = resolve_backend("cusparselt", 4096, 1024, "cuda:0", torch.float16, False)
        assert not backend.sparse_input_grad
        assert "input grad dense (mask not transposable)" in reason

    def test_narrow_layers_are_flagged(self, pretend_cuda):
        _, reason = resolve_backend("auto", 3072, 768, "cuda", torch.bfloat16, True)
        assert "little gain below 1024 features" in reason

    def test_fp32_and_ragged_shapes_fall_back_or_raise(self, pretend_cuda):
        backend, reason = resolve_backend("auto", 4096, 1000, "cuda", torch.float32, True)
        assert isinstance(backend, EmulatedBackend)
        assert reason == ("emulated: compute dtype float32 is not fp16/bf16; "
                          "in_features 1000 is not a multiple of 64")
        with pytest.raises(ValueError, match="bf16-mixed"):
            resolve_backend("cusparselt", 4096, 1024, "cuda", torch.float32, True)

    def test_no_cusparselt_in_this_torch(self, pretend_cuda):
        pretend_cuda.setattr(torch.backends.cusparselt, "is_available", lambda: False)
        _, reason = resolve_backend("auto", 4096, 1024, "cuda", torch.bfloat16, True)
        assert reason == "emulated: this torch build has no cuSPARSELt"

    def test_direct_compress_only_on_sm90(self, pretend_cuda):
        backend, reason = resolve_backend("auto", 4096, 1024, "cuda", torch.bfloat16, True, compress="direct")
        assert backend.compress_route == "direct" and reason.endswith("compress: direct sm90 layout")
        pretend_cuda.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
        backend, reason = resolve_backend("auto", 4096, 1024, "cuda", torch.bfloat16, True, compress="direct")
        assert backend.compress_route == "cslt" and "this GPU is sm80" in reason


# ---- CuSparseLtBackend's own logic (padding, operand layouts, algorithm cache) on CPU ----
# torch's cuSPARSELt ops are replaced by a CPU stand-in built on the sm90 layout: it decompresses
# the sparse operand and multiplies densely, and checks the shape rules cuSPARSELt imposes.

BROKEN_ALGORITHM = 13


class FakeCuSparseLt:
    def __init__(self, searched_algorithm=7):
        self.searched_algorithm = searched_algorithm
        self.searches = []
        self.algorithms_run = []

    def sparse_mm(self, compressed, dense, transpose_result=False, alg_id=0):
        m, k = compressed.shape[0], dense.shape[0]
        assert dense.shape[1] % 16 == 0, f"dense operand {tuple(dense.shape)} was not padded"
        self.algorithms_run.append(alg_id)
        product = (decompress_sm90(compressed, m, k).float() @ dense.float()).to(dense.dtype)
        if alg_id == BROKEN_ALGORITHM:
            product = product * 2
        return product.t().contiguous() if transpose_result else product

    def search(self, compressed, dense, transpose_result=False):
        self.searches.append((tuple(compressed.shape), tuple(dense.shape), transpose_result))
        return self.searched_algorithm


@pytest.fixture
def fake_cusparselt(monkeypatch):
    fake = FakeCuSparseLt()
    monkeypatch.setattr(torch, "_cslt_compress", compress_sm90, raising=False)
    monkeypatch.setattr(torch, "_cslt_sparse_mm", fake.sparse_mm, raising=False)
    monkeypatch.setattr(torch, "_cslt_sparse_mm_search", fake.search, raising=False)
    monkeypatch.setattr(backends, "_ALGORITHMS", {})
    return fake


def relative_error(a, b):
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm())


def weight_sparse_run(backend, x, w, b, mask, gy):
    x, w, b = (t.detach().clone().requires_grad_() for t in (x, w, b))
    y = weight_sparse_linear(x, w, b, mask, backend)
    return (y, *torch.autograd.grad(y, (x, w, b), gy))


@pytest.mark.parametrize("compress", ["cslt", "direct"])
@pytest.mark.parametrize("transposable", [True, False])
@pytest.mark.parametrize("tokens", [(37,), (2, 64)])
def test_cusparselt_backend_equals_emulated(fake_cusparselt, compress, transposable, tokens):
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(*tokens, 192, generator=gen).bfloat16()
    w = torch.randn(128, 192, generator=gen).bfloat16()
    b = torch.randn(128, generator=gen).bfloat16()
    gy = torch.randn(*tokens, 128, generator=gen).bfloat16()
    mask = (mask_24_transposable if transposable else mask_24)(w.abs())
    sparse = weight_sparse_run(CuSparseLtBackend(transposable, compress), x, w, b, mask, gy)
    dense = weight_sparse_run(EmulatedBackend(), x, w, b, mask, gy)
    for name, s, d in zip(("y", "dx", "dw", "db"), sparse, dense):
        assert s.shape == d.shape and s.dtype == d.dtype
        assert relative_error(s, d) < 1e-2, name
    assert set(fake_cusparselt.algorithms_run) == {7}


def test_algorithms_are_searched_once_per_shape(fake_cusparselt):
    backend = CuSparseLtBackend(sparse_input_grad=True)
    w = torch.randn(64, 128).bfloat16()
    mask = mask_24_transposable(w.abs())
    for tokens in (20, 30, 20, 50):  # 20 and 30 both pad to 32
        x = torch.randn(tokens, 128, dtype=torch.bfloat16, requires_grad=True)
        weight_sparse_linear(x, w, None, mask, backend).sum().backward()
    assert fake_cusparselt.searches == [
        ((64, 72), (128, 32), True), ((128, 36), (64, 32), True),  # forward, input grad at 32 rows
        ((64, 72), (128, 64), True), ((128, 36), (64, 64), True),  # and at 64 rows
    ]


def test_broken_searched_algorithm_falls_back_to_0(fake_cusparselt):
    fake_cusparselt.searched_algorithm = BROKEN_ALGORITHM
    backend = CuSparseLtBackend(sparse_input_grad=False)
    w = torch.randn(64, 128).bfloat16()
    x = torch.randn(16, 128).bfloat16()
    w_masked = w.masked_fill(~mask_24(w.abs()), 0)
    with pytest.warns(UserWarning, match="uses algorithm 0"):
        y, _ = backend.linear(x, w_masked, need_input_grad=False)
    assert relative_error(y, x @ w_masked.t()) < 1e-2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        backend.linear(x, w_masked, need_input_grad=False)  # cached: no second search, no warning
    assert list(backends._ALGORITHMS.values()) == [0]


@pytest.mark.parametrize("transposable", [False, True])
@pytest.mark.parametrize("compress", ["cslt", "direct"])
def test_activation_sparse_on_cusparselt_equals_emulated(fake_cusparselt, transposable, compress):
    gen = torch.Generator().manual_seed(7)
    x = torch.relu(torch.randn(3, 30, 256, generator=gen)).square().bfloat16()
    w = torch.randn(64, 256, generator=gen).bfloat16()
    b = torch.randn(64, generator=gen).bfloat16()
    gy = torch.randn(3, 30, 64, generator=gen).bfloat16()

    def run(backend):
        xi, wi, bi = (t.detach().clone().requires_grad_() for t in (x, w, b))
        y = activation_sparse_linear(xi, wi, bi, backend, transposable=transposable)
        return (y, *torch.autograd.grad(y, (xi, wi, bi), gy))

    for name, s, d in zip(("y", "dx", "dw", "db"), run(CuSparseLtBackend(True, compress)), run(EmulatedBackend())):
        assert s.shape == d.shape and relative_error(s, d) < 1e-2, name
    sparse_shapes = {search[0] for search in fake_cusparselt.searches}
    # forward: X_s padded to 128 rows; weight grad (transposable only): X_s^T with 128 columns
    assert sparse_shapes == ({(128, 144), (256, 72)} if transposable else {(128, 144)})
