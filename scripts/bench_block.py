"""Block-sparse kernels vs cuBLAS dense (and torch's own BSR route) on the GPU at hand.

    python scripts/bench_block.py [--out benchmarks] [--only gemm,vit,mlp,profile]

Rows: the ViT-L MLP GEMMs (12608 tokens; 1024->4096 and 4096->1024) at 90%/64, 80%/64 and 90%/32, forward
(y = x W_s^T) and transposed (dx = dy W_s); ViT-L/16 inference end to end (timm, random init, batch 64,
bf16) with every MLP linear 90% block-sparse in 64-blocks; the ViT-L MLP block training step (fwd+bwd)
at 90%/64, layer by layer and as one fused node (GELU's backward in fc2's input-grad kernel). Dense and
sparse run in the same process on the same random data. Times are medians after warm-up: GEMMs by
`triton.testing.do_bench`, whole forwards/steps by CUDA events around eager calls and around replays of
one CUDA graph. Each row says whether it meets its target; the GEMM rows also give the floor (max of
bytes over the measured copy rate and kept FLOPs over the measured dense rate).
Writes benchmarks/bench-block-<date>.json and .md with the GPU and software versions, after every section, and
appends every measured figure to the record (results/speed.jsonl; `--record ''` for none) at the end.
"""
from __future__ import annotations

import argparse
import copy
import json
import pathlib
import subprocess
import sys
import traceback

import torch
import torch.nn.functional as F
import triton
import triton.testing
from torch import nn

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from sparsetrain.gpu.kernels import bsr_autotune  # noqa: E402
from sparsetrain.gpu.kernels.bsr_matmul import (  # noqa: E402
    block_sparse_input_grad,
    block_sparse_linear,
    index_from_block_mask,
)
from sparsetrain.sparse import sparsify_  # noqa: E402
from sparsetrain.sparse.block import block_mask_from_scores, block_norms, expand_block_mask  # noqa: E402
from sparsetrain.sparse.block_linear import fuse_mlp_gelu_  # noqa: E402
from sparsetrain.sparse.config import BlockConfig  # noqa: E402
from sparsetrain.sparse.fused_mlp import fuse_block_mlps_  # noqa: E402
from sparsetrain.sparse.schedules import Phase  # noqa: E402
from sparsetrain.sparse.sparsify import sparse_modules  # noqa: E402

# bench.py's timer and environment record (scripts/ is on sys.path when a script runs).
from bench import cuda_event_median_ms  # noqa: E402
from bench import environment as bench_environment  # noqa: E402

DT = torch.bfloat16
TOKENS = 64 * 197  # ViT batch 64 at 224 px: 196 patches + cls
VIT_L = (1024, 4096)
# sparsity, block, target speedup (None: no target; these rows find where `auto` should stop using the kernels)
GEMM_SETTINGS = [(0.9, 64, 3.0), (0.8, 64, 2.0), (0.9, 32, 2.0), (0.6, 64, None), (0.5, 64, None), (0.9, 16, None)]
VIT_TARGET, MLP_TARGET = 1.5, 1.5
MLP_FROZEN_TARGET = 2.0


# ---------------------------------------------------------------------------------------------- timing
def bench_ms(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def events_ms(fn, reps: int = 10) -> float:
    """Median ms of one call, each timed alone with CUDA events, after two warm-up calls."""
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    return cuda_event_median_ms(fn, reps)


def graph_ms(fn, reps: int = 10) -> float:
    """Median GPU ms of one call captured in a CUDA graph and replayed (host overhead removed)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up off the capture: tuning, compiles, allocations
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return events_ms(graph.replay, reps)


def copy_rate_tbs() -> float:
    """Device memory rate in TB/s (bytes read + written) of a 1 GiB device-to-device copy."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() / bench_ms(lambda: dst.copy_(src)) / 1e9


def dense_rate_tflops() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=DT)
    b = torch.randn(8192, 8192, device="cuda", dtype=DT)
    return 2 * 8192 ** 3 / bench_ms(lambda: a @ b) / 1e9


def verdict(speedup: float, target: float | None) -> str:
    if target is None:
        return "no target"
    return "met" if speedup >= target else f"MISSED ({speedup:.3f}x < {target}x)"


# ---------------------------------------------------------------------------------------------- data
def random_block_mask(out_f: int, in_f: int, block: int, sparsity: float, seed: int) -> torch.Tensor:
    """Magnitude block mask of a random weight: the blocks DRESS/magnitude pruning would keep (random here)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    scores = torch.rand(out_f // block, in_f // block, device="cuda", generator=g)
    return block_mask_from_scores(scores, sparsity)


def torch_bsr_ms(w_masked: torch.Tensor, dense_t: torch.Tensor, block: int) -> float | str:
    """torch's Triton BSR route, bsr @ dense, for reference (its A100-tuned parameters)."""
    try:
        from torch.sparse._triton_ops import bsr_dense_mm
        bsr = w_masked.to_sparse_bsr((block, block))
        return bench_ms(lambda: bsr_dense_mm(bsr, dense_t))
    except Exception as error:  # noqa: BLE001 - a reference column; its failure must not stop the table
        return f"{type(error).__name__}: {str(error)[:120]}"


# ---------------------------------------------------------------------------------------------- sections
def section_gemm(env: dict) -> list[dict]:
    rows = []
    for in_f, out_f in (VIT_L, VIT_L[::-1]):
        x = torch.randn(TOKENS, in_f, device="cuda", dtype=DT)
        gy = torch.randn(TOKENS, out_f, device="cuda", dtype=DT)
        w = torch.randn(out_f, in_f, device="cuda", dtype=DT) / in_f ** 0.5
        dense = {"forward": bench_ms(lambda: x @ w.t()), "transposed": bench_ms(lambda: gy @ w)}
        for sparsity, block, target in GEMM_SETTINGS:
            mask = random_block_mask(out_f, in_f, block, sparsity, seed=block)
            index = index_from_block_mask(mask, block)
            w_masked = w * expand_block_mask(mask, block)
            for direction in ("forward", "transposed"):
                if direction == "forward":
                    ours = lambda: block_sparse_linear(x, w, index)  # noqa: E731
                    ref = x.float() @ w_masked.float().t()
                    theirs = torch_bsr_ms(w_masked, x.t(), block) if target else "not run"
                    a_bytes, out_bytes = x.numel() * 2, TOKENS * out_f * 2
                else:
                    ours = lambda: block_sparse_input_grad(gy, w, index)  # noqa: E731
                    ref = gy.float() @ w_masked.float()
                    theirs = torch_bsr_ms(w_masked.t().contiguous(), gy.t(), block) if target else "not run"
                    a_bytes, out_bytes = gy.numel() * 2, TOKENS * in_f * 2
                error = float((ours().float() - ref).norm() / ref.norm())  # also tunes the kernel
                sparse_ms = bench_ms(ours)
                kept = index.density
                flops = 2 * TOKENS * in_f * out_f
                floor_ms = max((a_bytes + out_bytes + w.numel() * 2 * kept) / env["copy_tbs"] / 1e9,
                               kept * flops / env["dense_tflops"] / 1e9)
                speedup = dense[direction] / sparse_ms
                row = {
                    "name": f"ViT-L GEMM {in_f}->{out_f} {direction}, {sparsity:.0%} sparse, {block}x{block}",
                    "dense_ms": dense[direction], "sparse_ms": sparse_ms, "speedup": speedup,
                    "torch_bsr_ms": theirs,
                    "torch_bsr_speedup": dense[direction] / theirs if isinstance(theirs, float) else None,
                    "target": target, "verdict": verdict(speedup, target), "rel_err": error,
                    "floor_ms": floor_ms, "sparse_over_floor": sparse_ms / floor_ms,
                    "dense_tflops": flops / dense[direction] / 1e9,
                    "sparse_effective_tflops": kept * flops / sparse_ms / 1e9,
                    "sparse_gbs": (a_bytes + out_bytes + w.numel() * 2 * kept) / sparse_ms / 1e6,
                    "config": str(bsr_autotune.entries().get(_last_key(direction, in_f, out_f, block, kept))),
                }
                rows.append(row)
                print_row(row)
        del x, gy
        torch.cuda.empty_cache()
    return rows


def section_gelu(env: dict) -> list[dict]:
    """fc1 of the ViT-L MLP at 90%/64 with bias and GELU: what fusing GELU into the kernel's epilogue buys."""
    in_f, out_f = VIT_L
    x = torch.randn(TOKENS, in_f, device="cuda", dtype=DT)
    w = torch.randn(out_f, in_f, device="cuda", dtype=DT) / in_f ** 0.5
    bias = torch.randn(out_f, device="cuda", dtype=DT)
    mask = random_block_mask(out_f, in_f, 64, 0.9, seed=64)
    index = index_from_block_mask(mask, 64)
    ref = F.gelu(x.float() @ (w * expand_block_mask(mask, 64)).float().t() + bias.float())
    fused = lambda: block_sparse_linear(x, w, index, bias, gelu=True)  # noqa: E731
    error = float((fused().float() - ref).norm() / ref.norm())
    dense_ms = bench_ms(lambda: F.gelu(F.linear(x, w, bias)))
    rows = []
    for label, fn in (("GELU fused in the epilogue", fused),
                      ("GELU as a separate F.gelu", lambda: F.gelu(block_sparse_linear(x, w, index, bias))),
                      ("no GELU (bias only)", lambda: block_sparse_linear(x, w, index, bias))):
        sparse_ms = bench_ms(fn)
        row = {"name": f"ViT-L fc1 1024->4096 + bias, 90% sparse, 64x64, {label} (dense: F.gelu(F.linear))",
               "dense_ms": dense_ms, "sparse_ms": sparse_ms, "speedup": dense_ms / sparse_ms, "target": None,
               "verdict": verdict(dense_ms / sparse_ms, None), "rel_err_fused": error}
        rows.append(row)
        print_row(row)
    return rows


def _last_key(direction, in_f, out_f, block, kept) -> str:
    operation = "forward" if direction == "forward" else "input_grad"
    return bsr_autotune.TuningKey.of(operation, TOKENS, (out_f, in_f), block, kept, DT, False, False,
                                     torch.device("cuda", torch.cuda.current_device())).text


def _vit_large():
    import timm
    torch.manual_seed(0)
    with torch.device("cuda"):  # initialising 300M parameters on the CPU takes longer than the timing
        return timm.create_model("vit_large_patch16_224", num_classes=1000).to(DT).eval()


def _sparsify_mlps(model: nn.Module, fuse_gelu: bool) -> None:
    sparsify_(model, BlockConfig(block_size=64, sparsity=0.9), include=["blocks.*.mlp.fc1", "blocks.*.mlp.fc2"])
    if fuse_gelu:
        fuse_mlp_gelu_(model)


def section_vit(env: dict) -> list[dict]:
    images = torch.randn(64, 3, 224, 224, device="cuda", dtype=DT)
    model = _vit_large()
    rows = []
    with torch.no_grad():  # no autograd: the sparse fc1 applies GELU in its kernel
        dense = {"eager": events_ms(lambda: model(images)), "graph": graph_ms(lambda: model(images))}
        for fuse in (True, False):
            sparse_model = copy.deepcopy(model)
            _sparsify_mlps(sparse_model, fuse)
            sparse_model.eval()
            backends = {layer.backend_name for layer in sparse_model.modules() if hasattr(layer, "fuse_gelu")}
            masked_ref = _masked_dense_twin(sparse_model, model)
            error = float((sparse_model(images).float() - masked_ref(images).float()).norm()
                          / masked_ref(images).float().norm())
            del masked_ref
            for mode in ("eager", "graph"):
                timed = events_ms if mode == "eager" else graph_ms
                sparse_ms = timed(lambda: sparse_model(images))
                speedup = dense[mode] / sparse_ms
                row = {"name": f"ViT-L/16 inference, batch 64, MLPs 90% block-sparse (64), "
                               f"{'GELU fused into fc1' if fuse else 'GELU separate'}, {mode}",
                       "dense_ms": dense[mode], "sparse_ms": sparse_ms, "speedup": speedup, "target": VIT_TARGET,
                       "verdict": verdict(speedup, VIT_TARGET), "rel_err_vs_masked_dense": error,
                       "backends": sorted(backends)}
                rows.append(row)
                print_row(row)
            del sparse_model
            torch.cuda.empty_cache()
    del model
    torch.cuda.empty_cache()
    return rows


def _masked_dense_twin(sparse_model: nn.Module, dense_model: nn.Module) -> nn.Module:
    """The dense model with each sparse layer's masked weight: what the sparse model must compute."""
    twin = copy.deepcopy(dense_model)
    sparse_layers = dict(sparse_model.named_modules())
    for name, module in twin.named_modules():
        layer = sparse_layers.get(name)
        if isinstance(module, nn.Linear) and hasattr(layer, "effective_weight"):
            module.weight.copy_(layer.effective_weight())
    return twin


def _mlp(d: int, h: int) -> nn.Sequential:
    """timm's ViT MLP (fc1 -> exact GELU -> fc2), held in a Sequential so that `fuse_block_mlps_` can swap it."""
    from timm.layers import Mlp
    torch.manual_seed(0)
    return nn.Sequential(Mlp(d, h)).to("cuda", DT)


def section_mlp(env: dict) -> list[dict]:
    """The MLP training step at 90%/64: magnitude and DRESS masks re-picked every step, and a magnitude mask in its
    frozen phase (final: the index built once, pruned blocks get no weight gradient, so the block-sparse weight
    gradient computes only the kept blocks). The first two run layer by layer (GELU's backward a pass of its own)
    and as the fused node (`fuse_block_mlps_`: GELU' in fc2's input-grad kernel); the frozen one fused."""
    d, h = VIT_L
    x = torch.randn(TOKENS, d, device="cuda", dtype=DT, requires_grad=True)
    gout = torch.randn(TOKENS, d, device="cuda", dtype=DT)
    dense = _mlp(d, h)
    dense_step = lambda: dense(x).backward(gout)  # noqa: E731
    timings = {"eager": events_ms(dense_step), "graph": graph_ms(dense_step)}
    rows = []
    variants = [("magnitude", False, False), ("magnitude", True, False), ("scores", False, False),
                ("scores", True, False), ("magnitude", True, True)]
    for criterion, fused, frozen in variants:
        mlp = copy.deepcopy(dense)
        sparsify_(mlp, BlockConfig(block_size=64, sparsity=0.9, criterion=criterion), skip_dense_by_default=False)
        if fused:
            assert fuse_block_mlps_(mlp) == ["0"]
        mlp.train()
        if frozen:
            _freeze_masks(mlp, level=0.9)
        step = lambda: mlp(x).backward(gout)  # noqa: E731
        error = _dx_error(mlp, x, gout)
        for mode in ("eager", "graph"):
            sparse_ms = (events_ms if mode == "eager" else graph_ms)(step)
            speedup = timings[mode] / sparse_ms
            if frozen:
                what, target = "mask frozen (block-sparse weight grad)", MLP_FROZEN_TARGET
            else:
                what = "magnitude mask" if criterion == "magnitude" else "DRESS scores: blocks re-picked every step"
                target = MLP_TARGET
            how = "fused MLP node (GELU' in fc2's input-grad kernel)" if fused else "layer by layer"
            row = {"name": f"ViT-L MLP block fwd+bwd, {TOKENS} tokens, 90% sparse, 64x64, {what}, {how}, {mode}",
                   "dense_ms": timings[mode], "sparse_ms": sparse_ms, "speedup": speedup, "target": target,
                   "verdict": verdict(speedup, target), "dx_rel_err_vs_masked_dense": error,
                   "backend": mlp[0].fc1.backend_reason}
            rows.append(row)
            print_row(row)
    return rows


def _freeze_masks(model: nn.Module, level: float) -> None:
    """The frozen phase of a gradual schedule: the mask picked once more at the final level, then final."""
    for step, phase in enumerate((Phase("pruning", True, level, update_mask=True),
                                  Phase("sparse", True, level, update_mask=False, mask_final=True))):
        for _, layer in sparse_modules(model):
            layer.apply_phase(phase, step)


def _dx_error(mlp: nn.Module, x: torch.Tensor, gout: torch.Tensor) -> float:
    """dX of the sparse MLP against the same MLP with masked dense weights, in fp32."""
    fc1, fc2 = mlp[0].fc1, mlp[0].fc2
    twin = nn.Sequential(nn.Linear(fc1.in_features, fc1.out_features), nn.GELU(),
                         nn.Linear(fc2.in_features, fc2.out_features)).cuda()
    x.grad = None
    mlp(x).backward(gout)
    got = x.grad.float()
    with torch.no_grad():
        for i, layer in ((0, fc1), (2, fc2)):
            twin[i].weight.copy_(layer.effective_weight().float())
            twin[i].bias.copy_(layer.bias.float())
    xf = x.detach().float().requires_grad_(True)
    twin(xf).backward(gout.float())
    x.grad = None
    for p in mlp.parameters():
        p.grad = None
    return float((got - xf.grad).norm() / xf.grad.norm())


def section_profile(env: dict) -> list[dict]:
    """GPU kernel times of one sparse and one dense MLP training step (torch.profiler): where the time goes."""
    from torch.profiler import ProfilerActivity, profile
    d, h = VIT_L
    x = torch.randn(TOKENS, d, device="cuda", dtype=DT, requires_grad=True)
    gout = torch.randn(TOKENS, d, device="cuda", dtype=DT)
    rows = []
    for label in ("dense", "sparse 90%/64", "sparse 90%/64 fused MLP node"):
        mlp = _mlp(d, h)
        if label != "dense":
            sparsify_(mlp, BlockConfig(block_size=64, sparsity=0.9), skip_dense_by_default=False)
        if label.endswith("fused MLP node"):
            fuse_block_mlps_(mlp)
        mlp.train()
        for _ in range(3):
            mlp(x).backward(gout)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                mlp(x).backward(gout)
            torch.cuda.synchronize()
        kernels = {}
        for event in prof.key_averages():
            if event.device_type != torch.autograd.DeviceType.CUDA:  # kernels only: ops would count them twice
                continue
            device_us = getattr(event, "self_device_time_total", None)
            kernels[event.key] = (device_us if device_us is not None else event.self_cuda_time_total) / 5
        for name, us in sorted(kernels.items(), key=lambda kv: -kv[1])[:8]:
            row = {"name": f"profile {label}: {name[:90]}", "us_per_step": us}
            rows.append(row)
            print_row(row)
    return rows


SECTIONS = {"gemm": section_gemm, "gelu": section_gelu, "vit": section_vit, "mlp": section_mlp, "profile": section_profile}


# ---------------------------------------------------------------------------------------------- report
def environment() -> dict:
    """bench.py's record of the GPU and the versions, plus where the kernel tuning is cached."""
    return {**bench_environment(), "tuning_cache": str(bsr_autotune.cache_path())}


def print_row(row: dict) -> None:
    if "error" in row:
        print(f"{row['name']}: ERROR {row['error']}", flush=True)
    elif "us_per_step" in row:
        print(f"{row['name']}: {row['us_per_step']:.1f} us/step", flush=True)
    else:
        print(f"{row['name']}: dense {row['dense_ms']:.4f} ms, sparse {row['sparse_ms']:.4f} ms, "
              f"{row['speedup']:.2f}x ({row['verdict']})", flush=True)


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [f"# Block-sparse kernels vs dense, {env['date']}", "",
             f"{env['gpu']} ({env['multiprocessors']} SMs), torch {env['torch']}, CUDA {env['cuda']}, Triton {env['triton']}, "
             f"Python {env['python']}. Copy rate {env.get('copy_tbs', 0):.2f} TB/s, dense bf16 8192^3 "
             f"{env.get('dense_tflops', 0):.0f} TFLOP/s. `python scripts/bench_block.py`.", ""]
    for section, rows in report["sections"].items():
        lines += [f"## {section}", ""]
        if section == "gemm":
            lines += ["| row | dense ms | ours ms | speedup | target | torch BSR ms (speedup) | floor ms | ours/floor "
                      "| eff. TFLOP/s | GB/s | rel err | config |", "|" + "---|" * 12]
        elif section == "profile":
            lines += ["| kernel | us per step |", "|---|---|"]
        else:
            lines += ["| row | dense ms | sparse ms | speedup | target |", "|---|---|---|---|---|"]
        for row in rows:
            if "error" in row:
                lines.append(f"| {row['name']} | ERROR: {row['error']} |")
            elif section == "gemm":
                theirs = (f"{row['torch_bsr_ms']:.4f} ({row['torch_bsr_speedup']:.2f}x)"
                          if row["torch_bsr_speedup"] else str(row["torch_bsr_ms"])[:60])
                lines.append(f"| {row['name']} | {row['dense_ms']:.4f} | {row['sparse_ms']:.4f} | "
                             f"**{row['speedup']:.2f}x** | {row['verdict']} | {theirs} | {row['floor_ms']:.4f} | "
                             f"{row['sparse_over_floor']:.2f} | {row['sparse_effective_tflops']:.0f} | "
                             f"{row['sparse_gbs']:.0f} | {row['rel_err']:.1e} | {row['config']} |")
            elif section == "profile":
                lines.append(f"| {row['name']} | {row['us_per_step']:.1f} |")
            else:
                lines.append(f"| {row['name']} | {row['dense_ms']:.3f} | {row['sparse_ms']:.3f} | "
                             f"**{row['speedup']:.2f}x** | {row['verdict']} |")
        lines.append("")
    return "\n".join(lines)


PROFILE_FIGURE = "kernel time per step: MLP block fwd+bwd, 12608 tokens, 90% of 64x64 blocks (torch.profiler)"


def record_rows(report: dict, command: str, commit: str | None) -> list[dict]:
    """The rows of results/speed.jsonl for a report: one per measured figure and variant (scripts/tables.py)."""
    env = report["environment"]
    base = {"commit": commit, "date": env["date"][:16], "device": env["gpu"], "torch": env["torch"],
            "cusparselt": env["cusparselt"], "triton": env["triton"], "python": env["python"], "command": command,
            "min": None, "max": None, "repeats": None}

    def row(model, figure, variant, unit, value):
        return {**base, "model": model, "figure": figure, "variant": variant, "unit": unit, "median": round(value, 4)}
    rows = [row("h100", "device copy rate (read + write)", "copy", "TB/s", env["copy_tbs"]),
            row("h100", "dense bf16 GEMM rate", "dense", "TFLOP/s", env["dense_tflops"])]
    for section, measured in report["sections"].items():
        for r in (r for r in measured if "error" not in r):
            if section == "profile":
                side, kernel = r["name"].removeprefix("profile ").split(": ", 1)
                rows.append(row("vit_l", PROFILE_FIGURE, f"{side}: {kernel}", "us", r["us_per_step"]))
                continue
            figure = r["name"].removeprefix("ViT-L/16 ").removeprefix("ViT-L ")
            rows += [row("vit_l", figure, "dense", "ms", r["dense_ms"]),
                     row("vit_l", figure, "block-sparse (Triton)", "ms", r["sparse_ms"])]
            if isinstance(r.get("torch_bsr_ms"), float):
                rows.append(row("vit_l", figure, "torch BSR", "ms", r["torch_bsr_ms"]))
    return rows


def git_commit() -> str | None:
    root = pathlib.Path(__file__).resolve().parents[1]
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "-uno"], cwd=root, capture_output=True, text=True).stdout
    return head and head + ("+dirty" if dirty.strip() else "") or None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {list(SECTIONS)}")
    parser.add_argument("--record", default=str(pathlib.Path(__file__).resolve().parents[1] / "results" / "speed.jsonl"),
                        help="JSON-lines record to append the figures to ('' for none)")
    args = parser.parse_args()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = environment()
    env["copy_tbs"], env["dense_tflops"] = copy_rate_tbs(), dense_rate_tflops()
    print(json.dumps(env), flush=True)
    report = {"environment": env, "argv": sys.argv[1:], "sections": {}}
    stem = "bench-block-" + env["date"][:16].replace(":", "")
    for name in args.only.split(","):
        try:
            report["sections"][name] = SECTIONS[name](env)
        except Exception as error:  # one section failing must not hide the others
            traceback.print_exc()
            report["sections"][name] = [{"name": name, "error": f"{type(error).__name__}: {error}"[:300]}]
        report["tuned"] = {key: str(config) for key, config in bsr_autotune.entries().items()}
        (out / f"{stem}.json").write_text(json.dumps(report, indent=1, default=str))
        (out / f"{stem}.md").write_text(markdown(report))
    print(f"wrote {out / stem}.json and .md", flush=True)
    if args.record:
        rows = record_rows(report, " ".join(["python", "scripts/bench_block.py", *sys.argv[1:]]), git_commit())
        with open(args.record, "a") as record:
            record.writelines(json.dumps(row) + "\n" for row in rows)
        print(f"appended {len(rows)} rows to {args.record}", flush=True)


if __name__ == "__main__":
    main()
