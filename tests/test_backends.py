import importlib.util
import json
import logging
import warnings

import numpy as np
import pytest
import torch

from sparsetrain.gpu import kernels
from sparsetrain.gpu.backends import CuSparseLtBackend, EmulatedBackend, cslt_gemm, resolve_backend
from sparsetrain.gpu.kernels import cslt_plans
from sparsetrain.gpu.layout_sm90 import compress_sm90, decompress_sm90
from sparsetrain.sparse.config import Semi24Config
from sparsetrain.sparse.functions import activation_sparse_linear, weight_sparse_linear
from sparsetrain.sparse.masks import mask_24, mask_24_activations, mask_24_transposable
from sparsetrain.sparse.modules import SparseLinear

HALF = [torch.bfloat16, torch.float16]
triton_missing = importlib.util.find_spec("triton") is None


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


class TestEmulatedBackend:
    @pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
    def test_masked_dense_products(self, dtype):
        gen = torch.Generator().manual_seed(4)
        x, gy = torch.randn(10, 32, generator=gen).to(dtype), torch.randn(10, 16, generator=gen).to(dtype)
        b = torch.randn(16, generator=gen).to(dtype)
        w_masked, mask = random_24(16, 32, dtype, seed=5)
        backend = EmulatedBackend()
        same_mask, prepared = backend.prepare_weight(w_masked, mask)
        assert same_mask is mask
        assert torch.equal(backend.linear(x, prepared, None), x @ w_masked.t())
        assert torch.equal(backend.linear(x, prepared, b), x @ w_masked.t() + b)
        assert torch.equal(backend.input_grad(gy, prepared.input_grad), gy @ w_masked)
        assert backend.prepare_weight(w_masked, mask, need_input_grad=False)[1].input_grad is None
        assert torch.equal(backend.sparse_input_linear(x, w_masked), x @ w_masked.t())
        assert torch.equal(backend.sparse_input_weight_grad(gy, x, transposable=True), gy.t() @ x)

    def test_prepare_without_a_mask_prunes_transposable_by_magnitude(self):
        w = torch.randn(16, 32, generator=torch.Generator().manual_seed(5))
        mask, prepared = EmulatedBackend().prepare_weight(w)
        assert torch.equal(mask, mask_24_transposable(w.abs()))
        assert torch.equal(prepared.forward, w * mask) and torch.equal(prepared.masked(), w * mask)


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
        w = torch.randn(64, 128).bfloat16()
        with pytest.raises(ValueError, match="use compress='cslt' for a row-wise weight mask"):
            CuSparseLtBackend(sparse_input_grad=False, compress="kernel").prepare_weight(w, mask_24(w.abs()))


@pytest.fixture
def pretend_cuda(monkeypatch):
    """Make resolve_backend believe an H100 with cuSPARSELt is present (no CUDA call is made)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.backends.cusparselt, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    return monkeypatch


class TestResolveBackendOnCuda:
    def test_auto_picks_cusparselt_with_sparse_input_grad_and_the_fused_kernel(self, pretend_cuda):
        backend, reason = resolve_backend("auto", 4096, 1024, "cuda", torch.bfloat16, True)
        assert isinstance(backend, CuSparseLtBackend) and backend.sparse_input_grad
        assert backend.compress_route == ("cslt" if triton_missing else "kernel")
        assert reason.startswith("cuSPARSELt: forward and input grad 2:4 (transposable mask), weight grad dense; ")
        backend, reason = resolve_backend("auto", 4096, 1024, "cuda", torch.bfloat16, True, compress="cslt")
        assert backend.compress_route == "cslt"
        assert reason == "cuSPARSELt: forward and input grad 2:4 (transposable mask), weight grad dense"

    def test_row_wise_mask_keeps_input_grad_dense_and_cslt_compress(self, pretend_cuda):
        backend, reason = resolve_backend("cusparselt", 4096, 1024, "cuda:0", torch.float16, False)
        assert not backend.sparse_input_grad and backend.compress_route == "cslt"
        assert "input grad dense (mask not transposable)" in reason
        assert reason.endswith("compress: cslt (the fused kernel prunes transposable weight masks)")

    @pytest.mark.parametrize("transposable", [False, True])
    def test_activation_layers_take_the_fused_kernel_with_either_mask(self, pretend_cuda, transposable):
        backend, reason = resolve_backend("auto", 1024, 4096, "cuda", torch.bfloat16, transposable, activations=True)
        assert backend.compress_route == ("cslt" if triton_missing else "kernel")
        weight_grad = "2:4 too (transposable mask)" if transposable else "dense"
        assert reason.startswith(f"cuSPARSELt: forward 2:4 on the pruned input activations, weight grad {weight_grad}")

    def test_fused_kernel_only_on_sm90(self, pretend_cuda):
        pretend_cuda.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
        backend, reason = resolve_backend("auto", 4096, 1024, "cuda", torch.bfloat16, True)
        assert backend.compress_route == "cslt" and reason.endswith("compress: cslt")
        backend, reason = resolve_backend("auto", 4096, 1024, "cuda", torch.bfloat16, True, compress="kernel")
        assert backend.compress_route == "cslt" and "this GPU is sm80" in reason

    def test_plans_choice_reaches_the_backend(self, pretend_cuda):
        backend, _ = resolve_backend("auto", 4096, 1024, "cuda", torch.bfloat16, True, plans=False)
        assert backend.plans is False

    def test_auto_leaves_narrow_layers_masked_dense_and_says_why(self, pretend_cuda):
        backend, reason = resolve_backend("auto", 3072, 768, "cuda", torch.bfloat16, True)
        assert isinstance(backend, EmulatedBackend)
        assert "768 features is below 1024" in reason and "sparsity.backend=cusparselt forces it" in reason
        forced, _ = resolve_backend("cusparselt", 3072, 768, "cuda", torch.bfloat16, True)
        assert isinstance(forced, CuSparseLtBackend)

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


# ---- CuSparseLtBackend's own logic (padding, operand layouts, algorithm cache, fused paths) on CPU ----
# torch's cuSPARSELt ops, the plan cache and the fused kernel are replaced by CPU stand-ins built on
# the sm90 layout: the GEMM decompresses the sparse operand and multiplies densely (the bias added
# in fp32, as cuSPARSELt's epilogue does) and checks the operand rules cuSPARSELt imposes; the
# kernel is mask_24_transposable + compress_sm90 (tests/test_kernels.py holds the real kernel to
# those bytes).

BROKEN_ALGORITHM = 13


class FakeCuSparseLt:
    def __init__(self, searched_algorithm=7):
        self.searched_algorithm = searched_algorithm
        self.searches = []
        self.algorithms_run = []
        self.biases = []  # (data_ptr, dtype) of every bias a GEMM read
        self.compressions = 0
        self.plan_calls = 0

    def sparse_mm(self, compressed, dense, bias=None, transpose_result=False, alg_id=0):
        m, k = compressed.shape[0], dense.shape[0]
        assert dense.shape[1] % 16 == 0, f"dense operand {tuple(dense.shape)} was not padded"
        self.algorithms_run.append(alg_id)
        product = decompress_sm90(compressed, m, k).float() @ dense.float()
        if bias is not None:
            # cuSPARSELt reads the bias as raw memory of the output type: anything else is garbage.
            assert bias.dtype == dense.dtype and bias.shape == (m,) and bias.is_contiguous(), \
                f"bias {bias.dtype} {tuple(bias.shape)} is not a contiguous ({m},) {dense.dtype} vector"
            self.biases.append((bias.data_ptr(), bias.dtype))
            product = product + bias.float()[:, None]
        product = product.to(dense.dtype)
        if alg_id == BROKEN_ALGORITHM:
            product = product * 2
        return product.t().contiguous() if transpose_result else product

    def plans_sparse_mm(self, compressed, dense, transpose_result=True, alg_id=0, bias=None):
        self.plan_calls += 1
        return self.sparse_mm(compressed, dense, bias=bias, transpose_result=transpose_result, alg_id=alg_id)

    def search(self, compressed, dense, transpose_result=False):
        self.searches.append((tuple(compressed.shape), tuple(dense.shape), transpose_result))
        return self.searched_algorithm

    def compress(self, matrix):
        self.compressions += 1
        return compress_sm90(matrix)


class FakeKernels:
    """The fused prune+compress kernel's contract: mask_24_transposable and the bytes of compress_sm90."""

    def __init__(self):
        self.launches = []

    def prune_compress_transposable(self, w, want_mask=True):
        self.launches.append("prune")
        mask = mask_24_transposable(w.abs())
        w_masked = w * mask
        return compress_sm90(w_masked), compress_sm90(w_masked.t().contiguous()), mask if want_mask else None

    def prune_compress_into(self, w, mask, flips):
        self.launches.append("prune-into")
        new_mask = mask_24_transposable(w.abs())
        flips.add_((mask ^ new_mask).sum())
        mask.copy_(new_mask)
        w_masked = w * mask
        return compress_sm90(w_masked), compress_sm90(w_masked.t().contiguous())

    def prune_activations(self, x, transposable):
        self.launches.append("activations")
        assert x.shape[0] % 64 == 0, "the caller pads the tokens"
        mask = mask_24_activations(x, transposable)
        masked = x * mask
        c_t = compress_sm90(masked.t().contiguous()) if transposable else None
        return compress_sm90(masked), c_t, mask, x.masked_fill(~mask, 0)

    def compress_masked(self, w, mask, transposed=True):
        self.launches.append("mask" if transposed else "mask-no-t")
        w_masked = w * mask
        return compress_sm90(w_masked), compress_sm90(w_masked.t().contiguous()) if transposed else None


@pytest.fixture
def fake_cusparselt(monkeypatch, tmp_path):
    fake = FakeCuSparseLt()
    monkeypatch.setenv("SPARSETRAIN_CACHE", str(tmp_path / "cache"))  # an empty algorithm file
    monkeypatch.setattr(torch, "_cslt_compress", fake.compress, raising=False)
    monkeypatch.setattr(torch, "_cslt_sparse_mm", fake.sparse_mm, raising=False)
    monkeypatch.setattr(torch, "_cslt_sparse_mm_search", fake.search, raising=False)
    monkeypatch.setattr(cslt_gemm, "_ALGORITHMS", {})
    monkeypatch.delenv(cslt_gemm.PLANS_ENV, raising=False)
    return fake


@pytest.fixture
def fake_kernels(monkeypatch):
    fake = FakeKernels()
    monkeypatch.setattr(kernels, "prune_compress_transposable", fake.prune_compress_transposable)
    monkeypatch.setattr(kernels, "prune_compress_into", fake.prune_compress_into)
    monkeypatch.setattr(kernels, "prune_activations", fake.prune_activations)
    monkeypatch.setattr(kernels, "compress_masked", fake.compress_masked)
    return fake


@pytest.fixture
def fake_plans(monkeypatch, fake_cusparselt):
    """The plan cache 'builds' and runs the stand-in GEMM."""
    monkeypatch.setattr(cslt_gemm, "_plan_cache_error", lambda: None)
    monkeypatch.setattr(cslt_plans, "sparse_mm", fake_cusparselt.plans_sparse_mm)
    return fake_cusparselt


def relative_error(a, b):
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm())


def weight_sparse_run(backend, x, w, b, mask, gy):
    x, w, b = (t.detach().clone().requires_grad_() for t in (x, w, b))
    y = weight_sparse_linear(x, w, b, mask, backend)
    return (y, *torch.autograd.grad(y, (x, w, b), gy))


def operands(tokens, n_in=192, n_out=128, seed=6):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*tokens, n_in, generator=gen).bfloat16()
    w = torch.randn(n_out, n_in, generator=gen).bfloat16()
    b = torch.randn(n_out, generator=gen).bfloat16()
    gy = torch.randn(*tokens, n_out, generator=gen).bfloat16()
    return x, w, b, gy


ROUTES = [("kernel", True), ("cslt", True), ("direct", True), ("cslt", False), ("direct", False)]


@pytest.mark.parametrize("compress, transposable", ROUTES)
@pytest.mark.parametrize("plans", [False, True], ids=["torch_mm", "plans"])
@pytest.mark.parametrize("tokens", [(37,), (2, 64)])
def test_cusparselt_backend_equals_emulated(fake_plans, fake_kernels, compress, transposable, plans, tokens):
    x, w, b, gy = operands(tokens)
    mask = (mask_24_transposable if transposable else mask_24)(w.abs())
    sparse = weight_sparse_run(CuSparseLtBackend(transposable, compress, plans=plans), x, w, b, mask, gy)
    dense = weight_sparse_run(EmulatedBackend(), x, w, b, mask, gy)
    for name, s, d in zip(("y", "dx", "dw", "db"), sparse, dense):
        assert s.shape == d.shape and s.dtype == d.dtype
        assert relative_error(s, d) < 1e-2, name
    assert set(fake_plans.algorithms_run) == {7}
    assert (fake_plans.plan_calls > 0) == plans
    # the given mask's compressions: one kernel launch, or _cslt_compress once per operand
    assert fake_kernels.launches == (["mask"] if compress == "kernel" else [])
    assert fake_plans.compressions == (0 if compress != "cslt" else 2 if transposable else 1)


@pytest.mark.parametrize("compress", ["kernel", "cslt", "direct"])
def test_prepare_without_a_mask_prunes_as_masks_py(fake_cusparselt, fake_kernels, compress):
    _, w, _, _ = operands((4,), seed=8)
    w[:, :8] = 0  # whole zero groups: any route must still pick mask_24_transposable's mask
    mask, prepared = CuSparseLtBackend(True, compress).prepare_weight(w)
    expected_mask, reference = EmulatedBackend().prepare_weight(w)
    assert torch.equal(mask, expected_mask) and torch.equal(prepared.masked(), reference.forward)
    assert torch.equal(decompress_sm90(prepared.forward, 128, 192), reference.forward)
    assert torch.equal(decompress_sm90(prepared.input_grad, 192, 128), reference.forward.t())
    assert fake_kernels.launches == (["prune"] if compress == "kernel" else [])


def test_kernel_route_without_input_grad_writes_no_transpose(fake_cusparselt, fake_kernels):
    _, w, _, _ = operands((4,))
    mask = mask_24_transposable(w.abs())
    _, prepared = CuSparseLtBackend(True, "kernel").prepare_weight(w, mask, need_input_grad=False)
    assert prepared.input_grad is None and fake_kernels.launches == ["mask-no-t"]


@pytest.mark.parametrize("plans", [False, True], ids=["torch_mm", "plans"])
def test_bias_goes_into_the_gemm_in_the_output_dtype(fake_plans, fake_kernels, plans):
    x, w, _, _ = operands((20,))
    b = torch.randn(128) * 10  # fp32 bias, bf16 compute: must reach the GEMM as bf16
    mask = mask_24_transposable(w.abs())
    y = weight_sparse_linear(x, w, b, mask, CuSparseLtBackend(True, "kernel", plans=plans))
    assert [dtype for _, dtype in fake_plans.biases] == [torch.bfloat16]
    exact = x.float() @ (w * mask).float().t() + b
    assert relative_error(y, exact) < 5e-3


def test_plan_path_keeps_one_bias_address(fake_plans, fake_kernels):
    """A cached plan holds the bias address: fresh bias tensors (a cast each step) must not leak
    into it, so they go through one buffer kept per bias shape."""
    backend = CuSparseLtBackend(True, "kernel", plans=True)
    x, w, _, _ = operands((20,))
    _, prepared = backend.prepare_weight(w)
    for step in range(3):
        bias = torch.arange(128, dtype=torch.bfloat16) * (step + 1)
        y = backend.linear(x, prepared, bias)
        assert relative_error(y, x.float() @ prepared.masked().float().t() + bias.float()) < 5e-3
    addresses = {address for address, _ in fake_plans.biases}
    assert len(addresses) == 1


def test_module_refresh_is_one_fused_call_and_stores_its_mask(fake_cusparselt, fake_kernels):
    layer = SparseLinear.from_dense(torch.nn.Linear(192, 128).bfloat16(), Semi24Config(), "fc").train()
    layer.use_backend(CuSparseLtBackend(True, "kernel", plans=False), "cpu", torch.bfloat16)
    with torch.no_grad():
        layer.weight.mul_(-1).add_(0.01)  # new magnitudes: the refreshed mask differs from the first
    x, _, _, gy = operands((3, 10))
    first_mask, version = layer.mask.clone(), layer.mask._version
    y = layer(x.requires_grad_())
    assert fake_kernels.launches == ["prune-into"] and fake_cusparselt.compressions == 0
    assert torch.equal(layer.mask, mask_24_transposable(layer.weight.detach().abs()))
    assert int(layer.flip_count) == int((first_mask ^ layer.mask).sum()) > 0
    assert layer.mask._version > version, "autograd must see the in-place write"
    y.backward(gy)
    reference = SparseLinear.from_dense(torch.nn.Linear(192, 128).bfloat16(), Semi24Config(), "ref").eval()
    with torch.no_grad():
        reference.weight.copy_(layer.weight), reference.bias.copy_(layer.bias), reference.mask.copy_(layer.mask)
    x_ref = x.detach().clone().requires_grad_()
    y_ref = reference(x_ref)
    y_ref.backward(gy)
    assert relative_error(y, y_ref) < 1e-2 and relative_error(x.grad, x_ref.grad) < 1e-2
    layer.set_mask_frozen(True)
    layer(x)
    assert fake_kernels.launches == ["prune-into", "mask"]


def test_algorithms_are_searched_once_per_shape(fake_cusparselt):
    backend = CuSparseLtBackend(sparse_input_grad=True, plans=False)
    w = torch.randn(64, 128).bfloat16()
    mask = mask_24_transposable(w.abs())
    for tokens in (20, 30, 20, 50):  # 20 and 30 both pad to 32
        x = torch.randn(tokens, 128, dtype=torch.bfloat16, requires_grad=True)
        weight_sparse_linear(x, w, None, mask, backend).sum().backward()
    assert fake_cusparselt.searches == [
        ((64, 72), (128, 32), True), ((128, 36), (64, 32), True),  # forward, input grad at 32 rows
        ((64, 72), (128, 64), True), ((128, 36), (64, 64), True),  # and at 64 rows
    ]


def test_input_grad_probe_is_allocated_only_for_a_new_shape(fake_cusparselt, monkeypatch):
    backend = CuSparseLtBackend(sparse_input_grad=True, plans=False)
    x, w, _, _ = operands((20,))
    _, prepared = backend.prepare_weight(w)
    backend.linear(x, prepared, None)  # searches forward and input grad
    probes = []
    real_new_empty = torch.Tensor.new_empty
    monkeypatch.setattr(torch.Tensor, "new_empty", lambda t, *a, **k: probes.append(a) or real_new_empty(t, *a, **k))
    backend.linear(x, prepared, None)
    assert probes == []


def test_broken_searched_algorithm_falls_back_to_0(fake_cusparselt):
    fake_cusparselt.searched_algorithm = BROKEN_ALGORITHM
    backend = CuSparseLtBackend(sparse_input_grad=False, plans=False)
    w = torch.randn(64, 128).bfloat16()
    x = torch.randn(16, 128).bfloat16()
    _, prepared = backend.prepare_weight(w, mask_24(w.abs()), need_input_grad=False)
    with pytest.warns(UserWarning, match="uses algorithm 0"):
        y = backend.linear(x, prepared, None)
    assert relative_error(y, x @ prepared.masked().t()) < 1e-2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        backend.linear(x, prepared, None)  # cached: no second search, no warning
    assert list(cslt_gemm._ALGORITHMS.values()) == [0]


def run_linear_once(rows=16):
    backend = CuSparseLtBackend(sparse_input_grad=False, plans=False)
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(1)).bfloat16()
    _, prepared = backend.prepare_weight(w, mask_24(w.abs()), need_input_grad=False)
    return backend.linear(torch.randn(rows, 128).bfloat16(), prepared, None)


def test_a_chosen_algorithm_is_stored_and_a_new_process_checks_it_instead_of_searching(fake_cusparselt, monkeypatch):
    run_linear_once()
    stored = json.loads(cslt_gemm.ALGORITHM_FILE.path.read_text())
    assert list(stored.values()) == [7] and len(fake_cusparselt.searches) == 1
    key = next(iter(stored))
    assert key.startswith("64x72|128x16|") and f"torch{torch.__version__}" in key and "|cpu|" in key
    monkeypatch.setattr(cslt_gemm, "_ALGORITHMS", {})  # a new process
    fake_cusparselt.algorithms_run.clear()
    run_linear_once()
    assert len(fake_cusparselt.searches) == 1, "the stored choice spares the search"
    assert fake_cusparselt.algorithms_run == [7, 7], "checked against masked dense once, then run"


def test_a_stored_algorithm_that_fails_its_check_is_searched_again(fake_cusparselt, monkeypatch):
    run_linear_once()
    key = next(iter(json.loads(cslt_gemm.ALGORITHM_FILE.path.read_text())))
    cslt_gemm.ALGORITHM_FILE.persist(key, BROKEN_ALGORITHM)
    monkeypatch.setattr(cslt_gemm, "_ALGORITHMS", {})
    with pytest.warns(UserWarning, match="searching again"):
        run_linear_once()
    assert len(fake_cusparselt.searches) == 2
    assert json.loads(cslt_gemm.ALGORITHM_FILE.path.read_text()) == {key: 7}


def test_a_damaged_algorithm_file_means_searching_not_failing(fake_cusparselt, caplog):
    path = cslt_gemm.ALGORITHM_FILE.path
    path.parent.mkdir(parents=True)
    path.write_text("[1, 2")
    run_linear_once()
    assert "ignoring" in caplog.text and len(fake_cusparselt.searches) == 1
    assert list(json.loads(path.read_text()).values()) == [7]


class TestPlanCacheChoice:
    @staticmethod
    def gemm_runner(backend):
        return cslt_gemm.pick_matmul(backend.plans)

    def test_environment_forces_either(self, fake_cusparselt, monkeypatch):
        monkeypatch.setattr(cslt_gemm, "_plan_cache_error", lambda: None)
        monkeypatch.setenv(cslt_gemm.PLANS_ENV, "0")
        assert self.gemm_runner(CuSparseLtBackend(True)) is cslt_gemm.torch_mm
        monkeypatch.setenv(cslt_gemm.PLANS_ENV, "1")
        assert self.gemm_runner(CuSparseLtBackend(True)) is cslt_gemm._plans_mm
        assert self.gemm_runner(CuSparseLtBackend(True, plans=False)) is cslt_gemm.torch_mm  # the argument wins
        monkeypatch.setenv(cslt_gemm.PLANS_ENV, "yes")
        with pytest.raises(ValueError, match="use 1 .* 0 .* or leave it unset"):
            CuSparseLtBackend(True)

    def test_forced_plans_that_cannot_build_name_the_fix(self, fake_cusparselt, monkeypatch):
        monkeypatch.setattr(cslt_gemm, "_plan_cache_error", lambda: "RuntimeError: no C++ compiler found")
        with pytest.raises(RuntimeError, match="no C\\+\\+ compiler found.*SPARSETRAIN_CSLT_PLANS=0"):
            self.gemm_runner(CuSparseLtBackend(True, plans=True))
        assert self.gemm_runner(CuSparseLtBackend(True)) is cslt_gemm.torch_mm

    def test_build_failure_falls_back_and_is_logged_once(self, fake_cusparselt, monkeypatch, caplog):
        def broken_load():
            raise RuntimeError("building the cuSPARSELt plan cache failed: cusparseLt.h: No such file")
        monkeypatch.setattr(cslt_plans, "load", broken_load)
        cslt_gemm._plan_cache_error.cache_clear()
        try:
            with caplog.at_level(logging.WARNING, logger="sparsetrain"):
                for _ in range(3):
                    assert self.gemm_runner(CuSparseLtBackend(True)) is cslt_gemm.torch_mm
        finally:
            cslt_gemm._plan_cache_error.cache_clear()
        warnings_logged = [r.getMessage() for r in caplog.records if "plan cache unavailable" in r.getMessage()]
        assert len(warnings_logged) == 1 and "cusparseLt.h: No such file" in warnings_logged[0]


@pytest.mark.parametrize("transposable", [False, True])
@pytest.mark.parametrize("compress", ["cslt", "direct", "kernel"])
def test_activation_sparse_on_cusparselt_equals_emulated(fake_cusparselt, fake_kernels, transposable, compress):
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
    # The kernel route prunes and compresses in one pass per forward; the others compress with cuSPARSELt.
    assert fake_kernels.launches == (["activations"] if compress == "kernel" else [])
    assert (fake_cusparselt.compressions == 0) == (compress != "cslt")
