"""The fused prune+compress kernel against its references, bit for bit.

CPU: the kernel runs under Triton's interpreter (in a child process started with
TRITON_INTERPRET=1) and must equal masks.mask_24_transposable plus `_cslt_reference`, a numpy
re-derivation of cuSPARSELt's sm90 bytes (nibble order from docs/design.md; slots of groups with
fewer than 2 nonzeros as measured on the H100, docs/design.md), and layout_sm90.compress_sm90,
which follows the same rule.
GPU (-m gpu): the compiled kernel must equal torch._cslt_compress itself, both ways.
"""
import importlib.util
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import sparsetrain.gpu
from sparsetrain.gpu.layout_sm90 import compress_sm90
from sparsetrain.sparse.masks import is_transposable_24, mask_24, mask_24_transposable

triton_missing = importlib.util.find_spec("triton") is None
KERNEL_SOURCE = (pathlib.Path(sparsetrain.gpu.__file__).parent / "kernels" / "prune_compress.py").read_text()


class _Interpreted:
    """Runs kernel calls under Triton's CPU interpreter, in one child process for all of them.

    TRITON_INTERPRET must be set before Triton is first imported, so it cannot be switched on
    inside this process (other tests may have imported Triton already). Calls are queued with
    `add`, run together by `run`, and their outputs read back with `[name]`.
    """

    def __init__(self):
        self.calls, self.outputs = {}, None

    def add(self, name, fn, *args, **kwargs):
        self.calls[name] = (fn, args, kwargs)

    def run(self, tmp_path):
        inputs, outputs = tmp_path / "calls.pt", tmp_path / "outputs.pt"
        torch.save(self.calls, inputs)
        env = dict(os.environ, TRITON_INTERPRET="1")
        done = subprocess.run([sys.executable, __file__, str(inputs), str(outputs)], env=env,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        self.outputs = torch.load(outputs)

    def __getitem__(self, name):
        result = self.outputs[name]
        if isinstance(result, str):  # the child's exception, re-raised here
            raise RuntimeError(result)
        return result


def _interpreter_worker(inputs, outputs):
    from sparsetrain.gpu.kernels import prune_compress
    results = {}
    for name, (fn, args, kwargs) in torch.load(inputs).items():
        try:
            results[name] = getattr(prune_compress, fn)(*args, **kwargs)
            results[f"{name}:args"] = args  # as the call left them (some kernels write into their inputs)
        except Exception as e:  # noqa: BLE001 - reported by the test that asked for this call
            results[name] = f"{type(e).__name__}: {e}"
    torch.save(results, outputs)


def _numpy_nibble_index(r, g, k):
    """The sm90 nibble position, re-derived bit by bit from docs/design.md (independent of the kernel)."""
    order = [("r", 3), ("g", 2), ("g", 0), ("g", 1), ("r", 0), ("r", 1), ("r", 2), ("r", 4), ("r", 5), ("g", 3)]
    inner = np.zeros_like(r)
    for dst, (which, src) in enumerate(order):
        inner |= (((r if which == "r" else g) >> src) & 1) << dst
    return ((r // 64) * (k // 64) + g // 16) * 1024 + inner


def _cslt_reference(w_masked: torch.Tensor) -> torch.Tensor:
    """torch._cslt_compress(w_masked) on sm90, in numpy: kept slots are the nonzeros (a zero of
    either sign is a zero), then the highest-index zero slots; values as stored, bits and all."""
    m, k = w_masked.shape
    bits = w_masked.contiguous().view(torch.int16).numpy().astype(np.int32) & 0xFFFF
    groups = bits.reshape(m, k // 4, 4)
    nonzero = (groups & 0x7FFF) != 0
    # Rank slots: nonzeros first, then zeros from the highest index down; keep the first two.
    rank = np.where(nonzero, 0, 1) * 8 + np.where(nonzero, np.arange(4), 3 - np.arange(4))
    slots = np.sort(np.argsort(rank, axis=-1, kind="stable")[..., :2], axis=-1)
    values = np.take_along_axis(groups, slots, -1).astype(np.uint16)
    nibbles = (slots[..., 0] | (slots[..., 1] << 2)).astype(np.uint8)
    r, g = np.meshgrid(np.arange(m), np.arange(k // 4), indexing="ij")
    stream = np.zeros(m * k // 4, np.uint8)
    stream[_numpy_nibble_index(r, g, k).reshape(-1)] = nibbles.reshape(-1)
    meta = stream[0::2] | (stream[1::2] << 4)
    packed = np.concatenate([values.reshape(-1).view(np.uint8), meta])
    return torch.from_numpy(packed.view(np.int16).copy()).view(w_masked.dtype).view(m, k // 2 + k // 16)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.int16)


def _weights(m, k, dtype, kind, seed, device="cpu"):
    """Random weights; 'ties' and 'zeros' stress the tie rule and the zero handling."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(m, k, generator=g)
    if kind == "ties":  # few distinct magnitudes: many tiles have several best patterns
        w = torch.randint(-2, 3, (m, k), generator=g).float()
    elif kind == "zeros":  # exact +0/-0, whole zero tiles, groups with one nonzero
        w = torch.where(torch.rand(m, k, generator=g) < 0.6, torch.zeros(()), w)
        w = torch.where(torch.rand(m, k, generator=g) < 0.5, -w, w)
        w[:4, :4] = 0.0
        w[4:8, :8] = -0.0
    return w.to(dtype).to(device)


SHAPES = [(64, 64), (128, 192), (192, 128)]
KINDS = ["random", "ties", "zeros"]


# ------------------------------------------------------------------------------------------ CPU
def _mask_case():
    w = _weights(128, 128, torch.bfloat16, "zeros", seed=7)
    mask = mask_24_transposable(torch.rand(128, 128, generator=torch.Generator().manual_seed(8)))
    return w, mask


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    if triton_missing:
        pytest.skip("triton is not installed")
    runner = _Interpreted()
    for m, k in SHAPES:
        for kind in KINDS:
            runner.add(f"prune-{kind}-{m}x{k}", "prune_compress_transposable", _prune_input(m, k, kind))
    w, mask = _mask_case()
    runner.add("mask", "compress_masked", w, mask)
    runner.add("mask-no-t", "compress_masked", w, mask, transposed=False)
    runner.add("values", "compress_pruned", w * mask)
    runner.add("meta", "prune_compress_transposable", _weights(128, 192, torch.bfloat16, "random", seed=3))
    runner.add("huge", "prune_compress_transposable", _huge_weights())
    runner.add("into", "prune_compress_into", *_into_case())
    for kind in ACTIVATION_KINDS:
        for transposable in (False, True):
            runner.add(f"act-{kind}-{transposable}", "prune_activations", _activations(kind), transposable)
    runner.run(tmp_path_factory.mktemp("interpreter"))
    return runner


def _prune_input(m, k, kind):
    return _weights(m, k, torch.bfloat16 if kind != "ties" else torch.float16, kind, seed=m * 31 + k)


@pytest.mark.parametrize("m,k", SHAPES)
@pytest.mark.parametrize("kind", KINDS)
def test_prune_mode_equals_torch_reference(interpreted, m, k, kind):
    w = _prune_input(m, k, kind)
    c, c_t, mask = interpreted[f"prune-{kind}-{m}x{k}"]
    ref_mask = mask_24_transposable(w.abs())
    assert torch.equal(mask, ref_mask)
    masked = w * ref_mask
    assert c.shape == (m, k // 2 + k // 16) and c_t.shape == (k, m // 2 + m // 16)
    assert torch.equal(_bits(c), _bits(_cslt_reference(masked)))
    assert torch.equal(_bits(c_t), _bits(_cslt_reference(masked.t().contiguous())))
    # the project's pure-torch layout follows the same zero rule, so it agrees on every input
    assert torch.equal(_bits(c), _bits(compress_sm90(masked)))
    assert torch.equal(_bits(c_t), _bits(compress_sm90(masked.t().contiguous())))


def test_mask_and_values_modes_equal_torch_reference(interpreted):
    w, mask = _mask_case()
    masked = w * mask
    c, c_t = interpreted["mask"]
    assert torch.equal(_bits(c), _bits(_cslt_reference(masked)))
    assert torch.equal(_bits(c_t), _bits(_cslt_reference(masked.t().contiguous())))
    c2, c2_t = interpreted["values"]
    assert torch.equal(_bits(c2), _bits(c)) and torch.equal(_bits(c2_t), _bits(c_t))
    c3, none = interpreted["mask-no-t"]
    assert none is None and torch.equal(_bits(c3), _bits(c))


def _into_case():
    """A weight, the mask of the step before (that of a perturbed copy) and a flip count that had 5."""
    w = _weights(128, 192, torch.bfloat16, "random", seed=11)
    noise = _weights(128, 192, torch.bfloat16, "random", seed=12)
    previous = mask_24_transposable((w + 0.5 * noise).abs())
    return w, previous, torch.tensor(5, dtype=torch.int64)


def test_prune_into_overwrites_the_mask_and_counts_the_flips_in_the_same_launch(interpreted):
    w, previous, _ = _into_case()
    c, c_t = interpreted["into"]
    _, mask, flips = interpreted["into:args"]
    ref_mask = mask_24_transposable(w.abs())
    assert torch.equal(mask, ref_mask)
    changed = int((previous ^ ref_mask).sum())
    assert 0 < changed < w.numel() // 2, "the case must have some flips and not only flips"
    assert int(flips) == 5 + changed
    masked = w * ref_mask
    assert torch.equal(_bits(c), _bits(_cslt_reference(masked)))
    assert torch.equal(_bits(c_t), _bits(_cslt_reference(masked.t().contiguous())))


ACTIVATION_KINDS = ["squared_relu", "ties", "zeros", "nonfinite"]


def _activations(kind):
    """(128, 192) activations: Squared-ReLU outputs (mostly zeros), few magnitudes, signed zeros, inf/NaN."""
    if kind == "squared_relu":
        return torch.relu(_weights(128, 192, torch.float32, "random", seed=21)).square().bfloat16()
    if kind == "nonfinite":
        x = _weights(128, 192, torch.float32, "random", seed=22)
        x.view(-1)[::13] = float("inf")
        x.view(-1)[5::17] = float("-inf")
        x.view(-1)[2::19] = float("nan")
        return x.bfloat16()
    return _weights(128, 192, torch.float16 if kind == "ties" else torch.bfloat16, kind, seed=23)


@pytest.mark.parametrize("transposable", [False, True], ids=["rowwise", "transposable"])
@pytest.mark.parametrize("kind", ACTIVATION_KINDS)
def test_activation_pruning_equals_the_mask_functions_and_compress(interpreted, kind, transposable):
    x = _activations(kind)
    c, c_t, mask, x_sparse = interpreted[f"act-{kind}-{transposable}"]
    assert torch.equal(mask, (mask_24_transposable if transposable else mask_24)(x.abs()))
    assert torch.equal(_bits(x_sparse), _bits(x.masked_fill(~mask, 0))), "kept values as they were, +0 elsewhere"
    if kind == "nonfinite":
        return  # only the mask and the values are in the contract for non-finite activations
    masked = x * mask
    assert torch.equal(_bits(c), _bits(_cslt_reference(masked)))
    if transposable:
        assert torch.equal(_bits(c_t), _bits(_cslt_reference(masked.t().contiguous())))
    else:
        assert c_t is None


def _huge_weights():
    """Magnitudes around the score clamp (float32 max / 8), infinities and NaNs."""
    w = _weights(64, 128, torch.float32, "random", seed=5) * 1e37
    w.view(-1)[::7] = float("inf")
    w.view(-1)[3::11] = float("nan")
    return w.to(torch.bfloat16)


def test_score_clamp_and_nan_handled_as_masks_does(interpreted):
    from sparsetrain.sparse import masks
    literals = [float(x) for x in re.findall(r"\b\d\.\d+e\+?37\b", KERNEL_SOURCE)]
    assert len(literals) == 3 and all(x == masks._SCORE_BOUND for x in literals)  # constant + 2 in the kernel
    w = _huge_weights()
    _, _, mask = interpreted["huge"]  # non-finite weights: only the mask is in the contract
    assert torch.equal(mask, mask_24_transposable(w.abs()))


def test_rejects_shapes_and_dtypes_it_cannot_lay_out():
    if triton_missing:
        pytest.skip("triton is not installed")
    from sparsetrain.gpu.kernels import prune_compress  # the checks run on the host, before any launch
    with pytest.raises(ValueError, match="multiples of 64"):
        prune_compress.prune_compress_transposable(torch.randn(64, 96, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="fp16/bf16"):
        prune_compress.prune_compress_transposable(torch.randn(64, 64))


def test_reference_follows_the_measured_zero_rule():
    """The rows of the H100 probe (docs/design.md): one nonzero -> it plus slot 3 (or 2 if it is
    slot 3); no nonzero -> slots 2, 3; the stored zeros keep their sign."""
    w = torch.zeros(64, 64, dtype=torch.bfloat16)
    w[0, :4] = torch.tensor([1.0, 0.0, -0.0, 0.0])
    w[0, 4:8] = torch.tensor([0.0, 0.0, -0.0, 2.0])
    w[0, 8:12] = torch.tensor([0.0, -0.0, -0.0, -0.0])
    c = _cslt_reference(w)
    assert _bits(c)[:6].tolist() == [16256, 0, -32768, 16384, -32768, -32768]
    meta = c.reshape(-1)[64 * 32:].view(torch.uint8)
    # Row 0's groups 0, 1, 2 sit at nibbles 0, 4, 8 (low halves of bytes 0, 2, 4): slots (0,3), (2,3), (2,3).
    assert [int(meta[b]) & 0xF for b in (0, 2, 4)] == [0 | 3 << 2, 2 | 3 << 2, 2 | 3 << 2]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("m,k", SHAPES)
def test_compress_sm90_follows_the_measured_zero_rule(m, k, kind):
    w = _weights(m, k, torch.bfloat16, kind, seed=m + 2 * k)
    masked = w * mask_24_transposable(w.abs())
    assert torch.equal(_bits(compress_sm90(masked)), _bits(_cslt_reference(masked)))


def test_metadata_order_matches_numpy_rederivation(interpreted):
    m, k = 128, 192
    w = _weights(m, k, torch.bfloat16, "random", seed=3)
    c, _, mask = interpreted["meta"]
    meta = c.reshape(-1)[m * k // 2:].contiguous().view(torch.uint8).numpy()
    stream = np.stack([meta & 0xF, meta >> 4], 1).reshape(-1)
    r, g = np.meshgrid(np.arange(m), np.arange(k // 4), indexing="ij")
    got = stream[_numpy_nibble_index(r, g, k)]
    kept = mask.view(m, k // 4, 4).numpy()
    first = kept.argmax(-1)
    second = 3 - kept[..., ::-1].argmax(-1)
    np.testing.assert_array_equal(got, first | (second << 2))
    values = c.reshape(-1)[: m * k // 2].float().numpy()
    np.testing.assert_array_equal(values, (w * mask)[mask].float().numpy())


# ------------------------------------------------------------------------------------------ GPU
def _gpu_kernels():
    from sparsetrain.gpu import kernels
    if not kernels.available():
        pytest.skip("needs Triton and a CUDA GPU")
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the compressed layout is sm90's")
    return kernels


@pytest.mark.gpu
@pytest.mark.parametrize("m,k", [(64, 64), (768, 3072), (3072, 768), (4096, 1024), (1024, 4096), (192, 320)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", KINDS)
def test_gpu_prune_mode_equals_cslt_compress(m, k, dtype, kind):
    kernels = _gpu_kernels()
    w = _weights(m, k, dtype, kind, seed=m + k, device="cuda")
    c, c_t, mask = kernels.prune_compress_transposable(w)
    ref_mask = mask_24_transposable(w.abs())
    assert torch.equal(mask, ref_mask)
    if m * k <= 1 << 16:  # the CPU reference is slow on big shapes; CPU == CUDA is masks.py's own test
        assert torch.equal(mask.cpu(), mask_24_transposable(w.abs().cpu()))
    masked = w * ref_mask
    ref, ref_t = torch._cslt_compress(masked), torch._cslt_compress(masked.t().contiguous())
    assert c.numel() == ref.numel() and torch.equal(_bits(c), _bits(ref))
    assert torch.equal(_bits(c_t), _bits(ref_t))


@pytest.mark.gpu
@pytest.mark.parametrize("kind", KINDS)
def test_gpu_mask_and_values_modes_equal_cslt_compress(kind):
    kernels = _gpu_kernels()
    w = _weights(1024, 4096, torch.bfloat16, kind, seed=11, device="cuda")
    mask = mask_24_transposable(torch.rand(1024, 4096, device="cuda"))
    assert is_transposable_24(mask)
    masked = w * mask
    ref, ref_t = torch._cslt_compress(masked), torch._cslt_compress(masked.t().contiguous())
    for c, c_t in (kernels.compress_masked(w, mask), kernels.compress_pruned(masked)):
        assert torch.equal(_bits(c), _bits(ref))
        assert torch.equal(_bits(c_t), _bits(ref_t))


@pytest.mark.gpu
@pytest.mark.parametrize("m,k", [(4096, 1024), (192, 320)])
def test_gpu_prune_into_equals_cslt_compress_and_counts_the_flips(m, k):
    kernels = _gpu_kernels()
    w = _weights(m, k, torch.bfloat16, "random", seed=3, device="cuda")
    previous = mask_24_transposable((w + 0.5 * torch.randn_like(w)).abs())
    mask, flips = previous.clone(), torch.tensor(7, dtype=torch.int64, device="cuda")
    c, c_t = kernels.prune_compress_into(w, mask, flips)
    ref_mask = mask_24_transposable(w.abs())
    assert torch.equal(mask, ref_mask)
    assert int(flips) == 7 + int((previous ^ ref_mask).sum())
    masked = w * ref_mask
    assert torch.equal(_bits(c), _bits(torch._cslt_compress(masked)))
    assert torch.equal(_bits(c_t), _bits(torch._cslt_compress(masked.t().contiguous())))


@pytest.mark.gpu
@pytest.mark.parametrize("transposable", [False, True], ids=["rowwise", "transposable"])
@pytest.mark.parametrize("m,k", [(12608, 4096), (192, 320)])
def test_gpu_activation_pruning_equals_masks_and_cslt_compress(m, k, transposable):
    kernels = _gpu_kernels()
    x = torch.relu(torch.randn(m, k, device="cuda")).square().bfloat16()  # Squared-ReLU outputs
    c, c_t, mask, x_sparse = kernels.prune_activations(x, transposable)
    assert torch.equal(mask, (mask_24_transposable if transposable else mask_24)(x.abs()))
    assert torch.equal(_bits(x_sparse), _bits(x.masked_fill(~mask, 0)))
    masked = x * mask
    assert torch.equal(_bits(c), _bits(torch._cslt_compress(masked)))
    if transposable:
        assert torch.equal(_bits(c_t), _bits(torch._cslt_compress(masked.t().contiguous())))


@pytest.mark.gpu
def test_gpu_products_match_masked_dense():
    kernels = _gpu_kernels()
    w = torch.randn(4096, 1024, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(2048, 1024, device="cuda", dtype=torch.bfloat16)
    gy = torch.randn(2048, 4096, device="cuda", dtype=torch.bfloat16)
    c, c_t, mask = kernels.prune_compress_transposable(w)
    wm = (w * mask).float()
    y = torch._cslt_sparse_mm(c, x.t(), transpose_result=True)
    gx = torch._cslt_sparse_mm(c_t, gy.t(), transpose_result=True)
    for got, ref in ((y, x.float() @ wm.t()), (gx, gy.float() @ wm)):
        assert float((got.float() - ref).norm() / ref.norm()) < 1e-2


@pytest.mark.gpu
def test_gpu_every_output_element_is_written():
    kernels = _gpu_kernels()
    w = torch.randn(256, 512, device="cuda", dtype=torch.bfloat16)
    for fill in (0.0, float("nan")):  # poisoned allocations: a skipped element shows up as a mismatch
        torch.cuda.empty_cache()
        junk = torch.full((1 << 22,), fill, device="cuda", dtype=torch.bfloat16)
        del junk
        c, c_t, mask = kernels.prune_compress_transposable(w)
        masked = w * mask
        assert torch.equal(_bits(c), _bits(torch._cslt_compress(masked)))
        assert torch.equal(_bits(c_t), _bits(torch._cslt_compress(masked.t().contiguous())))


if __name__ == "__main__":  # the interpreter's child process (see _Interpreted)
    _interpreter_worker(sys.argv[1], sys.argv[2])
