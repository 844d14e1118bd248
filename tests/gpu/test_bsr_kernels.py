"""The block-sparse kernels (kernels/bsr_matmul.py), their autograd linear and their tuning cache.

CPU: the kernels run under Triton's interpreter in one child process (TRITON_INTERPRET=1 must be set
before Triton is imported) and must equal masked dense in float64: forward with bias and GELU, the
input grad, and the autograd linear's gradients of x, W, bias and a learned block mask, on random
shapes and masks with empty and full block rows and columns. fp16 only there: Triton 3.8's interpreter
multiplies bf16 wrongly (relative error ~1e10 on a plain tl.dot); bf16 is checked on the GPU.
GPU (-m gpu): the compiled kernels in bf16 and fp16, SparseLinear on the `auto` route, the index
rebuilt inside a CUDA graph, and the tuning file.
"""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from sparsetrain.sparse.block import expand_block_mask
from sparsetrain.sparse.layers.blocks import _masked_weight

triton_missing = importlib.util.find_spec("triton") is None
needs_triton = pytest.mark.skipif(triton_missing, reason="triton is not installed")


def _relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.double()
    return float((got.double() - ref).norm() / ref.norm().clamp_min(1e-30))


def _block_mask(out_blocks: int, in_blocks: int, seed: int) -> torch.Tensor:
    """Random block mask with an empty block row and a full one, and an empty block column."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(out_blocks, in_blocks, generator=g) < 0.4
    mask[0] = False
    if out_blocks > 1:
        mask[1] = True
    if in_blocks > 2:
        mask[:, 2] = False
        mask[1, 2] = True  # the full row stays full
    return mask


def _case(seed: int, block_size: int, dtype=torch.float16):
    """x, W, bias, gy and a block mask of a random shape; rows are not a multiple of any tile."""
    g = torch.Generator().manual_seed(seed)
    out_blocks, in_blocks = (int(v) for v in torch.randint(1, 5, (2,), generator=g))
    out_blocks += 1  # at least an empty and a full block row
    rows = int(torch.randint(1, 150, (1,), generator=g))
    out_f, in_f = out_blocks * block_size, in_blocks * block_size
    x = torch.randn(rows, in_f, generator=g).to(dtype)
    w = (torch.randn(out_f, in_f, generator=g) / in_f ** 0.5).to(dtype)
    bias = torch.randn(out_f, generator=g).to(dtype)
    gy = torch.randn(rows, out_f, generator=g).to(dtype)
    return x, w, bias, gy, _block_mask(out_blocks, in_blocks, seed)


def _unaligned_copy(x: torch.Tensor) -> torch.Tensor:
    """x's values in a view whose base is 2 bytes past a 16-byte boundary (rows stay 16-byte multiples)."""
    wider = torch.zeros(x.shape[0], x.shape[1] + 8, dtype=x.dtype)
    wider[:, 1:x.shape[1] + 1] = x
    return wider[:, 1:x.shape[1] + 1]


def _gelu_input(rows: int, features: int) -> torch.Tensor:
    """A pre-activation h spanning GELU's curved part (where GELU' moves from 0 to 1) and both tails."""
    g = torch.Generator().manual_seed(rows)
    return (3 * torch.randn(rows, features, generator=g)).half()


def _mlp_case(b: int):
    """x, (W1, bias1, block mask1), (W2, bias2, block mask2) and gy of a block-sparse MLP d -> hidden -> d; each
    mask has an empty and a full block row."""
    x, w1, bias1, _, mask1 = _case(31, b)  # 145 rows: a full and a partial row tile
    hidden, d = w1.shape
    g = torch.Generator().manual_seed(b)
    w2 = (torch.randn(d, hidden, generator=g) / hidden ** 0.5).half()
    bias2 = torch.randn(d, generator=g).half()
    mask2 = _block_mask(d // b, hidden // b, seed=b + 1)
    gy = torch.randn(x.shape[0], d, generator=g).half()
    return x, (w1, bias1, mask1), (w2, bias2, mask2), gy


# --------------------------------------------------------------------- the interpreter's child process
def _config(fields):
    """A KernelConfig from a plain tuple (the child's inputs load with weights_only); None: the default."""
    from sparsetrain.gpu.kernels.bsr_autotune import KernelConfig
    return None if fields is None else KernelConfig(*fields)


def _child_forward(x, w, bias, block_mask, block_size, gelu, config=None):
    from sparsetrain.gpu.kernels.bsr_matmul import block_sparse_linear, index_from_block_mask
    return block_sparse_linear(x, w, index_from_block_mask(block_mask, block_size), bias, gelu=gelu,
                               config=_config(config))


def _child_forward_without_tma(x, w, block_mask, block_size, config):
    """The forward with the TMA kernel made to fail if launched: the config must fall back to the pointer kernel."""
    from sparsetrain.gpu.kernels import bsr_matmul

    class NotLaunchable:
        def __getitem__(self, grid):
            raise AssertionError("the TMA kernel was launched on operands it cannot address")
    bsr_matmul._block_sparse_mm_tma_kernel = NotLaunchable()
    return _child_forward(x, w, None, block_mask, block_size, False, config)


def _child_input_grad(gy, w, block_mask, block_size, config=None):
    from sparsetrain.gpu.kernels.bsr_matmul import block_sparse_input_grad, index_from_block_mask
    return block_sparse_input_grad(gy, w, index_from_block_mask(block_mask, block_size), config=_config(config))


def _child_weight_grad(gy, x, block_mask, block_size, config=None):
    from sparsetrain.gpu.kernels.bsr_matmul import block_sparse_weight_grad, index_from_block_mask
    return block_sparse_weight_grad(gy, x, index_from_block_mask(block_mask, block_size), config=_config(config))


def _child_masked_autograd(x, w, bias, gy, block_mask, block_size):
    """grad_mode "masked" with a stored (bool) block mask: the weight grad runs on the kernel."""
    from sparsetrain.gpu.kernels.bsr_matmul import index_from_block_mask
    from sparsetrain.sparse.block_linear import block_sparse_linear
    x, w, bias = (t.clone().requires_grad_(True) for t in (x, w, bias))
    y = block_sparse_linear(x, w, bias, block_mask, index_from_block_mask(block_mask, block_size), "masked")
    y.backward(gy)
    return x.grad, w.grad, bias.grad


def _child_autograd(x, w, bias, gy, block_mask, block_size, grad_mode):
    from sparsetrain.gpu.kernels.bsr_matmul import index_from_block_mask
    from sparsetrain.sparse.block_linear import block_sparse_linear
    x, w, bias = (t.clone().requires_grad_(True) for t in (x, w, bias))
    learned = block_mask.float().requires_grad_(True)  # the STE mask of DRESS scores
    y = block_sparse_linear(x.view(1, *x.shape), w, bias, learned, index_from_block_mask(block_mask, block_size),
                            grad_mode)
    y.backward(gy.view(1, *gy.shape))
    return y[0].detach(), x.grad, w.grad, bias.grad, learned.grad


def _child_gelu_input_grad(gy, w, h, block_mask, block_size, config=None):
    from sparsetrain.gpu.kernels.bsr_matmul import block_sparse_input_grad, index_from_block_mask
    return block_sparse_input_grad(gy, w, index_from_block_mask(block_mask, block_size), gelu_input=h,
                                   config=_config(config))


def _child_mlp(x, fc1, fc2, gy, block_size, grad_mode):
    """The fused fc1 -> GELU -> fc2 node: output and the gradients of x and of each layer's W, bias, mask."""
    from sparsetrain.gpu.kernels.bsr_matmul import index_from_block_mask
    from sparsetrain.sparse.block_linear import block_sparse_mlp
    x = x.clone().requires_grad_(True)
    leaves, operands = [], []
    for w, bias, mask in (fc1, fc2):
        w, bias = (t.clone().requires_grad_(True) for t in (w, bias))
        learned = mask.float().requires_grad_(True)  # the STE mask of DRESS scores
        leaves += [w, bias, learned]
        operands.append((w, bias, learned, index_from_block_mask(mask, block_size)))
    y = block_sparse_mlp(x.view(1, *x.shape), *operands, grad_mode=grad_mode)
    y.backward(gy.view(1, *gy.shape))
    return y[0].detach(), x.grad, *(leaf.grad for leaf in leaves)


def _child_export_round_trip(w, block_mask, block_size, x):
    """Export's bsr parts -> load's dense weight and mask -> the kernel's index -> the forward."""
    from sparsetrain.export import compress_bsr, dense_weights
    from sparsetrain.gpu.kernels.bsr_matmul import block_sparse_linear, index_from_block_mask
    b = block_size
    parts = compress_bsr(w, expand_block_mask(block_mask, b), b, "fc")
    tensors = {f"fc.weight.{name}": value for name, value in parts.items()}
    layers = [{"name": "fc", "shape": list(w.shape), "storage": "bsr"}]
    weights, masks = dense_weights(tensors, layers)
    m, k = w.shape
    loaded_blocks = masks["fc"].view(m // b, b, k // b, b).any(dim=3).any(dim=1)
    y = block_sparse_linear(x, weights["fc.weight"], index_from_block_mask(loaded_blocks, b))
    return y, masks["fc"], weights["fc.weight"]


def _interpreter_worker(inputs, outputs):
    results = {}
    for name, (fn, args) in torch.load(inputs).items():
        try:
            results[name] = globals()[fn](*args)
        except Exception as e:  # noqa: BLE001 - re-raised by the test that asked for this call
            results[name] = f"{type(e).__name__}: {e}"
    torch.save(results, outputs)


class _Interpreted:
    """Queue calls (`add`), run them all in one child under TRITON_INTERPRET=1 (`run`), read with [name]."""

    def __init__(self):
        self.calls, self.outputs = {}, None

    def add(self, name, fn, *args):
        self.calls[name] = (fn.__name__, args)

    def run(self, tmp_path):
        inputs, outputs = tmp_path / "calls.pt", tmp_path / "outputs.pt"
        torch.save(self.calls, inputs)
        env = dict(os.environ, TRITON_INTERPRET="1")
        done = subprocess.run([sys.executable, __file__, str(inputs), str(outputs)], env=env, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        self.outputs = torch.load(outputs)

    def __getitem__(self, name):
        result = self.outputs[name]
        if isinstance(result, str):
            raise RuntimeError(result)
        return result


BLOCK_SIZES = (16, 32, 64)
SEEDS = (0, 1)
EPILOGUES = {"plain": (False, False), "bias": (True, False), "bias+gelu": (True, True)}
# The two kernels: pointer loads (the default off sm90 and inside an untuned capture) and TMA descriptors.
KERNELS = {"pointer": None, "tma": (64, 4, 3, True)}
# Weight grad: one program per kept block (stores in the weight's dtype), and rows split three ways (fp32 atomics;
# 16-row chunks so that the slices end mid-way through the rows).
WEIGHT_GRAD_CONFIGS = {"one-slice": (32, 4, 2, False, 1), "split": (16, 4, 2, False, 3)}


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    if triton_missing:
        pytest.skip("triton is not installed")
    runner = _Interpreted()
    for b in BLOCK_SIZES:
        for seed in SEEDS:
            x, w, bias, gy, mask = _case(seed, b)
            for kernel, config in KERNELS.items():
                for epilogue, (with_bias, gelu) in EPILOGUES.items():
                    runner.add(f"fwd-{kernel}-{b}-{seed}-{epilogue}", _child_forward, x, w,
                               bias if with_bias else None, mask, b, gelu, config)
                runner.add(f"dx-{kernel}-{b}-{seed}", _child_input_grad, gy, w, mask, b, config)
        for grad_mode in ("ste", "masked"):
            x, w, bias, gy, mask = _case(7, b)
            runner.add(f"autograd-{b}-{grad_mode}", _child_autograd, x, w, bias, gy, mask, b, grad_mode)
        runner.add(f"masked-autograd-{b}", _child_masked_autograd, *_case(5, b), b)
        for seed in SEEDS:
            x, _, _, gy, mask = _case(seed, b)
            for name, config in WEIGHT_GRAD_CONFIGS.items():
                runner.add(f"dw-{name}-{b}-{seed}", _child_weight_grad, gy, x, mask, b, config)
    for b in BLOCK_SIZES:
        _, w, _, gy, mask = _case(11, b)
        for kernel, config in KERNELS.items():
            runner.add(f"gelu-dx-{kernel}-{b}", _child_gelu_input_grad, gy, w, _gelu_input(gy.shape[0], w.shape[1]),
                       mask, b, config)
        for grad_mode in ("ste", "masked"):
            x, fc1, fc2, gy = _mlp_case(b)
            runner.add(f"mlp-{b}-{grad_mode}", _child_mlp, x, fc1, fc2, gy, b, grad_mode)
    x, w, _, _, mask = _case(3, 16)
    runner.add("all-pruned", _child_forward, x, w, None, torch.zeros_like(mask), 16, False)
    runner.add("all-kept", _child_input_grad, torch.randn(x.shape[0], w.shape[0]).half(), w, torch.ones_like(mask),
               16)
    runner.add("export", _child_export_round_trip, w, mask, 16, x)
    runner.add("tma-unaligned", _child_forward_without_tma, _unaligned_copy(x), w, mask, 16, KERNELS["tma"])
    runner.run(tmp_path_factory.mktemp("bsr-interpreter"))
    return runner


def _reference_forward(x, w, bias, mask, b, gelu):
    y = x.double() @ (w.double() * expand_block_mask(mask, b)).t()
    if bias is not None:
        y = y + bias.double()
    return F.gelu(y) if gelu else y


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("b", BLOCK_SIZES)
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("epilogue", EPILOGUES)
def test_forward_equals_masked_dense(interpreted, kernel, b, seed, epilogue):
    x, w, bias, _, mask = _case(seed, b)
    with_bias, gelu = EPILOGUES[epilogue]
    y = interpreted[f"fwd-{kernel}-{b}-{seed}-{epilogue}"]
    assert y.dtype == x.dtype and y.shape == (x.shape[0], w.shape[0])
    assert _relative_error(y, _reference_forward(x, w, bias if with_bias else None, mask, b, gelu)) < 2e-3
    # The empty block row gets exactly the bias (or zeros): its blocks are never read.
    expected_row = F.gelu(bias.float()) if gelu else (bias.float() if with_bias else torch.zeros(b))
    torch.testing.assert_close(y[:, :b].float(), expected_row[:b].expand(x.shape[0], b).float(), atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("b", BLOCK_SIZES)
@pytest.mark.parametrize("seed", SEEDS)
def test_input_grad_equals_masked_dense(interpreted, kernel, b, seed):
    _, w, _, gy, mask = _case(seed, b)
    dx = interpreted[f"dx-{kernel}-{b}-{seed}"]
    ref = gy.double() @ (w.double() * expand_block_mask(mask, b))
    assert dx.shape == (gy.shape[0], w.shape[1]) and _relative_error(dx, ref) < 2e-3


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("b", BLOCK_SIZES)
def test_input_grad_with_the_gelu_derivative_epilogue_equals_masked_dense(interpreted, kernel, b):
    """gelu_input=h: dx = (gy @ W_s) * GELU'(h), the dL/dh that GELU's own backward would give."""
    _, w, _, gy, mask = _case(11, b)
    h = _gelu_input(gy.shape[0], w.shape[1]).double().requires_grad_(True)
    F.gelu(h).backward(gy.double() @ (w.double() * expand_block_mask(mask, b)))
    dh = interpreted[f"gelu-dx-{kernel}-{b}"]
    assert dh.shape == h.shape and dh.dtype == gy.dtype and _relative_error(dh, h.grad) < 2e-3


@pytest.mark.parametrize("b", BLOCK_SIZES)
@pytest.mark.parametrize("grad_mode", ["ste", "masked"])
def test_fused_mlp_matches_two_emulated_linears_and_a_gelu(interpreted, b, grad_mode):
    """The one-node MLP gives the output and every gradient (x; W, bias and learned block mask of both
    layers) of fc2(GELU(fc1(x))) on the emulated route, in float64."""
    x, fc1, fc2, gy = _mlp_case(b)
    got = interpreted[f"mlp-{b}-{grad_mode}"]
    xr = x.double().requires_grad_(True)
    leaves, h = [], xr
    for i, (w, bias, mask) in enumerate((fc1, fc2)):
        wr, br, mask_r = (t.double().requires_grad_(True) for t in (w, bias, mask))
        leaves += [wr, br, mask_r]
        h = F.linear(h, _masked_weight(wr, expand_block_mask(mask_r, b), grad_mode), br)
        h = F.gelu(h) if i == 0 else h
    h.backward(gy.double())
    refs = [h, xr.grad, *(leaf.grad for leaf in leaves)]
    assert len(got) == len(refs)
    for got_t, ref in zip(got, refs):
        assert got_t.shape == ref.shape and _relative_error(got_t, ref.detach()) < 3e-3


@pytest.mark.parametrize("config", WEIGHT_GRAD_CONFIGS)
@pytest.mark.parametrize("b", BLOCK_SIZES)
@pytest.mark.parametrize("seed", SEEDS)
def test_weight_grad_equals_masked_dense(interpreted, config, b, seed):
    """dW = gy^T x at the kept blocks, exactly zero at the pruned ones (the empty block row included)."""
    x, w, _, gy, mask = _case(seed, b)
    dw = interpreted[f"dw-{config}-{b}-{seed}"]
    full = expand_block_mask(mask, b)
    assert dw.shape == w.shape and dw.dtype == gy.dtype
    assert _relative_error(dw, (gy.double().t() @ x.double()) * full) < 2e-3
    assert not dw[~full].any()


@pytest.mark.parametrize("b", BLOCK_SIZES)
def test_masked_linear_with_a_stored_mask_takes_its_weight_grad_from_the_kernel(interpreted, b):
    x, w, bias, gy, mask = _case(5, b)
    gx, gw, gb = interpreted[f"masked-autograd-{b}"]
    xr, wr, br = (t.double().requires_grad_(True) for t in (x, w, bias))
    F.linear(xr, _masked_weight(wr, expand_block_mask(mask, b).double(), "masked"), br).backward(gy.double())
    for got, ref in ((gx, xr.grad), (gw, wr.grad), (gb, br.grad)):
        assert got.shape == ref.shape and _relative_error(got, ref) < 3e-3


def test_no_kept_block_gives_zeros_and_all_kept_is_dense(interpreted):
    x, w, _, _, mask = _case(3, 16)
    assert torch.equal(interpreted["all-pruned"], torch.zeros(x.shape[0], w.shape[0], dtype=x.dtype))
    dx = interpreted["all-kept"]
    assert dx.shape == (x.shape[0], w.shape[1]) and torch.isfinite(dx).all()


def test_a_tma_config_on_operands_tma_cannot_address_runs_the_pointer_kernel(interpreted):
    x, w, _, _, mask = _case(3, 16)
    unaligned = _unaligned_copy(x)
    assert unaligned.data_ptr() % 16  # the premise: TMA needs a 16-byte aligned base
    assert _relative_error(interpreted["tma-unaligned"], _reference_forward(unaligned, w, None, mask, 16, False)) < 2e-3


@pytest.mark.parametrize("b", BLOCK_SIZES)
@pytest.mark.parametrize("grad_mode", ["ste", "masked"])
def test_autograd_linear_matches_the_emulated_route(interpreted, b, grad_mode):
    """Gradients of x, W, bias and a learned (float, STE) block mask equal those of the emulated route,
    `F.linear(x, _masked_weight(W, expand(mask)), b)`, computed here in float64."""
    x, w, bias, gy, mask = _case(7, b)
    y, gx, gw, gb, gmask = interpreted[f"autograd-{b}-{grad_mode}"]
    xr, wr, br = (t.double().requires_grad_(True) for t in (x, w, bias))
    mask_r = mask.double().requires_grad_(True)
    yr = F.linear(xr, _masked_weight(wr, expand_block_mask(mask_r, b), grad_mode), br)
    yr.backward(gy.double())
    for got, ref in ((y, yr), (gx, xr.grad), (gw, wr.grad), (gb, br.grad), (gmask, mask_r.grad)):
        assert got.shape == ref.shape and _relative_error(got, ref.detach()) < 3e-3


def test_exported_bsr_loads_into_the_kernel_format(interpreted):
    """The exporter's bsr parts load back to the same weight and block mask, and the kernel's forward on them
    equals the training layer's masked dense forward."""
    x, w, _, _, mask = _case(3, 16)
    y, loaded_mask, loaded_weight = interpreted["export"]
    full_mask = expand_block_mask(mask, 16)
    assert torch.equal(loaded_mask, full_mask)
    assert torch.equal(loaded_weight, w * full_mask)
    assert _relative_error(y, _reference_forward(x, w, None, mask, 16, False)) < 2e-3


# --------------------------------------------------------------------- host-side: index, checks, config
@needs_triton
def test_index_lists_kept_blocks_first_in_order():
    from sparsetrain.gpu.kernels.bsr_matmul import index_from_block_mask
    mask = torch.tensor([[False, True, False, True], [False, False, False, False], [True, True, True, True]])
    index = index_from_block_mask(mask, 32)
    assert index.row_counts.tolist() == [2, 0, 4] and index.col_counts.tolist() == [1, 2, 1, 2]
    assert index.row_blocks[0, :2].tolist() == [1, 3] and index.row_blocks[2].tolist() == [0, 1, 2, 3]
    assert index.col_blocks[1, :2].tolist() == [0, 2] and index.col_blocks[3, :2].tolist() == [0, 2]
    # every row is a permutation: pruned blocks follow the kept ones
    assert torch.equal(index.row_blocks.sort(1).values, torch.arange(4, dtype=torch.int32).expand(3, 4))
    assert index.weight_shape == (96, 128) and index.density == pytest.approx(6 / 12)
    assert index_from_block_mask(mask, 32, density=0.1).density == 0.1


@needs_triton
def test_index_of_random_masks_matches_nonzero():
    from sparsetrain.gpu.kernels.bsr_matmul import index_from_block_mask
    mask = torch.rand(37, 23, generator=torch.Generator().manual_seed(0)) < 0.3
    index = index_from_block_mask(mask, 16)
    for r in range(mask.shape[0]):
        count = int(index.row_counts[r])
        assert index.row_blocks[r, :count].tolist() == mask[r].nonzero().flatten().tolist()
    for c in range(mask.shape[1]):
        count = int(index.col_counts[c])
        assert index.col_blocks[c, :count].tolist() == mask[:, c].nonzero().flatten().tolist()


@needs_triton
def test_bad_operands_are_named_before_any_launch():
    from sparsetrain.gpu.kernels.bsr_matmul import block_sparse_input_grad, block_sparse_linear, index_from_block_mask
    mask = torch.ones(2, 3, dtype=torch.bool)
    index = index_from_block_mask(mask, 16)
    w = torch.randn(32, 48).half()
    with pytest.raises(ValueError, match="fp16/bf16"):
        block_sparse_linear(torch.randn(4, 48), w.float(), index)
    with pytest.raises(ValueError, match="index was built for"):
        block_sparse_linear(torch.randn(4, 32).half(), torch.randn(32, 32).half(), index)
    with pytest.raises(ValueError, match="the weight needs 32"):
        block_sparse_input_grad(torch.randn(4, 48).half(), w, index)
    with pytest.raises(ValueError, match="bias must be"):
        block_sparse_linear(torch.randn(4, 48).half(), w, index, bias=torch.randn(32))
    with pytest.raises(ValueError, match="kernels serve blocks of"):
        index_from_block_mask(mask, 8)
    with pytest.raises(ValueError, match="2-D bool"):
        index_from_block_mask(mask.float(), 16)


def test_block_backend_is_validated_and_resolved_with_a_reason():
    from sparsetrain.gpu.backends.block_routes import kernel_serves, resolve_block_route
    from sparsetrain.sparse.config import BlockConfig, Semi24Config
    assert BlockConfig(backend="triton_bsr").backend == "triton_bsr"
    with pytest.raises(ValueError, match="not supported"):
        BlockConfig(backend="cusparselt")
    with pytest.raises(ValueError, match="runs block sparsity"):
        Semi24Config(backend="triton_bsr")
    route, reason = resolve_block_route("auto", 64, "cpu", torch.bfloat16)
    assert route == "emulated" and "need CUDA" in reason
    route, reason = resolve_block_route("auto", 8, "cpu", torch.float32)
    assert "float32 is not fp16/bf16" in reason and "block size 8" in reason
    with pytest.raises(ValueError, match="sparsity.backend=triton_bsr cannot run.*auto or emulated"):
        resolve_block_route("triton_bsr", 64, "cpu", torch.bfloat16)
    assert kernel_serves("triton_bsr", "triton_bsr", 0.1) and not kernel_serves("auto", "triton_bsr", 0.5)
    assert kernel_serves("auto", "triton_bsr", 0.9) and not kernel_serves("auto", "emulated", 0.9)


def test_block_layer_on_cpu_runs_emulated_and_forced_kernels_fail_at_first_forward():
    from torch import nn

    from sparsetrain.sparse.config import BlockConfig
    from sparsetrain.sparse.layers import SparseLinear
    layer = SparseLinear.from_dense(nn.Linear(64, 32), BlockConfig(block_size=16, sparsity=0.5), "fc")
    assert layer.describe()["backend"] == "emulated" and "need CUDA" in layer.describe()["reason"]
    forced = SparseLinear.from_dense(nn.Linear(64, 32), BlockConfig(block_size=16, backend="triton_bsr"), "fc")
    assert forced.backend_name == "triton_bsr" and "first forward" in forced.backend_reason
    with pytest.raises(ValueError, match="triton_bsr cannot run"):
        forced(torch.randn(2, 64))


def test_fused_gelu_keeps_the_mlp_function():
    from timm.layers import Mlp

    from sparsetrain.sparse import sparsify_
    from sparsetrain.sparse.block_linear import fuse_mlp_gelu_
    from sparsetrain.sparse.config import BlockConfig
    torch.manual_seed(0)
    mlp = Mlp(64, 128)
    x = torch.randn(3, 5, 64)
    sparsify_(mlp, BlockConfig(block_size=16, sparsity=0.5))
    mlp.eval()
    expected = mlp(x)
    assert fuse_mlp_gelu_(mlp) == [""] and isinstance(mlp.act, torch.nn.Identity) and mlp.fc1.fuse_gelu
    torch.testing.assert_close(mlp(x), expected)


def test_fusing_block_mlps_keeps_parameters_keys_and_function():
    """fuse_block_mlps_ swaps only timm Mlps whose fc1 and fc2 are block layers with an exact GELU between;
    state-dict keys stay, and off the kernels (here: the CPU) the fused MLP runs its layers one by one,
    also after densify_."""
    from timm.layers import Mlp

    from sparsetrain.sparse import densify_, sparsify_
    from sparsetrain.sparse.config import BlockConfig, Semi24Config
    from sparsetrain.sparse.fused_mlp import BlockSparseMlp, fuse_block_mlps_
    torch.manual_seed(0)
    model = torch.nn.Sequential(Mlp(64, 128), Mlp(64, 128, act_layer=torch.nn.ReLU), Mlp(64, 128, drop=0.1))
    sparsify_(model, BlockConfig(block_size=16, sparsity=0.5, criterion="scores"), skip_dense_by_default=False)
    model.train()
    x = torch.randn(3, 5, 64)
    keys = list(model.state_dict())

    def run():
        torch.manual_seed(1)  # the third MLP's dropout draws the same
        return model(x)

    expected = run()
    assert fuse_block_mlps_(model) == ["0"] and isinstance(model[0], BlockSparseMlp)
    assert list(model.state_dict()) == keys and fuse_block_mlps_(model) == []
    torch.testing.assert_close(run(), expected)
    model[0](x).sum().backward()
    assert model[0].fc1.block_scores.grad is not None and model[0].fc2.weight.grad is not None
    densify_(model)
    torch.testing.assert_close(run(), expected)
    two_four = Mlp(64, 128)
    sparsify_(two_four, Semi24Config(), skip_dense_by_default=False)
    assert fuse_block_mlps_(two_four) == []
    from timm.layers import GluMlp  # fc1 -> GELU -> fc2 by its attribute names, but it gates half of fc1's output
    gated = torch.nn.Sequential(GluMlp(64, 128, act_layer=torch.nn.GELU))
    sparsify_(gated, BlockConfig(block_size=16, sparsity=0.5), skip_dense_by_default=False)
    assert fuse_block_mlps_(gated) == []


# --------------------------------------------------------------------- tuning cache (no GPU needed)
@pytest.fixture
def fresh_tuning(tmp_path, monkeypatch):
    if triton_missing:
        pytest.skip("triton is not installed")
    from sparsetrain.gpu.kernels import bsr_autotune
    monkeypatch.setenv("SPARSETRAIN_CACHE", str(tmp_path))
    monkeypatch.setattr(bsr_autotune, "_entries", None)
    return bsr_autotune


def test_tuning_is_remembered_in_memory_and_in_the_json_file(fresh_tuning, monkeypatch):
    tuning = fresh_tuning
    key = tuning.TuningKey("forward|4096x1024|b64|density0.1|rows16384|bfloat16|none|GPU|triton3")
    other = tuning.TuningKey("input_grad|4096x1024|b64|density0.1|rows16384|bfloat16|none|GPU|triton3")
    tuning.cache_path().parent.mkdir(parents=True, exist_ok=True)
    tuning.cache_path().write_text(json.dumps({other.text: {"block_m": 64, "num_warps": 4, "num_stages": 4}}))
    calls = []
    best = tuning.KernelConfig(256, 8, 3)
    monkeypatch.setattr(tuning, "tune", lambda run, candidates: (calls.append(run) or best, {best: 0.05}))
    assert tuning.pick(key, run=lambda config: None) == best
    assert tuning.pick(key, run=lambda config: None) == best and len(calls) == 1
    assert tuning.pick(other, run=lambda config: None) == tuning.KernelConfig(64, 4, 4)
    stored = json.loads(tuning.cache_path().read_text())
    assert stored[key.text] == {"block_m": 256, "num_warps": 8, "num_stages": 3, "tma": False, "split_k": 1}
    assert other.text in stored
    monkeypatch.setattr(tuning, "_entries", None)  # a new process reads the file
    assert tuning.entries()[key.text] == best


def test_tuning_passes_over_candidates_that_cannot_run_here(monkeypatch):
    """Too much shared memory, operands TMA cannot address, or a Triton/GPU without tensor descriptors: the
    candidate drops out. A pointer kernel that fails to compile is a bug and surfaces."""
    import ast

    from triton.compiler.errors import CompilationError
    from triton.runtime.errors import OutOfResources

    from sparsetrain.gpu.kernels import bsr_autotune as tuning
    cfg = tuning.KernelConfig
    failures = {cfg(64, 4, 2): None, cfg(256, 8, 4): OutOfResources(300000, 232448, "shared memory"),
                cfg(64, 4, 3, tma=True): tuning.ConfigUnsupported("unaligned"),
                cfg(128, 4, 5, tma=True): CompilationError("", ast.parse("x"), "no descriptors here"),
                cfg(128, 4, 2, tma=True): None}
    monkeypatch.setattr(tuning.triton.testing, "do_bench", lambda fn, **kwargs: fn() or 1.0)

    def run(config):
        if failures[config] is not None:
            raise failures[config]
    best, timings = tuning.tune(run, tuple(failures))
    assert set(timings) == {cfg(64, 4, 2), cfg(128, 4, 2, tma=True)} and best == cfg(64, 4, 2)

    failures[cfg(64, 4, 2)] = CompilationError("", ast.parse("x"), "a bug in the pointer kernel")
    with pytest.raises(CompilationError):
        tuning.tune(run, tuple(failures))


def test_a_damaged_tuning_file_means_retuning_not_failing(fresh_tuning):
    tuning = fresh_tuning
    tuning.cache_path().parent.mkdir(parents=True, exist_ok=True)
    tuning.cache_path().write_text("{not json")
    assert tuning.entries() == {}


def test_tuning_keys_bucket_rows_and_density():
    if triton_missing:
        pytest.skip("triton is not installed")
    from sparsetrain.gpu.kernels import bsr_autotune
    assert bsr_autotune.density_bucket(0.1) == 0.1 and bsr_autotune.density_bucket(0.23) == 0.2
    assert bsr_autotune.density_bucket(0.0) == 0.05 and bsr_autotune.density_bucket(0.96) == 1.0


# --------------------------------------------------------------------- GPU
def _gpu():
    from sparsetrain.gpu import kernels
    if not kernels.available():
        pytest.skip("needs Triton and a CUDA GPU (sm80+)")


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["pointer", "tma"])
@pytest.mark.parametrize("b", BLOCK_SIZES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1000, 256, 192), (12608, 1024, 4096)])
def test_gpu_kernels_equal_masked_dense(kernel, b, dtype, shape):
    _gpu()
    from sparsetrain.gpu.kernels import bsr_autotune
    from sparsetrain.gpu.kernels.bsr_matmul import block_sparse_input_grad, block_sparse_linear, index_from_block_mask
    rows, out_f, in_f = shape
    g = torch.Generator(device="cuda").manual_seed(b)
    x = torch.randn(rows, in_f, device="cuda", generator=g).to(dtype)
    w = (torch.randn(out_f, in_f, device="cuda", generator=g) / in_f ** 0.5).to(dtype)
    bias = torch.randn(out_f, device="cuda", generator=g).to(dtype)
    gy = torch.randn(rows, out_f, device="cuda", generator=g).to(dtype)
    mask = _block_mask(out_f // b, in_f // b, seed=b).cuda()
    index = index_from_block_mask(mask, b)
    w_masked = w.double() * expand_block_mask(mask, b)
    torch.cuda.empty_cache()
    torch.full((1 << 26,), float("nan"), device="cuda")  # poison freed memory: an unwritten output shows
    # Tuning is tested on its own; here it would only cost time. Deep pipelines, as the tuner picks on sm90.
    config = bsr_autotune.DEFAULT if kernel == "pointer" else bsr_autotune.KernelConfig(128, 4, 5, tma=True)
    y = block_sparse_linear(x, w, index, bias, gelu=True, config=config)
    assert _relative_error(y, F.gelu(x.double() @ w_masked.t() + bias.double())) < 1e-2
    y = block_sparse_linear(x, w, index, config=config)
    assert _relative_error(y, x.double() @ w_masked.t()) < 1e-2
    dx = block_sparse_input_grad(gy, w, index, config=config)
    assert _relative_error(dx, gy.double() @ w_masked) < 1e-2
    h = (3 * torch.randn(rows, in_f, device="cuda", generator=g)).to(dtype).requires_grad_(True)
    F.gelu(h.double()).backward(gy.double() @ w_masked)
    dh = block_sparse_input_grad(gy, w, index, gelu_input=h.detach(), config=config)
    assert _relative_error(dh, h.grad) < 1e-2


def _bf16_step(module, x, tensors_of):
    """Output and gradients (x's, then those of tensors_of(module)) of one bf16-autocast forward + backward."""
    xi = x.clone().requires_grad_(True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = module(xi)
    y.float().square().mean().backward()
    return y, [xi.grad, *(t.grad for t in tensors_of(module))]


@pytest.mark.gpu
@pytest.mark.parametrize("b", [32, 64])
def test_gpu_weight_grad_equals_masked_dense_and_tunes_among_its_own_candidates(tmp_path, monkeypatch, b):
    """bf16 at a ViT-L MLP shape, 90% of the blocks pruned: dW at the kept blocks equals gy^T x, zeros elsewhere;
    the tuned configuration is one of the weight grad's candidates; and under deterministic algorithms the
    result is bit-identical between calls."""
    _gpu()
    from sparsetrain.gpu.kernels import bsr_autotune
    from sparsetrain.gpu.kernels.bsr_matmul import block_sparse_weight_grad, index_from_block_mask
    monkeypatch.setenv("SPARSETRAIN_CACHE", str(tmp_path))
    monkeypatch.setattr(bsr_autotune, "_entries", None)
    torch.manual_seed(b)
    gy = torch.randn(12608, 4096, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(12608, 1024, device="cuda", dtype=torch.bfloat16)
    mask = torch.rand(4096 // b, 1024 // b, device="cuda") < 0.1
    index = index_from_block_mask(mask, b, density=0.1)
    dw = block_sparse_weight_grad(gy, x, index)
    full = expand_block_mask(mask, b)
    assert dw.dtype == torch.bfloat16 and not dw[~full].any()
    assert _relative_error(dw, (gy.float().t() @ x.float()) * full) < 1e-2
    (key, config), = json.loads((tmp_path / bsr_autotune.CACHE_FILE).read_text()).items()
    assert key.startswith(f"weight_grad|4096x1024|b{b}|density0.1|")
    assert bsr_autotune.KernelConfig(**config) in bsr_autotune.WEIGHT_GRAD_CANDIDATES
    torch.use_deterministic_algorithms(True)
    try:
        assert torch.equal(block_sparse_weight_grad(gy, x, index), block_sparse_weight_grad(gy, x, index))
    finally:
        torch.use_deterministic_algorithms(False)


@pytest.mark.gpu
@pytest.mark.parametrize("criterion", ["magnitude", "scores"])
@pytest.mark.parametrize("grad_mode", ["ste", "masked"])
def test_gpu_sparse_linear_auto_runs_the_kernels_and_matches_emulated(criterion, grad_mode):
    _gpu()
    import copy

    from torch import nn

    from sparsetrain.sparse.config import BlockConfig
    from sparsetrain.sparse.layers import SparseLinear
    torch.manual_seed(0)
    dense = nn.Linear(1024, 4096).cuda()
    config = dict(block_size=64, sparsity=0.9, criterion=criterion, grad_mode=grad_mode)
    fast = SparseLinear.from_dense(copy.deepcopy(dense), BlockConfig(**config), "fast")
    slow = SparseLinear.from_dense(copy.deepcopy(dense), BlockConfig(**config, backend="emulated"), "slow")
    x = torch.randn(8, 197, 1024, device="cuda")
    learned = ["block_scores"] if criterion == "scores" else []
    outputs = [_bf16_step(layer, x, lambda m: [getattr(m, n) for n in ("weight", "bias", *learned)])
               for layer in (fast, slow)]
    assert fast.describe()["backend"] == "triton_bsr" and "triton_bsr" in fast.describe()["reason"]
    assert torch.equal(fast.mask, slow.mask)
    assert _relative_error(outputs[0][0], outputs[1][0]) < 1e-2
    for got, ref in zip(outputs[0][1], outputs[1][1]):
        assert _relative_error(got, ref) < 2e-2


@pytest.mark.gpu
def test_gpu_auto_leaves_16_blocks_masked_dense_and_forcing_runs_the_kernels():
    _gpu()
    from torch import nn

    from sparsetrain.sparse.config import BlockConfig
    from sparsetrain.sparse.layers import SparseLinear
    x = torch.randn(4, 256, device="cuda", dtype=torch.bfloat16)
    layers = {backend: SparseLinear.from_dense(nn.Linear(256, 256).cuda().bfloat16(),
                                               BlockConfig(block_size=16, sparsity=0.9, backend=backend), backend)
              for backend in ("auto", "triton_bsr")}
    outputs = {backend: layer(x) for backend, layer in layers.items()}
    assert layers["auto"].backend_name == "emulated" and "16x16 blocks measured" in layers["auto"].backend_reason
    assert layers["triton_bsr"].backend_name == "triton_bsr" and outputs["triton_bsr"].shape == (4, 256)


@pytest.mark.gpu
def test_gpu_index_rebuilt_inside_a_cuda_graph_follows_the_mask():
    """The per-step route (index from the mask, then both kernels) captures into one graph, and a replay
    after the mask changed in place computes with the new mask: no host sync, no stale index."""
    _gpu()
    from sparsetrain.gpu.kernels.bsr_matmul import block_sparse_input_grad, block_sparse_linear, index_from_block_mask
    b = 64
    x = torch.randn(4096, 1024, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(4096, 1024, device="cuda", dtype=torch.bfloat16) / 32
    gy = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    mask = torch.rand(64, 16, device="cuda") < 0.1

    def step():
        index = index_from_block_mask(mask, b, density=0.1)
        return block_sparse_linear(x, w, index), block_sparse_input_grad(gy, w, index)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # tunes and compiles outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y, dx = step()
    for _ in range(2):
        mask.copy_(torch.rand(64, 16, device="cuda") < 0.1)
        graph.replay()
        w_masked = w.double() * expand_block_mask(mask, b)
        assert _relative_error(y, x.double() @ w_masked.t()) < 1e-2
        assert _relative_error(dx, gy.double() @ w_masked) < 1e-2


@pytest.mark.gpu
def test_gpu_tuning_is_written_to_the_cache_file(tmp_path, monkeypatch):
    _gpu()
    from sparsetrain.gpu.kernels import bsr_autotune
    from sparsetrain.gpu.kernels.bsr_matmul import block_sparse_linear, index_from_block_mask
    monkeypatch.setenv("SPARSETRAIN_CACHE", str(tmp_path))
    monkeypatch.setattr(bsr_autotune, "_entries", None)
    x = torch.randn(2000, 512, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(256, 512, device="cuda", dtype=torch.bfloat16)
    block_sparse_linear(x, w, index_from_block_mask(torch.rand(8, 16, device="cuda") < 0.2, 32, density=0.2))
    stored = json.loads((tmp_path / bsr_autotune.CACHE_FILE).read_text())
    (key, config), = stored.items()
    assert key.startswith("forward|256x512|b32|density0.2|rows2048|bfloat16|none|")
    assert bsr_autotune.KernelConfig(**config) in bsr_autotune.CANDIDATES


@pytest.mark.gpu
@pytest.mark.parametrize("criterion", ["magnitude", "scores"])
@pytest.mark.parametrize("grad_mode", ["ste", "masked"])
def test_gpu_fused_mlp_equals_the_mlp_run_layer_by_layer(criterion, grad_mode):
    """The one-node block MLP (GELU' in fc2's input-grad kernel) gives the output and gradients of the same
    MLP run layer by layer on the kernels, under bf16 autocast, at ViT-B widths."""
    _gpu()
    import copy

    from timm.layers import Mlp

    from sparsetrain.sparse import sparsify_
    from sparsetrain.sparse.config import BlockConfig
    from sparsetrain.sparse.fused_mlp import BlockSparseMlp, fuse_block_mlps_
    torch.manual_seed(0)
    mlp = Mlp(768, 3072).cuda()
    config = BlockConfig(block_size=64, sparsity=0.9, criterion=criterion, grad_mode=grad_mode)
    sparsify_(mlp, config, skip_dense_by_default=False)
    fused = torch.nn.Sequential(copy.deepcopy(mlp))
    assert fuse_block_mlps_(fused) == ["0"] and isinstance(fused[0], BlockSparseMlp)
    x = torch.randn(8, 197, 768, device="cuda")
    outputs = [_bf16_step(model, x, lambda m: m.parameters()) for model in (mlp, fused)]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert fused[0]._fused_dtype(x) == torch.bfloat16  # the fused node ran above
    assert len(outputs[0][1]) == len(outputs[1][1])
    assert _relative_error(outputs[1][0], outputs[0][0]) < 1e-2
    for got, ref in zip(outputs[1][1], outputs[0][1]):
        assert got is not None and _relative_error(got, ref) < 2e-2


@pytest.mark.gpu
def test_gpu_exported_bsr_model_runs_the_kernels_and_matches_training(tmp_path):
    """A block-sparse ViT exported as bsr loads on CUDA onto the kernels (GELU fused into fc1) and gives the
    training model's outputs."""
    _gpu()
    import safetensors.torch

    from sparsetrain.export import METADATA_FILE, WEIGHTS_FILE, compressed_tensors, load_exported
    from sparsetrain.sparse import sparsify_
    from sparsetrain.sparse.config import BlockConfig
    from sparsetrain.sparse.sparsify import layer_table
    from sparsetrain.models import create_model
    model_args = dict(name="vit_tiny_patch16_224", num_classes=10, in_chans=1, img_size=28, patch_size=7,
                      embed_dim=128, depth=2, num_heads=4, pretrained_path=None)
    torch.manual_seed(0)
    model = create_model(**model_args)
    sparsity = dict(pattern="block", block_size=32, sparsity=0.75, criterion="magnitude", include=["blocks.*.mlp.*"])
    sparsify_(model, BlockConfig(block_size=32, sparsity=0.75), include=["blocks.*.mlp.*"])
    model.eval()
    tensors, storage = compressed_tensors(model, "bsr")
    safetensors.torch.save_file(tensors, str(tmp_path / WEIGHTS_FILE))
    layers = [{"name": r["name"], "shape": list(r["shape"]), "pattern": r["pattern"], "active": r["active"],
               "storage": storage.get(r["name"], "dense")} for r in layer_table(model)]
    (tmp_path / METADATA_FILE).write_text(json.dumps({"format": "bsr", "pattern": "block", "layers": layers,
                                                      "model": model_args, "sparsity": sparsity}))
    loaded = load_exported(tmp_path, device="cuda").bfloat16()
    x = torch.randn(16, 1, 28, 28)
    with torch.no_grad():
        expected = model(x)
        got = loaded(x.cuda().bfloat16())
    fc1 = loaded.blocks[0].mlp.fc1
    assert fc1.backend_name == "triton_bsr" and fc1.fuse_gelu and isinstance(loaded.blocks[0].mlp.act, torch.nn.Identity)
    assert _relative_error(got.cpu(), expected) < 2e-2


if __name__ == "__main__":  # the interpreter's child process (see _Interpreted)
    _interpreter_worker(sys.argv[1], sys.argv[2])
