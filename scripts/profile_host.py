"""Where the host (CPU) time of eager 2:4 training goes: cProfile of one SparseLinear forward+backward,
and of `train.py` steps against the bare loop's. The GPU side has its own profile (`bench.py --only p`).

    python scripts/profile_host.py linear [--calls 200] [--tokens 256]
    python scripts/profile_host.py trainpy -- recipe=vit_l_24 data=synthetic trainer.max_steps=30 ...

`linear` times the call without the profiler first (wall ms per call, few tokens so the GPU finishes
first and the wall time is the host's), then profiles the same calls; `trainpy` runs train.py in this
process under cProfile. Both print the functions with the most own time and with the most cumulative
time, so a reader can see which Python frames the milliseconds sit in.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import runpy
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def print_stats(profile: cProfile.Profile, top: int) -> None:
    for key in ("tottime", "cumulative"):
        out = io.StringIO()
        pstats.Stats(profile, stream=out).strip_dirs().sort_stats(key).print_stats(top)
        print(f"--- top {top} by {key}")
        print(out.getvalue())


def sparse_linear(d: int, h: int, device: str, dtype: torch.dtype) -> nn.Module:
    """A training-mode SparseLinear as the library builds it (2:4, transposable, mask re-pruned per step)."""
    from sparsetrain.sparse import Semi24Config, SparseLinear
    return SparseLinear.from_dense(nn.Linear(d, h).to(device, dtype), Semi24Config(), "fc1").train()


def profile_linear(calls: int, tokens: int, top: int) -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    d, h = 1024, 4096  # ViT-L fc1
    layer = sparse_linear(d, h, device, dtype)
    x = torch.randn(tokens, d, device=device, dtype=dtype, requires_grad=True)
    gy = torch.randn(tokens, h, device=device, dtype=dtype)

    def step():
        layer(x).backward(gy)

    for _ in range(10):  # warm-up: algorithm search, plan cache, Triton compile
        step()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(calls):
        step()
    sync()
    print(f"{device} {torch.cuda.get_device_name() if device == 'cuda' else ''} SparseLinear {d}->{h}, {tokens} "
          f"tokens, fwd+bwd: {1e3 * (time.perf_counter() - start) / calls:.3f} ms wall per call (no profiler)")
    row = layer.describe()
    print(f"layer: {row['backend']} ({row['reason']})")
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(calls):
        step()
    sync()
    profile.disable()
    print_stats(profile, top)


def profile_trainpy(args: list[str], top: int) -> None:
    sys.argv = [str(ROOT / "train.py"), *args]
    profile = cProfile.Profile()
    profile.enable()
    try:
        runpy.run_path(str(ROOT / "train.py"), run_name="__main__")
    except SystemExit:
        pass
    profile.disable()
    print_stats(profile, top)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("linear", "trainpy"))
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--top", type=int, default=30)
    args, rest = parser.parse_known_args()  # the rest: train.py overrides (after --)
    args.train_args = [a for a in rest if a != "--"]
    if args.what == "linear" and args.train_args:
        parser.error(f"unrecognized arguments: {args.train_args}")
    if args.what == "linear":
        profile_linear(args.calls, args.tokens, args.top)
    else:
        profile_trainpy(args.train_args, args.top)


if __name__ == "__main__":
    main()
