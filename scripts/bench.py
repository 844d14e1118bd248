"""Dense vs 2:4 on the GPU at hand: GEMMs, prune+compress, host cost, the ViT-L MLP block, a ViT-L step,
activation 2:4, ViT-L inference, compiled steps, train.py vs a bare loop, and kernel-time profiles.

    python scripts/bench.py [--quick] [--only a,b,c,d,e,f,g,h,i,p] [--out benchmarks]

Every row times dense and sparse in the same run, on the same shapes, in the same mode, as medians
after warm-up on random data. "graph" is the GPU time of calls captured in one CUDA graph and
replayed (host overhead removed); "eager" is wall time per call of back-to-back launches (what a
plain PyTorch loop sees, host overhead included); "compile" rows use torch.compile per transformer
block (regional: the identical blocks compile once). A speedup under 1 is printed as SLOWER.
Sections are independent: one that fails prints its error and the others still run.
Writes benchmarks/bench-<date>.json and a .md copy with the GPU and software versions, after every
section (a run stopped midway keeps what it measured).
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import pathlib
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

DT = torch.bfloat16
TOKENS = 64 * 197  # ViT batch 64 at 224 px: 196 patches + cls
MLP_SHAPES = {"vit_b": (768, 3072), "vit_l": (1024, 4096)}


# ---------------------------------------------------------------------------------------- timing
def cuda_event_median_ms(fn, reps: int) -> float:
    """Median GPU ms of `reps` calls of fn, each timed alone between two CUDA events."""
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


class Timer:
    def __init__(self, quick: bool):
        self.reps = 7 if quick else 15
        self.inner = 10 if quick else 20

    def graph_ms(self, fns) -> float:
        """GPU ms per call: `inner` calls (cycling through `fns`) captured in one graph, replayed."""
        fns = fns if isinstance(fns, (list, tuple)) else [fns]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up off the capture: searches, compiles, allocations
            for f in fns * 2:
                f()
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        # A leaf's AccumulateGrad node accumulates on the stream it was made on (torch >= 2.10); one kept alive
        # from an eager call on the default stream (by a caller's output tensor, or a reference cycle) breaks
        # the capture with cudaErrorStreamCaptureImplicit. Collect what only cycles hold before capturing.
        gc.collect()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for i in range(self.inner):
                fns[i % len(fns)]()
        graph.replay()
        torch.cuda.synchronize()
        return self._median(graph.replay) / self.inner

    def eager_ms(self, fns) -> float:
        """Wall ms per call of `inner` back-to-back eager calls (host overhead included)."""
        fns = fns if isinstance(fns, (list, tuple)) else [fns]
        for f in fns * 2:
            f()
        torch.cuda.synchronize()

        def burst():
            for i in range(self.inner):
                fns[i % len(fns)]()
        return self._median(burst) / self.inner

    def _median(self, fn) -> float:
        return cuda_event_median_ms(fn, self.reps)

    @staticmethod
    def host_us(fn, calls: int = 50) -> float:
        """CPU microseconds to issue one call (median over 5 bursts; the GPU is not waited for)."""
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
        per_call = []
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            per_call.append((time.perf_counter() - t0) / calls * 1e6)
            torch.cuda.synchronize()
        return statistics.median(per_call)


def verdict(speedup: float) -> str:
    return "faster" if speedup >= 1.0 else "SLOWER"


def pair_row(name: str, mode: str, dense_ms: float, sparse_ms: float, **extra) -> dict:
    s = dense_ms / sparse_ms
    return {"name": name, "mode": mode, "dense_ms": round(dense_ms, 4), "sparse_ms": round(sparse_ms, 4),
            "speedup": round(s, 3), "verdict": verdict(s), **extra}


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.float()
    return float((got.float() - ref).norm() / ref.norm())


# ------------------------------------------------------------------------------------ sparse ops
_ALGS: dict = {}


def _alg(compressed, dense_t) -> int:
    key = (tuple(compressed.shape), tuple(dense_t.shape), dense_t.stride())
    if key not in _ALGS:
        found = torch._cslt_sparse_mm_search(compressed, dense_t, transpose_result=True)
        _ALGS[key] = found if isinstance(found, int) else int(found[0])
    return _ALGS[key]


def sparse_mm(compressed, dense_t, bias=None):
    """(dense_t^T @ A^T) through torch._cslt_sparse_mm with the searched algorithm."""
    return torch._cslt_sparse_mm(compressed, dense_t, bias=bias, transpose_result=True,
                                 alg_id=_alg(compressed, dense_t))


def cached_mm(compressed, dense_t, bias=None):
    """Same GEMM through sparsetrain.gpu.kernels.cslt_plans: the cuSPARSELt plan is built once per shape."""
    from sparsetrain.gpu.kernels.cslt_plans import sparse_mm as plan_mm
    return plan_mm(compressed, dense_t, True, _alg(compressed, dense_t), bias=bias)


def torch_route(w):
    """The correct torch-op route: tile-op mask, apply it, compress both ways."""
    *_, bitmask = torch._sparse_semi_structured_tile(w, algorithm="", use_cutlass=False)
    wm = torch._sparse_semi_structured_apply_dense(w, bitmask)
    return torch._cslt_compress(wm), torch._cslt_compress(wm.t().contiguous())


def kernel_route(w):
    from sparsetrain.gpu.kernels import prune_compress_transposable
    c, c_t, _ = prune_compress_transposable(w, want_mask=False)
    return c, c_t


class PrunedLinearFn(torch.autograd.Function):
    """2:4 linear that re-prunes W every step (mask by |W|, transposable), both GEMMs sparse.

    With `bias` given it is added inside the forward GEMM (cuSPARSELt's epilogue), saving a pass
    over the (tokens, out) output.
    """

    @staticmethod
    def forward(ctx, x, w, bias, prune, mm):
        x2 = x.reshape(-1, x.shape[-1]).contiguous()  # cuSPARSELt reads x2.t() as column-major
        c, c_t = prune(w)
        ctx.save_for_backward(x2, c_t)
        ctx.x_shape, ctx.mm, ctx.has_bias = x.shape, mm, bias is not None
        y = mm(c, x2.t()) if bias is None else mm(c, x2.t(), bias=bias)
        return y.reshape(*x.shape[:-1], w.shape[0])

    @staticmethod
    def backward(ctx, gy):
        x2, c_t = ctx.saved_tensors
        g2 = gy.reshape(-1, gy.shape[-1]).contiguous()
        gb = g2.sum(0) if ctx.has_bias else None
        return ctx.mm(c_t, g2.t()).reshape(ctx.x_shape), g2.t() @ x2, gb, None, None


class PrunedLinear(nn.Linear):
    def __init__(self, dense: nn.Linear, prune, mm=None, fuse_bias=False):
        super().__init__(dense.in_features, dense.out_features, bias=dense.bias is not None)
        self.weight, self.bias, self.prune = dense.weight, dense.bias, prune
        self.mm, self.fuse_bias = mm or sparse_mm, fuse_bias and dense.bias is not None

    def forward(self, x):
        if self.fuse_bias:
            return PrunedLinearFn.apply(x, self.weight, self.bias, self.prune, self.mm)
        y = PrunedLinearFn.apply(x, self.weight, None, self.prune, self.mm)
        return y if self.bias is None else y + self.bias


def library_linear(compress: str | None = None, plans: bool | None = None, frozen: bool = False):
    """What users run: SparseLinear (Semi24Config, transposable, cuSPARSELt) in training mode, so the
    mask is refreshed every forward (one fused kernel launch on sm90) unless frozen (given-mask mode).

    compress None keeps the backend resolve_backend picks (what a user gets); otherwise the backend is
    pinned to that compress route and plan-cache choice.
    """
    from sparsetrain.sparse import CuSparseLtBackend, Semi24Config, SparseLinear

    def make(lin: nn.Linear) -> nn.Module:
        layer = SparseLinear.from_dense(lin, Semi24Config(backend="cusparselt"), "bench").train()
        layer.resolve_backend_for("cuda", DT)  # now, not in the first forward, which torch.compile traces
        if compress is not None:
            backend = CuSparseLtBackend(sparse_input_grad=True, compress=compress, plans=plans)
            layer.use_backend(backend, "cuda", DT, f"pinned by bench.py: compress={compress}, plans={plans}")
        layer.set_mask_frozen(frozen)
        return layer
    return make


LIBRARY = "2:4 library SparseLinear, as resolved (sm90: kernel, bias in GEMM, plan cache)"
LIBRARY_TORCH_MM = "2:4 library SparseLinear, kernel, bias in GEMM, torch._cslt_sparse_mm"
LIBRARY_FROZEN = "2:4 library SparseLinear, frozen mask (given-mask kernel), plan cache"
LIBRARY_CSLT = "2:4 library SparseLinear, cslt compress (masks.py + 2x _cslt_compress), torch._cslt_sparse_mm"
# Variants of a 2:4 linear, by name: a function (dense nn.Linear) -> sparse module.
SPARSE_VARIANTS = {
    LIBRARY: library_linear(),
    LIBRARY_TORCH_MM: library_linear("kernel", plans=False),
    LIBRARY_FROZEN: library_linear("kernel", plans=True, frozen=True),
    LIBRARY_CSLT: library_linear("cslt", plans=False),
    "2:4 re-prune each step, torch ops": lambda lin: PrunedLinear(lin, torch_route),
    "2:4 re-prune each step, kernel": lambda lin: PrunedLinear(lin, kernel_route),
    "2:4 re-prune each step, kernel, bias in GEMM": lambda lin: PrunedLinear(lin, kernel_route, fuse_bias=True),
    "2:4 re-prune each step, kernel, bias in GEMM, plan cache":
        lambda lin: PrunedLinear(lin, kernel_route, cached_mm, fuse_bias=True),
}


# -------------------------------------------------------------------------------------- sections
def section_a(t: Timer, quick: bool) -> list[dict]:
    """The 3 GEMMs of a linear's training step at ViT MLP shapes, searched algorithm."""
    from sparsetrain.sparse import mask_24_transposable
    rows = []
    for model, (d, h) in MLP_SHAPES.items():
        if quick and model != "vit_l":
            continue
        for layer, (fin, fout) in (("fc1", (d, h)), ("fc2", (h, d))):
            x = torch.randn(TOKENS, fin, device="cuda", dtype=DT)
            w = torch.randn(fout, fin, device="cuda", dtype=DT)
            gy = torch.randn(TOKENS, fout, device="cuda", dtype=DT)
            wm = w * mask_24_transposable(w.abs())
            c, c_t = torch._cslt_compress(wm), torch._cslt_compress(wm.t().contiguous())
            gemms = {
                "forward Y=XW^T": (lambda: F.linear(x, wm), lambda: sparse_mm(c, x.t()), x.float() @ wm.float().t()),
                "input grad dX=dYW": (lambda: gy @ wm, lambda: sparse_mm(c_t, gy.t()), gy.float() @ wm.float()),
            }
            for gemm, (dense, sparse, ref) in gemms.items():
                err = rel_err(sparse(), ref)
                del ref
                for mode in ("graph", "eager"):
                    timed = t.graph_ms if mode == "graph" else t.eager_ms
                    rows.append(pair_row(f"{model} {layer} {fin}->{fout} {gemm}", mode, timed(dense), timed(sparse),
                                         rel_err=round(err, 5)))
                    print_row(rows[-1])
            for mode in ("graph", "eager"):
                timed = t.graph_ms if mode == "graph" else t.eager_ms
                wgrad = timed(lambda: gy.t() @ x)
                rows.append(pair_row(f"{model} {layer} {fin}->{fout} weight grad dW=dY^TX (dense in both)", mode,
                                     wgrad, wgrad))
                print_row(rows[-1])
    return rows


def section_b(t: Timer, quick: bool) -> list[dict]:
    """Prune + compress both ways per weight: torch-op route vs the fused kernel, plus the floor."""
    from sparsetrain.gpu.kernels import (compress_masked, compress_pruned, prune_compress_into,
                                         prune_compress_transposable)
    from sparsetrain.sparse import compress_sm90, mask_24_transposable
    copy_src = torch.randn(1 << 26, device="cuda", dtype=DT)
    copy_dst = torch.empty_like(copy_src)
    copy_ms = t.graph_ms(lambda: copy_dst.copy_(copy_src))
    bandwidth = 2 * copy_src.numel() * 2 / (copy_ms * 1e-3)  # bytes read + written per second
    rows = [{"name": "device copy bandwidth (read+write)", "mode": "graph", "TB_per_s": round(bandwidth / 1e12, 3)}]
    print_row(rows[-1])
    shapes = [(4096, 1024), (1024, 4096)] if quick else [(4096, 1024), (1024, 4096), (3072, 768), (768, 3072)]
    for m, k in shapes:
        # Enough copies to overflow L2 (50 MB), so each call reads its weight from HBM as a step would.
        copies = max(2, (96 << 20) // (m * k * 2))
        ws = [torch.randn(m, k, device="cuda", dtype=DT) for _ in range(copies)]
        masks = [mask_24_transposable(w.abs()) for w in ws]
        pruned = [w * mk for w, mk in zip(ws, masks)]
        layer_masks = [mk.clone() for mk in masks]  # a layer's mask buffer, rewritten in place
        flips = [torch.zeros((), dtype=torch.int64, device="cuda") for _ in ws]
        # Sanity (not a test): the kernel's bytes equal the torch route's for the same mask.
        c, c_t, mk = prune_compress_transposable(ws[0])
        same = bool(torch.equal(c.view(-1).view(torch.int16), torch._cslt_compress(ws[0] * mk).view(-1).view(torch.int16))
                    and torch.equal(c_t.view(-1).view(torch.int16),
                                    torch._cslt_compress((ws[0] * mk).t().contiguous()).view(-1).view(torch.int16)))
        floor_bytes = m * k * 2 + 2 * (m * k * 9 // 8)  # read W once, write both compressed copies
        floor_ms = floor_bytes / bandwidth * 1e3
        base = {"torch ops: tile + apply_dense + 2x _cslt_compress": [lambda w=w: torch_route(w) for w in ws]}
        kernel = {
            "kernel: prune (|W|, transposable) + both compressions + mask":
                [lambda w=w: prune_compress_transposable(w) for w in ws],
            "kernel: prune + both compressions (no mask out)":
                [lambda w=w: prune_compress_transposable(w, want_mask=False) for w in ws],
            "kernel: prune into the layer's mask + flip count (a training refresh)":
                [lambda w=w, mk=mk, n=n: prune_compress_into(w, mk, n) for w, mk, n in zip(ws, layer_masks, flips)],
            "torch ops: flip bookkeeping it replaced (xor, count_nonzero, add_, copy_)":
                [lambda mk=mk, new=new, n=n: (n.add_(torch.count_nonzero(mk ^ new)), mk.copy_(new))
                 for mk, new, n in zip(layer_masks, masks, flips)],
            "kernel: given mask, both compressions": [lambda w=w, mk=mk: compress_masked(w, mk) for w, mk in zip(ws, masks)],
            "kernel: pre-masked W, both compressions": [lambda p=p: compress_pruned(p) for p in pruned],
            "torch ops: 2x _cslt_compress of pre-masked W": [lambda p=p: (torch._cslt_compress(p), torch._cslt_compress(
                p.t().contiguous())) for p in pruned],
            "torch ops: compress_sm90 (direct) both ways": [lambda p=p: (compress_sm90(p), compress_sm90(
                p.t().contiguous())) for p in pruned],
        }
        for mode in ("graph", "eager"):
            timed = t.graph_ms if mode == "graph" else t.eager_ms
            ref_name, ref_fns = next(iter(base.items()))
            ref_ms = timed(ref_fns)
            for name, fns in kernel.items():
                ms = timed(fns)
                rows.append({"name": f"{m}x{k} {name}", "mode": mode, "ms": round(ms, 4),
                             "torch_route_ms": round(ref_ms, 4), "speedup_vs_torch_route": round(ref_ms / ms, 2),
                             "floor_ms": round(floor_ms, 4), "x_floor": round(ms / floor_ms, 1),
                             "kernel_bytes_equal_torch": same})
                print_row(rows[-1])
        del ws, masks, pruned
    return rows


def section_c(t: Timer, quick: bool) -> list[dict]:
    """CPU time to issue one call: sparse (cuSPARSELt) vs dense, at the ViT-L fc1 shape."""
    from sparsetrain.gpu.kernels import compress_masked, prune_compress_transposable
    from sparsetrain.sparse import CuSparseLtBackend, mask_24_transposable
    d, h = MLP_SHAPES["vit_l"]
    x = torch.randn(TOKENS, d, device="cuda", dtype=DT)
    w = torch.randn(h, d, device="cuda", dtype=DT)
    mask = mask_24_transposable(w.abs())
    c = torch._cslt_compress(w * mask)
    x_t = x.t()
    calls = {
        "dense F.linear": lambda: F.linear(x, w),
        "torch._cslt_sparse_mm (searched alg)": lambda: sparse_mm(c, x_t),
        "kernels.cslt_plans.sparse_mm (plan built once, same alg)": lambda: cached_mm(c, x_t),
        "torch._cslt_compress": lambda: torch._cslt_compress(w),
        "torch-op route: tile + apply_dense + 2x compress": lambda: torch_route(w),
        "kernel: prune + both compressions (1 launch)": lambda: prune_compress_transposable(w),
        "kernel: given mask, both compressions (1 launch)": lambda: compress_masked(w, mask),
    }
    bias = torch.randn(h, device="cuda", dtype=DT)
    for plans in (True, False):  # the library's forward GEMM: what a SparseLinear issues per step
        backend = CuSparseLtBackend(sparse_input_grad=True, compress="kernel", plans=plans)
        _, prepared = backend.prepare_weight(w, mask)
        calls[f"library CuSparseLtBackend.linear with bias ({'plan cache' if plans else 'torch op'})"] = \
            lambda backend=backend, prepared=prepared: backend.linear(x, prepared, bias)
    calls.update(_linear_fwd_bwd_calls(d, h))
    rows = []
    for label, kwargs in (("", {}), (", with bias", {"bias": bias})):
        try:  # sanity (not a test): the plan cache computes the same bits as torch's call
            same = bool(torch.equal(cached_mm(c, x_t, **kwargs), sparse_mm(c, x_t, **kwargs)))
        except Exception as e:
            same = f"{type(e).__name__}: {e}"[:1500]
        rows.append({"name": f"plan cache output equals torch._cslt_sparse_mm bit for bit{label}", "mode": "check",
                     "result": same})
        print_row(rows[-1])
    for name, fn in calls.items():
        try:
            rows.append({"name": f"vit_l fc1 {name}", "mode": "host", "host_us_per_call": round(t.host_us(fn), 1)})
        except Exception as e:
            rows.append({"name": f"vit_l fc1 {name}", "error": f"{type(e).__name__}: {e}"[:300]})
        print_row(rows[-1])
    return rows


def _linear_fwd_bwd_calls(d: int, h: int, tokens: int = 256) -> dict:
    """Forward + backward of one training-mode linear at (d -> h): dense nn.Linear, and the library's
    SparseLinear as resolved (mask re-pruned in the forward), eager and compiled. Few tokens, so the
    GPU finishes each call before the next is issued and the time measured is the host's."""
    dense = nn.Linear(d, h).to("cuda", DT)
    sparse = SPARSE_VARIANTS[LIBRARY](nn.Linear(d, h).to("cuda", DT))
    compiled = SPARSE_VARIANTS[LIBRARY](nn.Linear(d, h).to("cuda", DT))
    compiled.compile()
    x = torch.randn(tokens, d, device="cuda", dtype=DT, requires_grad=True)
    gy = torch.randn(tokens, h, device="cuda", dtype=DT)

    def fwd_bwd(layer):
        return lambda: layer(x).backward(gy)
    return {f"dense nn.Linear forward + backward ({tokens} tokens)": fwd_bwd(dense),
            f"library SparseLinear forward + backward (re-prune, plan cache), eager ({tokens} tokens)": fwd_bwd(sparse),
            f"library SparseLinear forward + backward, torch.compile mode default ({tokens} tokens)": fwd_bwd(compiled)}


def _mlp(variant: str | None, d: int, h: int) -> nn.Module:
    mlp = nn.Sequential(nn.Linear(d, h), nn.GELU(), nn.Linear(h, d)).to("cuda", DT)
    if variant is not None:
        mlp[0], mlp[2] = SPARSE_VARIANTS[variant](mlp[0]), SPARSE_VARIANTS[variant](mlp[2])
    return mlp


def _dx_error_vs_masked_dense(mlp, x, gout, d, h) -> float:
    """Relative error of dX against the same MLP run dense with the masked weights (a sanity check)."""
    from sparsetrain.sparse import mask_24_transposable
    x.grad = None
    mlp(x).backward(gout)
    got = x.grad.clone()
    ref = nn.Sequential(nn.Linear(d, h), nn.GELU(), nn.Linear(h, d)).to("cuda", DT)
    with torch.no_grad():
        for i in (0, 2):
            ref[i].bias.copy_(mlp[i].bias)
            w = mlp[i].weight
            if getattr(mlp[i], "prune", None) is torch_route:  # the tile op picks its own mask
                *_, bitmask = torch._sparse_semi_structured_tile(w, algorithm="", use_cutlass=False)
                ref[i].weight.copy_(torch._sparse_semi_structured_apply_dense(w, bitmask))
                continue
            mask = getattr(mlp[i], "mask", None)
            mask = mask_24_transposable(w.abs()) if mask is None else mask
            ref[i].weight.copy_(w * mask)
    x.grad = None
    ref(x).backward(gout)
    return round(rel_err(got, x.grad), 5)


def section_d(t: Timer, quick: bool) -> list[dict]:
    """ViT-L MLP block (Linear-GELU-Linear) forward + backward, dense vs 2:4 variants."""
    d, h = MLP_SHAPES["vit_l"]
    x = torch.randn(TOKENS, d, device="cuda", dtype=DT, requires_grad=True)
    gout = torch.randn(TOKENS, d, device="cuda", dtype=DT)
    torch.manual_seed(0)
    dense = _mlp(None, d, h)
    dense_step = lambda: dense(x).backward(gout)  # noqa: E731
    rows = []
    timings = {mode: (t.graph_ms if mode == "graph" else t.eager_ms)(dense_step) for mode in ("graph", "eager")}
    for variant in SPARSE_VARIANTS:
        try:
            torch.manual_seed(0)
            mlp = _mlp(variant, d, h)
            step = lambda: mlp(x).backward(gout)  # noqa: E731
            err = _dx_error_vs_masked_dense(mlp, x, gout, d, h)
            # The library's layer table sentence, so a row says which route actually ran.
            backend = getattr(mlp[0], "backend_reason", "bench-local module")
            for mode in ("graph", "eager"):
                timed = t.graph_ms if mode == "graph" else t.eager_ms
                rows.append(pair_row(f"vit_l MLP fwd+bwd {TOKENS} tok, {variant} (vs dense)", mode,
                                     timings[mode], timed(step), dx_rel_err_vs_masked_dense=err, backend=backend))
                print_row(rows[-1])
            del mlp
        except Exception as e:  # one variant failing must not hide the others
            rows.append({"name": f"vit_l MLP {variant}", "error": f"{type(e).__name__}: {e}"[:300]})
            print_row(rows[-1])
    return rows


def _vit_step_ms(t: Timer, variant: str | None, graph: bool, compile_mode: str | None = None) -> float:
    """ms per ViT-L training step. compile_mode: None (eager), "default" or "reduce-overhead"
    (torch.compile per block; reduce-overhead replays each block's forward and backward as CUDA
    graphs, the optimizer runs outside them)."""
    import timm
    torch.manual_seed(0)
    with torch.device("cuda"):  # initialising 300M parameters on the CPU takes longer than the timing
        model = timm.create_model("vit_large_patch16_224", num_classes=1000).to(DT)
    if variant is not None:
        for block in model.blocks:
            block.mlp.fc1 = SPARSE_VARIANTS[variant](block.mlp.fc1)
            block.mlp.fc2 = SPARSE_VARIANTS[variant](block.mlp.fc2)
    if compile_mode is not None:
        _compile_blocks(model, compile_mode)
    images = torch.randn(64, 3, 224, 224, device="cuda", dtype=DT)
    labels = torch.randint(0, 1000, (64,), device="cuda")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True, capturable=graph)

    def step():
        if compile_mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()  # a new step: last step's graph outputs are done with
        F.cross_entropy(model(images).float(), labels).backward()
        opt.step()
        opt.zero_grad(set_to_none=not graph)
    try:
        saved = t.inner
        t.inner = 1 if graph else 3  # a step is long: one per graph, a few per eager burst
        return t.graph_ms(step) if graph else t.eager_ms(step)
    finally:
        t.inner = saved
        del model, opt
        torch.cuda.empty_cache()


def section_e(t: Timer, quick: bool) -> list[dict]:
    """Full ViT-L/16 training step (batch 64, bf16 params, AdamW), dense vs 2:4 MLPs."""
    fused = "2:4 re-prune each step, kernel, bias in GEMM"
    plan = [("graph", LIBRARY), ("graph", fused), ("graph", LIBRARY_CSLT),
            ("eager", LIBRARY), ("eager", fused + ", plan cache"), ("eager", LIBRARY_TORCH_MM)]
    if quick:
        plan = plan[:1]
    rows, dense = [], {}
    for mode, variant in plan:
        try:
            if mode not in dense:
                dense[mode] = _vit_step_ms(t, None, mode == "graph")
            sparse = _vit_step_ms(t, variant, mode == "graph")
            rows.append(pair_row(f"vit_large_patch16_224 step bs64, {variant} (vs dense)", mode, dense[mode], sparse))
        except Exception as e:
            rows.append({"name": f"vit_l step {variant} {mode}", "error": f"{type(e).__name__}: {e}"[:300]})
        print_row(rows[-1])
    return rows


# ------------------------------------------------------------- compiled and inference paths (f-i)
def _compile_blocks(model: nn.Module, mode: str = "default") -> None:
    """torch.compile per transformer block, in place: regional compilation, so the 24 identical ViT-L
    blocks compile once; the patch embedding, final norm and head stay eager."""
    for block in model.blocks:
        block.compile(mode=None if mode == "default" else mode)


def _squared_relu_mlp(d: int, h: int, act24: bool | None) -> nn.Module:
    """Linear - Squared-ReLU - Linear; act24 True/False: fc2's input activations 2:4 (transposable or
    row-wise) through the library's SparseLinear on cuSPARSELt; None: dense."""
    from sparsetrain.sparse import Act24Config, SparseLinear
    from sparsetrain.models import SquaredReLU
    mlp = nn.Sequential(nn.Linear(d, h), SquaredReLU(), nn.Linear(h, d)).to("cuda", DT)
    if act24 is not None:
        mlp[2] = SparseLinear.from_dense(mlp[2], Act24Config(backend="cusparselt", transposable=act24), "fc2").train()
    return mlp


def section_f(t: Timer, quick: bool) -> list[dict]:
    """Squared-ReLU MLP (ViT-L shapes) fwd+bwd: fc2's input activations 2:4 vs the dense Squared-ReLU MLP."""
    from sparsetrain.sparse import EmulatedBackend
    d, h = MLP_SHAPES["vit_l"]
    x = torch.randn(TOKENS, d, device="cuda", dtype=DT, requires_grad=True)
    gout = torch.randn(TOKENS, d, device="cuda", dtype=DT)
    torch.manual_seed(0)
    dense = _squared_relu_mlp(d, h, None)
    dense_step = lambda: dense(x).backward(gout)  # noqa: E731
    timings = {"graph": t.graph_ms(dense_step), "eager": t.eager_ms(dense_step)}
    rows = []
    for transposable in (False, True):
        torch.manual_seed(0)
        mlp = _squared_relu_mlp(d, h, transposable)
        torch.manual_seed(0)
        reference = _squared_relu_mlp(d, h, transposable)  # same weights, same math as masked dense
        reference[2].use_backend(EmulatedBackend(), "cuda", DT, "bench reference")
        results = []  # (y, dX, fc2's dW) of the cuSPARSELt MLP, then of the reference
        for model in (mlp, reference):
            x.grad = model[2].weight.grad = None
            y = model(x)
            y.backward(gout)
            results.append((y.detach(), x.grad.clone(), model[2].weight.grad.clone()))
        errors = {f"{what}_rel_err_vs_emulated": round(rel_err(got, ref), 5)
                  for what, got, ref in zip(("y", "dx", "dw_fc2"), *results)}
        # `y` and `model` would keep the reference's autograd graph, and with it x's AccumulateGrad node made on
        # the default stream, alive into the graph capture below, which then fails (see graph_ms).
        del reference, results, y, model
        step = lambda: mlp(x).backward(gout)  # noqa: E731
        for mode in ("graph", "eager"):
            timed = t.graph_ms if mode == "graph" else t.eager_ms
            rows.append(pair_row(f"vit_l Squared-ReLU MLP fwd+bwd {TOKENS} tok, fc2 input 2:4 "
                                 f"({'transposable: dW sparse too' if transposable else 'row-wise'}) (vs dense)",
                                 mode, timings[mode], timed(step), **errors, backend=mlp[2].backend_reason))
            print_row(rows[-1])
        del mlp
    return rows


class StaticSparseLinear(nn.Module):
    """2:4 inference linear: W_s (transposable mask of |W|) compressed once when built; each call is
    one cuSPARSELt GEMM with the bias in its epilogue, through the library's `cslt_linear` custom op
    (plan cache, searched and verified algorithm), so it runs eager, in a CUDA graph or compiled."""

    def __init__(self, dense: nn.Linear):
        from sparsetrain.gpu.kernels import compress_masked
        from sparsetrain.sparse import mask_24_transposable
        super().__init__()
        weight = dense.weight.detach()
        self.register_buffer("weight", weight)
        self.register_buffer("mask", mask_24_transposable(weight.abs()))
        self.register_buffer("compressed", compress_masked(weight, self.mask, transposed=False)[0])
        self.register_buffer("bias", None if dense.bias is None else dense.bias.detach())

    def forward(self, x):
        from sparsetrain.gpu.backends.cslt_ops import cslt_linear
        y = cslt_linear(x.reshape(-1, x.shape[-1]), self.compressed, self.weight, self.mask, self.bias, None, None)
        return y.reshape(*x.shape[:-1], y.shape[-1])


def _vit_l(sparse: str | None) -> nn.Module:
    """timm's ViT-L/16 in eval mode; sparse "static": the MLP linears as StaticSparseLinear; "library": the
    library's SparseLinear on them with frozen masks (what `load_exported` gives on CUDA)."""
    import timm

    from sparsetrain.sparse import Semi24Config, sparse_modules, sparsify_
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = timm.create_model("vit_large_patch16_224", num_classes=1000).to(DT).eval()
    if sparse == "static":
        for block in model.blocks:
            block.mlp.fc1, block.mlp.fc2 = StaticSparseLinear(block.mlp.fc1), StaticSparseLinear(block.mlp.fc2)
    elif sparse == "library":
        sparsify_(model, Semi24Config(backend="cusparselt"), include=["blocks.*.mlp.fc1", "blocks.*.mlp.fc2"])
        for _, layer in sparse_modules(model):
            layer.set_mask_frozen(True)
        model.eval()
    return model


def section_g(t: Timer, quick: bool) -> list[dict]:
    """ViT-L/16 inference, batch 64: 2:4 static compressed MLP weights vs dense, eager, graph, compiled; then the
    library's eval-mode SparseLinear (weights compressed at the first forward, then reused), eager and graph."""
    images = torch.randn(64, 3, 224, 224, device="cuda", dtype=DT)
    models = {"dense": _vit_l(None), "2:4": _vit_l("static")}
    with torch.no_grad():
        logits = {name: model(images).float() for name, model in models.items()}
        agreement = float((logits["dense"].argmax(1) == logits["2:4"].argmax(1)).float().mean())
    results = {}
    for compiled in (False, True):
        if compiled:
            for model in models.values():
                _compile_blocks(model)
        for name, model in models.items():
            forward = torch.no_grad()(lambda model=model: model(images))
            results[name, compiled, "graph"] = t.graph_ms(forward)
            results[name, compiled, "eager"] = t.eager_ms(forward)
    rows = []
    for compiled in (False, True):
        for mode in ("graph", "eager"):
            label = ("torch.compile per block" + (" + CUDA graph" if mode == "graph" else "")) if compiled else mode
            rows.append(pair_row(f"vit_large_patch16_224 inference bs64, 2:4 static compressed MLP weights (vs dense), "
                                 f"{label}", mode, results["dense", compiled, mode], results["2:4", compiled, mode],
                                 top1_agreement_with_dense=round(agreement, 3)))
            print_row(rows[-1])
    best_dense = min(v for (name, *_), v in results.items() if name == "dense")
    best_sparse = min(v for (name, *_), v in results.items() if name == "2:4")
    rows.append(pair_row("vit_large_patch16_224 inference bs64, fastest 2:4 mode vs fastest dense mode", "best",
                         best_dense, best_sparse))
    print_row(rows[-1])
    del models
    try:
        rows += _library_inference_rows(t, images, logits, results)
    except Exception as e:  # the rows above stand on their own
        rows.append({"name": "vit_l inference, 2:4 library SparseLinear in eval", "error": f"{type(e).__name__}: {e}"[:300]})
        print_row(rows[-1])
    return rows


def _library_inference_rows(t: Timer, images: torch.Tensor, logits: dict, results: dict) -> list[dict]:
    """The library's own inference route (not compiled: a compiled layer cannot read the version counters that
    keep its compressed weight, so it would compress every forward)."""
    from sparsetrain.sparse import sparse_modules
    library = _vit_l("library")
    forward = torch.no_grad()(lambda: library(images))
    with torch.no_grad():
        error = rel_err(forward().float(), logits["2:4"])
    rows = []
    for mode in ("graph", "eager"):
        sparse_ms = (t.graph_ms if mode == "graph" else t.eager_ms)(forward)
        rows.append(pair_row(f"vit_large_patch16_224 inference bs64, 2:4 library SparseLinear in eval, frozen masks "
                             f"(compressed at the first forward, then reused) (vs dense), {mode}", mode,
                             results["dense", False, mode], sparse_ms, logits_rel_err_vs_static=round(error, 5),
                             backend=sparse_modules(library)[0][1].backend_reason))
        print_row(rows[-1])
    return rows


# Section h's modes: (label, compile mode, captured whole in our own CUDA graph). --step-modes picks.
STEP_MODES = {"compile": ("default", False), "compile+graph": ("default", True),
              "reduce-overhead": ("reduce-overhead", False)}


# Section h's 2:4 variants: the mask re-picked every step (constant/gradual schedules, the ViT recipes' default)
# and fixed (the fine-tune schedule after its one-shot prune, NVIDIA's ASP recipe): weights re-compressed each step.
STEP_VARIANTS = {LIBRARY: "mask re-picked every step", LIBRARY_FROZEN: "mask fixed (prune_schedule=finetune)"}


def section_h(t: Timer, quick: bool) -> list[dict]:
    """Full ViT-L/16 training step compiled per block, dense vs the library's 2:4 MLPs, in each mode,
    and for each 2:4 variant its fastest mode vs the fastest dense mode measured here."""
    rows, results = [], {}
    for label, (compile_mode, graph) in STEP_MODES.items():
        for variant in (None, *STEP_VARIANTS):
            try:
                results[variant, label] = _vit_step_ms(t, variant, graph, compile_mode)
            except Exception as e:
                rows.append({"name": f"vit_l step {variant or 'dense'} {label}", "error": f"{type(e).__name__}: {e}"[:300]})
                print_row(rows[-1])
            if variant is not None and (None, label) in results and (variant, label) in results:
                rows.append(pair_row(f"vit_large_patch16_224 step bs64, torch.compile per block, {variant} (vs dense)",
                                     label, results[None, label], results[variant, label]))
                print_row(rows[-1])
    dense = {label: ms for (variant, label), ms in results.items() if variant is None}
    for variant, what in STEP_VARIANTS.items():
        sparse = {label: ms for (v, label), ms in results.items() if v == variant}
        if dense and sparse:
            dense_label, sparse_label = min(dense, key=dense.get), min(sparse, key=sparse.get)
            rows.append(pair_row(f"vit_large_patch16_224 step bs64, 2:4 {what}: fastest 2:4 ({sparse_label}) vs "
                                 f"fastest dense ({dense_label})", "best", dense[dense_label], sparse[sparse_label]))
            print_row(rows[-1])
    return rows


TRAIN_PY_STEPS = 45  # train.py's Throughput: 5 warm-up steps, then two windows of 20 (steps 6-45)
TRAIN_PY_WORKERS = 6  # synthetic images are drawn on the CPU; 6 loader workers keep up with a ViT-L step


def bare_vit_l_step(sparsity: str, compile_mode: str | None = None, cuda_graph: bool = False) -> Callable[[], None]:
    """vit_l_24's step without Lightning (bench_vit.bare_vit_step): dense, or its 2:4 MLPs for "semi24"."""
    from bench_vit import bare_vit_step, recipe_settings
    return bare_vit_step(recipe_settings("vit_l_24"), "mlp24" if sparsity == "semi24" else "dense", cuda_graph,
                         compile_mode)


def _bare_loop_images_per_s(sparsity: str, compile_mode: str | None, cuda_graph: bool = False) -> float:
    """Images/s of `bare_vit_l_step` over train.py's throughput window (5 warm-up steps, then the rest)."""
    step = bare_vit_l_step(sparsity, compile_mode, cuda_graph)
    try:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(TRAIN_PY_STEPS - 5):
            step()
        torch.cuda.synchronize()
        return 64 * (TRAIN_PY_STEPS - 5) / (time.perf_counter() - start)
    finally:
        del step
        torch.cuda.empty_cache()


def _train_py_images_per_s(sparsity: str, compile_mode: str | None, root: pathlib.Path,
                           cuda_graph: bool = False) -> float:
    """images_per_second from summary.json of `python train.py recipe=vit_l_24 data=synthetic ...`."""
    import subprocess
    run_name = f"{sparsity}-{compile_mode or 'eager'}{'-graph' if cuda_graph else ''}"
    cmd = [sys.executable, str(pathlib.Path(__file__).resolve().parents[1] / "train.py"), "recipe=vit_l_24",
           f"sparsity={sparsity}", "data=synthetic", "data.batch_size=64", f"data.train_size={64 * TRAIN_PY_STEPS}",
           f"data.num_workers={TRAIN_PY_WORKERS}", f"trainer.max_steps={TRAIN_PY_STEPS}", "trainer.limit_val_batches=1",
           "sched.warmup_steps=5", "trainer.enable_progress_bar=false", "logger=csv", f"paths.root={root}",
           f"run_name={run_name}", f"compile={compile_mode or 'null'}", f"cuda_graph={str(cuda_graph).lower()}"]
    print("  $ " + " ".join(cmd[1:]), flush=True)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"train.py failed ({done.returncode}): {done.stderr[-600:]}")
    return json.loads((root / "vit_l_24" / run_name / "summary.json").read_text())["images_per_second"]


# Section i's modes: train.py's (`compile:`, `cuda_graph:`) per row (None, False: eager). --train-modes picks.
TRAIN_MODES = {"eager": (None, False), "default": ("default", False), "reduce-overhead": ("reduce-overhead", False),
               "cuda-graph": (None, True)}


def section_i(t: Timer, quick: bool) -> list[dict]:
    """The ViT-L step through `train.py` (images/s from summary.json) vs the bare loop, same mode and batch
    (--quick: the 2:4 recipe only)."""
    import tempfile
    rows = []
    with tempfile.TemporaryDirectory() as root:
        for label, (compile_mode, cuda_graph) in TRAIN_MODES.items():
            for sparsity in ("semi24",) if quick else ("semi24", "dense"):
                try:
                    through = _train_py_images_per_s(sparsity, compile_mode, pathlib.Path(root), cuda_graph)
                    bare = _bare_loop_images_per_s(sparsity, compile_mode, cuda_graph)
                    rows.append({"name": f"vit_l_24 {sparsity} train.py vs bare loop (bf16-mixed, batch 64, "
                                         f"{TRAIN_PY_WORKERS} loader workers)", "mode": label,
                                 "train_py_img_s": round(through, 1),
                                 "bare_loop_img_s": round(bare, 1), "ratio": round(through / bare, 3),
                                 "verdict": "within 3%" if through >= 0.97 * bare else "MISSED (over 3% slower)"})
                except Exception as e:
                    rows.append({"name": f"vit_l_24 {sparsity} train.py vs bare loop, {label}",
                                 "error": f"{type(e).__name__}: {e}"[:600]})
                print_row(rows[-1])
    return rows


# Kernel name fragments -> what the step spends that time on (first match wins, lower-case names).
KERNEL_KINDS = [
    ("prune+compress kernel", ("prune_compress",)),
    ("cuSPARSELt compress (torch._cslt_compress)", ("compresssparse",)),
    ("cuSPARSELt 2:4 GEMMs", ("sparse", "spmma", "sp_gemm")),
    ("attention", ("flash", "fmha", "attention", "sdpa")),
    ("dense GEMMs", ("gemm", "nvjet", "cutlass", "xmma", "sm90_")),
    ("optimizer (fused AdamW)", ("multi_tensor", "foreach", "fused_adam")),
    ("inductor-fused elementwise/reductions", ("triton_",)),
    ("copies and fills", ("memcpy", "memset", "copy", "fill")),
]


def _kernel_kind(name: str) -> str:
    lowered = name.lower()
    return next((kind for kind, parts in KERNEL_KINDS if any(p in lowered for p in parts)),
                "other elementwise/reductions (eager)")


def _kernel_profile(step, steps: int = 3) -> dict:
    """GPU kernel time per kind of `step()` (torch.profiler, after 3 warm-up calls), and the idle gaps."""
    from torch.profiler import ProfilerActivity, profile
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - start) * 1e3 / steps
    kinds, kernels = {}, {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            ms = event.device_time / 1e3 / steps  # the profiler's times are us
            kinds[_kernel_kind(event.name)] = kinds.get(_kernel_kind(event.name), 0.0) + ms
            kernels[event.name] = kernels.get(event.name, 0.0) + ms
    return {"wall_ms": wall_ms, "kernel_ms": sum(kinds.values()), "kinds": kinds,
            "top": sorted(kernels.items(), key=lambda item: -item[1])[:6]}


def _vit_step_profile(variant: str | None, compiled: bool) -> dict:
    import timm
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = timm.create_model("vit_large_patch16_224", num_classes=1000).to(DT)
    if variant is not None:
        for block in model.blocks:
            block.mlp.fc1 = SPARSE_VARIANTS[variant](block.mlp.fc1)
            block.mlp.fc2 = SPARSE_VARIANTS[variant](block.mlp.fc2)
    if compiled:
        _compile_blocks(model)
    images = torch.randn(64, 3, 224, 224, device="cuda", dtype=DT)
    labels = torch.randint(0, 1000, (64,), device="cuda")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)

    def step():
        F.cross_entropy(model(images).float(), labels).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    try:
        return _kernel_profile(step)
    finally:
        del model, opt
        torch.cuda.empty_cache()


def _act24_mlp_profile(act24: bool | None) -> dict:
    d, h = MLP_SHAPES["vit_l"]
    torch.manual_seed(0)
    mlp = _squared_relu_mlp(d, h, act24)
    x = torch.randn(TOKENS, d, device="cuda", dtype=DT, requires_grad=True)
    gout = torch.randn(TOKENS, d, device="cuda", dtype=DT)
    return _kernel_profile(lambda: mlp(x).backward(gout), steps=10)


def section_p(t: Timer, quick: bool) -> list[dict]:
    """Where the GPU time goes (torch.profiler, kernel time per kind): a ViT-L step dense vs the
    library's 2:4 MLPs, eager and compiled per block, and the Squared-ReLU MLP dense vs 2:4
    activations."""
    runs = {"Squared-ReLU MLP fwd+bwd, dense": lambda: _act24_mlp_profile(None),
            "Squared-ReLU MLP fwd+bwd, fc2 input 2:4 row-wise": lambda: _act24_mlp_profile(False),
            "ViT-L step, dense, eager": lambda: _vit_step_profile(None, False),
            "ViT-L step, 2:4 library, eager": lambda: _vit_step_profile(LIBRARY, False)}
    if not quick:
        runs["ViT-L step, dense, compiled per block"] = lambda: _vit_step_profile(None, True)
        runs["ViT-L step, 2:4 library, compiled per block"] = lambda: _vit_step_profile(LIBRARY, True)
    rows = []
    for label, run_profile in runs.items():
        try:
            run = run_profile()
        except Exception as e:
            rows.append({"name": f"profile {label}", "error": f"{type(e).__name__}: {e}"[:300]})
            print_row(rows[-1])
            continue
        found = [("wall per step", run["wall_ms"]), ("GPU kernels per step (sum)", run["kernel_ms"]),
                 ("GPU idle (wall - kernels)", run["wall_ms"] - run["kernel_ms"])]
        found += sorted(run["kinds"].items(), key=lambda item: -item[1])
        found += [(f"top kernel {name[:90]}", ms) for name, ms in run["top"]]
        for what, ms in found:
            rows.append({"name": f"profile {label}: {what}", "mode": "profile", "ms": round(ms, 3)})
            print_row(rows[-1])
    return rows


SECTIONS = {"a": section_a, "b": section_b, "c": section_c, "d": section_d, "e": section_e,
            "f": section_f, "g": section_g, "h": section_h, "i": section_i, "p": section_p}
TITLES = {
    "a": "GEMMs of a linear's training step (ViT MLP shapes, 12608 tokens, searched algorithm)",
    "b": "Prune + compress both ways, per weight",
    "c": "Host (CPU) time per call",
    "d": "ViT-L MLP block forward + backward (Linear-GELU-Linear, 12608 tokens, 1024->4096->1024)",
    "e": "Full ViT-L/16 training step (batch 64, bf16 params, AdamW)",
    "f": "Squared-ReLU MLP forward + backward, fc2's input activations 2:4 (12608 tokens, 1024->4096->1024)",
    "g": "ViT-L/16 inference, batch 64, 2:4 static compressed MLP weights",
    "h": "Full ViT-L/16 training step compiled (batch 64, bf16 params, AdamW), vs the fastest dense mode",
    "i": "The ViT-L step through train.py (summary.json) vs the bare loop",
    "p": "Profile: GPU time per kernel kind in a ViT-L step (torch.profiler)",
}


# -------------------------------------------------------------------------------------- reporting
def print_row(row: dict) -> None:
    print("  " + " | ".join(f"{k}={v}" for k, v in row.items()), flush=True)


def environment() -> dict:
    import triton
    props = torch.cuda.get_device_properties(0)
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "gpu": props.name, "sm": f"{props.major}.{props.minor}", "multiprocessors": props.multi_processor_count,
        "torch": torch.__version__, "cuda": torch.version.cuda,
        "cusparselt": torch.backends.cusparselt.version(), "triton": triton.__version__,
        "python": platform.python_version(),
    }


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [f"# Benchmark {env['date']}", "",
             "| " + " | ".join(env) + " |", "|" + "---|" * len(env), "| " + " | ".join(str(v) for v in env.values()) + " |",
             "", f"Run: `python scripts/bench.py {' '.join(report['argv'])}`. Medians after warm-up, random data. "
             "graph = GPU time inside one CUDA graph (host overhead removed); eager = wall time per call of "
             "back-to-back launches. speedup = dense / sparse; SLOWER where sparse loses.", ""]
    for key, sec in report["sections"].items():
        lines += [f"## ({key}) {TITLES[key]}", ""]
        if sec.get("error"):
            lines += [f"FAILED: `{sec['error']}`", ""]
        rows = sec.get("rows", [])
        if rows:
            cols = list(dict.fromkeys(k for r in rows for k in r))
            lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
            lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
            lines.append("")
    return "\n".join(lines)


def write_report(report: dict, out: pathlib.Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    stem = "bench-" + report["environment"]["date"][:16].replace(":", "")
    (out / f"{stem}.json").write_text(json.dumps(report, indent=1))
    (out / f"{stem}.md").write_text(markdown(report))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and shapes; section e shrunk")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections ({','.join(SECTIONS)})")
    parser.add_argument("--step-modes", default=",".join(STEP_MODES),
                        help=f"section h's compiled modes ({','.join(STEP_MODES)})")
    parser.add_argument("--train-modes", default="eager,default",
                        help=f"section i's train.py modes ({','.join(TRAIN_MODES)})")
    parser.add_argument("--out", default=str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
    args = parser.parse_args()
    for modes, wanted in ((STEP_MODES, args.step_modes), (TRAIN_MODES, args.train_modes)):
        unknown = set(wanted.split(",")) - set(modes)
        if unknown:
            parser.error(f"unknown mode(s) {sorted(unknown)}; use some of {','.join(modes)}")
        for mode in set(modes) - set(wanted.split(",")):
            del modes[mode]
    if not torch.cuda.is_available():
        print("bench.py needs a CUDA GPU", file=sys.stderr)
        return 2
    timer = Timer(args.quick)
    report = {"environment": environment(), "argv": sys.argv[1:], "sections": {}}
    print(json.dumps(report["environment"]), flush=True)
    for key in [s.strip() for s in args.only.split(",") if s.strip()]:
        if key not in SECTIONS:
            print(f"unknown section {key!r}; use one of {','.join(SECTIONS)}", file=sys.stderr)
            continue
        print(f"[{key}] {TITLES[key]}", flush=True)
        t0 = time.time()
        section = {"rows": [], "error": None}
        try:
            section["rows"] = SECTIONS[key](timer, args.quick)
        except Exception as e:  # independent sections: report and go on
            section["error"] = f"{type(e).__name__}: {e}"[:500]
            traceback.print_exc(limit=8)
        section["seconds"] = round(time.time() - t0, 1)
        report["sections"][key] = section
        print(f"[{key}] {'FAILED' if section['error'] else 'done'} in {section['seconds']} s", flush=True)
        torch.cuda.empty_cache()
        write_report(report, pathlib.Path(args.out))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
