"""Dense vs 2:4 on the GPU at hand: GEMMs, prune+compress, host cost, the ViT-L MLP block, a ViT-L step.

    python scripts/bench.py [--quick] [--only a,b,c,d,e] [--out benchmarks]

Every row times dense and sparse in the same run, on the same shapes, in the same mode, as medians
after warm-up on random data. "graph" is the GPU time of calls captured in one CUDA graph and
replayed (host overhead removed); "eager" is wall time per call of back-to-back launches (what a
plain PyTorch loop sees, host overhead included). A speedup under 1 is printed as SLOWER.
Sections are independent: one that fails prints its error and the others still run.
Writes benchmarks/bench-<date>.json and a .md copy with the GPU and software versions.
"""
from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import platform
import statistics
import sys
import time
import traceback

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

DT = torch.bfloat16
TOKENS = 64 * 197  # ViT batch 64 at 224 px: 196 patches + cls
MLP_SHAPES = {"vit_b": (768, 3072), "vit_l": (1024, 4096)}


# ---------------------------------------------------------------------------------------- timing
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
        times = []
        for _ in range(self.reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)

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
    """Same GEMM through sparsetrain.kernels.cslt_plans: the cuSPARSELt plan is built once per shape."""
    from sparsetrain.kernels.cslt_plans import sparse_mm as plan_mm
    return plan_mm(compressed, dense_t, True, _alg(compressed, dense_t), bias=bias)


def torch_route(w):
    """The correct torch-op route (gpu-facts.md): tile-op mask, apply it, compress both ways."""
    *_, bitmask = torch._sparse_semi_structured_tile(w, algorithm="", use_cutlass=False)
    wm = torch._sparse_semi_structured_apply_dense(w, bitmask)
    return torch._cslt_compress(wm), torch._cslt_compress(wm.t().contiguous())


def kernel_route(w):
    from sparsetrain.kernels import prune_compress_transposable
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
    from sparsetrain.kernels import compress_masked, compress_pruned, prune_compress_transposable
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
    from sparsetrain.kernels import compress_masked, prune_compress_transposable
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


def _vit_step_ms(t: Timer, variant: str | None, graph: bool) -> float:
    import timm
    torch.manual_seed(0)
    with torch.device("cuda"):  # initialising 300M parameters on the CPU takes longer than the timing
        model = timm.create_model("vit_large_patch16_224", num_classes=1000).to(DT)
    if variant is not None:
        for block in model.blocks:
            block.mlp.fc1 = SPARSE_VARIANTS[variant](block.mlp.fc1)
            block.mlp.fc2 = SPARSE_VARIANTS[variant](block.mlp.fc2)
    images = torch.randn(64, 3, 224, 224, device="cuda", dtype=DT)
    labels = torch.randint(0, 1000, (64,), device="cuda")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=True, capturable=graph)

    def step():
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


SECTIONS = {"a": section_a, "b": section_b, "c": section_c, "d": section_d, "e": section_e}
TITLES = {
    "a": "GEMMs of a linear's training step (ViT MLP shapes, 12608 tokens, searched algorithm)",
    "b": "Prune + compress both ways, per weight",
    "c": "Host (CPU) time per call",
    "d": "ViT-L MLP block forward + backward (Linear-GELU-Linear, 12608 tokens, 1024->4096->1024)",
    "e": "Full ViT-L/16 training step (batch 64, bf16 params, AdamW)",
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and shapes; section e shrunk")
    parser.add_argument("--only", default="a,b,c,d,e", help="comma-separated sections (a..e)")
    parser.add_argument("--out", default=str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench.py needs a CUDA GPU", file=sys.stderr)
        return 2
    timer = Timer(args.quick)
    report = {"environment": environment(), "argv": sys.argv[1:], "sections": {}}
    print(json.dumps(report["environment"]), flush=True)
    for key in [s.strip() for s in args.only.split(",") if s.strip()]:
        if key not in SECTIONS:
            print(f"unknown section {key!r}; use a..e", file=sys.stderr)
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
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "bench-" + report["environment"]["date"][:16].replace(":", "")
    (out / f"{stem}.json").write_text(json.dumps(report, indent=1))
    (out / f"{stem}.md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
