"""The fast path as users run it, on a CUDA GPU: SparseLinear on cuSPARSELt (the fused
prune+compress kernel on sm90, the bias in the GEMM's epilogue, the plan cache on and off) equals
the same layer on the emulated backend (masked dense) within bf16 tolerance, and the fused path's
mask is mask_24_transposable's. Kernel cases skip off sm90; plan-cache cases skip, with the build
error, where the plan cache cannot build.

    pytest -q -m gpu tests/test_gpu_fastpath.py
"""
import copy

import pytest
import torch
from torch import nn

from sparsetrain.gpu import kernels
from sparsetrain.gpu.backends import CuSparseLtBackend, cslt_gemm, resolve_backend
from sparsetrain.sparse.config import Semi24Config
from sparsetrain.sparse.masks import mask_24_transposable
from sparsetrain.sparse.layers import SparseLinear

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.backends.cusparselt.is_available(), reason="this torch build has no cuSPARSELt"),
]

BF16 = torch.bfloat16
MAX_REL_ERROR = 1e-2  # bf16 GEMMs of ~1000-4000 terms land at 2e-3 to 4e-3
TOKENS = 8 * 197  # not a multiple of 16, so the padding path runs
# (name, in_features, out_features)
LAYERS = [("vit_l.fc1", 1024, 4096), ("vit_l.fc2", 4096, 1024), ("small", 192, 128)]


def require(compress: str, plans: bool) -> None:
    if compress == "kernel":
        capability = torch.cuda.get_device_capability()
        if capability != (9, 0) or not kernels.available():
            pytest.skip(f"the fused kernel writes sm90's layout and needs Triton; this GPU is sm{capability[0]}"
                        f"{capability[1]}, Triton available: {kernels.available()}")
    if plans:
        error = cslt_gemm._plan_cache_error()
        if error is not None:
            pytest.skip(f"the cuSPARSELt plan cache does not build here: {error}")


def randn(*shape, seed, scale=1.0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=generator) * scale).to(BF16).cuda()


def relative_error(got, reference):
    got, reference = got.detach().float(), reference.detach().float()
    return float((got - reference).norm() / reference.norm())


def assert_close_rel(what, got, reference, limit=MAX_REL_ERROR):
    assert got.shape == reference.shape, f"{what}: shape {tuple(got.shape)} != reference {tuple(reference.shape)}"
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    error = relative_error(got, reference)
    assert error < limit, f"{what}: relative error {error:.3g} (limit {limit})"


def assert_same_bits(what, got, expected):
    got, expected = got.reshape(-1).view(torch.int16), expected.reshape(-1).view(torch.int16)
    different = got != expected
    assert not different.any(), (f"{what}: {int(different.sum())} of {got.numel()} 16-bit words differ, first at "
                                 f"{different.nonzero()[:5].flatten().tolist()}")


# ---- the fused path's operands: the mask of masks.py, the bytes of _cslt_compress ----

@pytest.mark.parametrize("shape", [(4096, 1024), (1024, 4096), (128, 192)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_fused_prepare_returns_the_transposable_mask_and_cslt_bytes(shape):
    require("kernel", plans=False)
    m, k = shape
    w = randn(m, k, seed=m + k)
    w[:, :16] = 0  # zero groups: the zero-slot rule decides bytes there
    mask, prepared = CuSparseLtBackend(True, "kernel", plans=False).prepare_weight(w)
    expected = mask_24_transposable(w.abs())
    assert torch.equal(mask, expected), (
        f"fused mask differs from mask_24_transposable in {int((mask != expected).sum())} entries")
    w_masked = w * expected
    assert_same_bits("W_s compressed", prepared.forward, torch._cslt_compress(w_masked))
    assert_same_bits("W_s^T compressed", prepared.input_grad, torch._cslt_compress(w_masked.t().contiguous()))
    # given-mask mode, with a mask that is not the magnitude one
    other = mask_24_transposable(torch.rand(m, k, device="cuda"))
    same, prepared = CuSparseLtBackend(True, "kernel", plans=False).prepare_weight(w, other)
    assert same is other
    assert_same_bits("given mask: W_s compressed", prepared.forward, torch._cslt_compress(w * other))
    assert_same_bits("given mask: W_s^T compressed", prepared.input_grad,
                     torch._cslt_compress((w * other).t().contiguous()))


def test_auto_resolves_to_the_fused_kernel_on_sm90():
    require("kernel", plans=False)
    backend, reason = resolve_backend("auto", 4096, 1024, "cuda", BF16, transposable=True)
    assert backend.compress_route == "kernel", reason
    backend, reason = resolve_backend("auto", 4096, 1024, "cuda", BF16, transposable=False)
    assert backend.compress_route == "cslt", reason


# ---- SparseLinear on cuSPARSELt == SparseLinear on the emulated backend ----

def layer_pair(n_in, n_out, compress, plans, seed):
    """The same bf16 layer twice: on cuSPARSELt (route and plans pinned) and on the emulated backend."""
    torch.manual_seed(seed)
    dense = nn.Linear(n_in, n_out).to("cuda", BF16)
    with torch.no_grad():
        dense.bias.normal_(0, 2.0)  # a bias that matters: mis-applied, it shows in y
    fast = SparseLinear.from_dense(copy.deepcopy(dense), Semi24Config(backend="cusparselt"), "fast")
    fast.use_backend(CuSparseLtBackend(True, compress, plans=plans), "cuda", BF16, "pinned by the test")
    reference = SparseLinear.from_dense(copy.deepcopy(dense), Semi24Config(backend="emulated"), "reference")
    return fast.train(), reference.train()


def training_step(layer, x, gy):
    x = x.detach().clone().requires_grad_()
    layer.zero_grad(set_to_none=True)
    y = layer(x)
    y.backward(gy)
    return {"y": y.detach(), "dx": x.grad, "dw": layer.weight.grad, "db": layer.bias.grad}


@pytest.mark.parametrize("name, n_in, n_out", LAYERS, ids=[layer[0] for layer in LAYERS])
@pytest.mark.parametrize("compress", ["kernel", "cslt"])
@pytest.mark.parametrize("plans", [False, True], ids=["torch_mm", "plan_cache"])
@pytest.mark.parametrize("frozen", [False, True], ids=["refresh", "frozen_mask"])
def test_sparse_linear_on_cusparselt_equals_emulated(name, n_in, n_out, compress, plans, frozen):
    require(compress, plans)
    fast, reference = layer_pair(n_in, n_out, compress, plans, seed=n_in + n_out)
    if frozen:  # a given mask unrelated to |W|: the kernel's given-mask mode
        given = mask_24_transposable(torch.rand(n_out, n_in, device="cuda"))
        for layer in (fast, reference):
            layer.mask.copy_(given)
            layer.set_mask_frozen(True)
    x, gy = randn(TOKENS, n_in, seed=1), randn(TOKENS, n_out, seed=2)
    for step in range(2):  # step 2 runs the cached algorithms, plans and bias buffer
        got, expected = training_step(fast, x, gy), training_step(reference, x, gy)
        label = (f"{name} {compress} {'plans' if plans else 'torch_mm'} {'frozen' if frozen else 'refresh'} "
                 f"step {step}, cuSPARSELt vs emulated")
        assert torch.equal(fast.mask, reference.mask), (
            f"{label}: masks differ in {int((fast.mask != reference.mask).sum())} entries")
        for what in ("y", "dx", "dw", "db"):
            assert_close_rel(f"{label} {what}", got[what], expected[what])
        with torch.no_grad():  # move the weights so that step 2 re-prunes to a new mask
            for layer in (fast, reference):
                layer.weight.add_(randn(n_out, n_in, seed=3 + step, scale=0.5))


@pytest.mark.parametrize("plans", [False, True], ids=["torch_mm", "plan_cache"])
def test_fp32_master_weights_under_autocast(plans):
    """bf16-mixed training: the bias is cast to bf16 anew each step (a new address each time),
    while a cached plan holds the bias address it was built with. Each step must see its own bias."""
    require("kernel", plans)
    torch.manual_seed(13)
    layer = SparseLinear.from_dense(nn.Linear(1024, 4096).cuda(), Semi24Config(backend="cusparselt"), "fp32").train()
    layer.use_backend(CuSparseLtBackend(True, "kernel", plans=plans), "cuda", BF16)
    x = randn(TOKENS, 1024, seed=14).float()
    for step in range(3):
        with torch.no_grad():
            layer.bias.add_(float(step + 1))
        with torch.autocast("cuda", dtype=BF16):
            y = layer(x)
        assert y.dtype == BF16
        w_masked = layer.weight.detach().bfloat16() * layer.mask
        expected = x.bfloat16().float() @ w_masked.float().t() + layer.bias.detach().bfloat16().float()
        assert_close_rel(f"autocast step {step} y vs masked dense", y, expected)


# ---- the bias in the epilogue ----

@pytest.mark.parametrize("plans", [False, True], ids=["torch_mm", "plan_cache"])
def test_bias_fused_equals_bias_added(plans):
    require("cslt", plans)
    backend = CuSparseLtBackend(True, "cslt", plans=plans)
    w, x = randn(4096, 1024, seed=4), randn(TOKENS, 1024, seed=5)
    bias = randn(4096, seed=6, scale=4.0)  # one value per output feature: applied along tokens it is wrong
    _, prepared = backend.prepare_weight(w)
    exact = x.float() @ prepared.masked().float().t() + bias.float()
    fused = backend.linear(x, prepared, bias)
    added = backend.linear(x, prepared, None) + bias
    assert_close_rel("fused bias vs added bias", fused, added)
    fused_error, added_error = relative_error(fused, exact), relative_error(added, exact)
    assert fused_error < 5e-3, f"fused bias: relative error {fused_error:.3g} vs fp32 X W_s^T + b"
    # the epilogue adds in fp32 before the one rounding, so it cannot be worse than add-after-round
    assert fused_error <= added_error * 1.05, f"fused {fused_error:.3g} is less accurate than added {added_error:.3g}"


def test_plan_cache_equals_torch_op_bit_for_bit():
    require("cslt", plans=True)
    w, x = randn(4096, 1024, seed=7), randn(TOKENS + 8, 1024, seed=8)  # 1584 rows: a multiple of 16
    bias = randn(4096, seed=9)
    compressed = torch._cslt_compress(w * mask_24_transposable(w.abs()))
    for with_bias in (None, bias):
        for alg_id in (0, int(torch._cslt_sparse_mm_search(compressed, x.t(), transpose_result=True))):
            got = cslt_gemm._plans_mm(compressed, x.t(), True, alg_id, with_bias)
            assert_same_bits(f"plan cache vs torch, alg {alg_id}, bias {with_bias is not None}", got,
                             cslt_gemm.torch_mm(compressed, x.t(), True, alg_id, with_bias))


# ---- whole-step CUDA graph capture (what bench.py's graph rows time) ----

@pytest.mark.parametrize("plans", [False, True], ids=["torch_mm", "plan_cache"])
def test_training_step_replays_in_a_cuda_graph(plans):
    require("kernel", plans)
    fast, _ = layer_pair(1024, 4096, "kernel", plans, seed=10)
    x = randn(TOKENS, 1024, seed=11).requires_grad_()
    gy = randn(TOKENS, 4096, seed=12)

    def step():
        x.grad = fast.weight.grad = fast.bias.grad = None
        y = fast(x)
        y.backward(gy)
        return y

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up off the capture: algorithm searches, plans, buffers
        for _ in range(2):
            eager_y = step().detach().clone()
    torch.cuda.current_stream().wait_stream(stream)
    eager_dx = x.grad.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graph_y = step()
    graph.replay()
    torch.cuda.synchronize()
    # Same kernels on the same data: anything but a match means a buffer the graph did not refresh.
    assert_close_rel("graph replay vs eager y", graph_y, eager_y, limit=1e-3)
    assert_close_rel("graph replay vs eager dx", x.grad, eager_dx, limit=1e-3)
