"""GPU timeline of a few training steps: how long the GPU is busy and idle, and what the host was doing in the gaps.

    python scripts/profile_timeline.py OUTDIR LABEL trainpy [--no-stack] [--start N] recipe=vit_l_24 data=synthetic ...
    python scripts/profile_timeline.py OUTDIR LABEL bare [--no-stack] semi24|dense graph|eager

`trainpy` runs train.py in this process and records steps N to N+4 (default 28) with torch.profiler, and prints a
table of every step: its GPU-clock time, where the host spent it (between hooks), how long the host waited for
the GPU at the loss check, and what the caching allocators did (device and pinned-host allocations, allocation
retries after running out of memory). `bare` records scripts/bench.py's bare loop
step (`bare_vit_l_step`: train.py's model, bf16 autocast, fused AdamW, clipping), after 20 unprofiled
steps whose images/s it prints. The report (OUTDIR/timeline-LABEL.txt) gives per step: GPU busy and idle time
(idle by gap size), the kernels with the most time, every host sync or copy with its Python caller, and the
largest gaps with the host frames that launched the next kernel or ran inside the gap.

Python stacks are recorded (with_stack), which slows the host several-fold in the profiled steps: a gap
there says where host time goes, not how large it is unprofiled. --no-stack records torch ops only: the
gaps are then close to their unprofiled size, attributed to ops instead of Python frames. The raw trace
stays in OUTDIR/trace-LABEL.json (hundreds of MB for a ViT-L step; delete it after reading the report).
"""
from __future__ import annotations

import argparse
import json
import runpy
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))  # bench.py's bare loop

START, STEPS = 28, 5
SYNC_CALLS = ("Synchronize", "Memcpy", "memcpy")


class Report:
    def __init__(self, path: Path, label: str):
        self.file = open(path, "w")
        self.label = label

    def __call__(self, *parts) -> None:
        line = " ".join(str(part) for part in parts)
        print(f"[{self.label}] {line}", flush=True)
        self.file.write(line + "\n")
        self.file.flush()


def _gpu_gaps(gpu: list[dict]) -> tuple[float, list[tuple[float, float, dict]]]:
    """Busy microseconds (union of kernel/copy intervals) and the gaps between them (start, end, next event)."""
    busy, gaps = 0.0, []
    start, end = gpu[0]["ts"], gpu[0]["ts"] + gpu[0]["dur"]
    for event in gpu[1:]:
        if event["ts"] > end:
            busy += end - start
            gaps.append((end, event["ts"], event))
            start = event["ts"]
        end = max(end, event["ts"] + event["dur"])
    return busy + end - start, gaps


def analyze(trace_path: Path, steps: int, wall_s: float, say: Report) -> None:
    events = json.load(open(trace_path))["traceEvents"]
    timed = [e for e in events if "dur" in e]
    gpu = sorted((e for e in timed if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")), key=lambda e: e["ts"])
    runtime = [e for e in timed if e.get("cat") == "cuda_runtime"]
    host = [e for e in timed if e.get("cat") in ("python_function", "cpu_op", "user_annotation")]
    if not gpu:
        say("no GPU events in the trace (CPU run?): nothing to analyse")
        return
    span = max(e["ts"] + e["dur"] for e in gpu) - gpu[0]["ts"]
    busy, gaps = _gpu_gaps(gpu)
    t0 = gpu[0]["ts"]
    say(f"steps {steps}; wall {wall_s * 1e3 / steps:.2f} ms/step (host clock); GPU span {span / 1e3 / steps:.2f} "
        f"ms/step, busy {busy / 1e3 / steps:.2f}, idle {(span - busy) / 1e3 / steps:.3f} ms/step "
        f"({100 * (span - busy) / span:.1f}%)")
    by_size = Counter()
    for g0, g1, _ in gaps:
        d = g1 - g0
        by_size["<10us" if d < 10 else "10-50us" if d < 50 else "50-200us" if d < 200 else
                "200us-1ms" if d < 1000 else ">1ms"] += d
    say("idle by gap size (ms/step):", {size: round(us / 1e3 / steps, 3) for size, us in by_size.items()})
    per_kernel = defaultdict(float)
    for event in gpu:
        per_kernel[event["name"][:90]] += event["dur"]
    say("top GPU kernels (ms/step):")
    for name, us in sorted(per_kernel.items(), key=lambda kv: -kv[1])[:12]:
        say(f"   {us / 1e3 / steps:8.3f}  {name}")

    def stack_at(ts: float, depth: int = 7) -> str:
        enclosing = sorted((p for p in host if p["ts"] <= ts <= p["ts"] + p["dur"]), key=lambda p: p["ts"])
        return " > ".join(p["name"].split("/")[-1][:70] for p in enclosing[-depth:])

    syncs = [e for e in runtime if any(s in e["name"] for s in SYNC_CALLS)]
    totals = defaultdict(lambda: [0, 0.0])
    for event in syncs:
        entry = totals[(event["name"], stack_at(event["ts"], 4))]
        entry[0] += 1
        entry[1] += event["dur"]
    say("host sync/copy calls (count, host ms total) by caller:")
    for (name, caller), (count, us) in sorted(totals.items(), key=lambda kv: -kv[1][1])[:15]:
        say(f"   {count:4d} {us / 1e3:8.2f} ms  {name}  <- {caller}")
    launches = {e.get("args", {}).get("correlation"): e for e in runtime}
    say("largest gaps:")
    for g0, g1, event in sorted(gaps, key=lambda g: g[0] - g[1])[:12]:
        say(f" gap {(g1 - g0) / 1e3:.3f} ms at +{(g0 - t0) / 1e3:.2f} ms; next: {event['name'][:60]}")
        launch = launches.get(event.get("args", {}).get("correlation"))
        if launch:
            say(f"    launched at +{(launch['ts'] - t0) / 1e3:.2f} ms by: {stack_at(launch['ts'])}")
        for sync in [s for s in syncs if g0 - 30 <= s["ts"] + s["dur"] <= g0 + 200][:2]:
            say(f"    host waited in {sync['name']} ({sync['dur'] / 1e3:.2f} ms) from: {stack_at(sync['ts'])}")
        inside = sorted((p for p in host if p.get("cat") == "python_function" and p["ts"] >= g0
                         and p["ts"] + p["dur"] <= g1 and p["dur"] > 0.15 * (g1 - g0)), key=lambda p: -p["dur"])
        for frame in inside[:4]:
            say(f"    host ran {frame['dur'] / 1e3:.2f} ms: {frame['name'][:100]}")


WITH_STACK = True  # --no-stack turns it off


def _profiler():
    return profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=WITH_STACK)


def bare(out: Path, label: str, sparsity: str, mode: str, say: Report) -> None:
    from bench import bare_vit_l_step
    step = bare_vit_l_step(sparsity, cuda_graph=mode == "graph")
    for _ in range(START):
        step()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(20):
        step()
    torch.cuda.synchronize()
    say(f"bare loop {sparsity} {mode}: {64 * 20 / (time.perf_counter() - t):.1f} img/s (20 unprofiled steps)")
    with _profiler() as prof:
        t = time.perf_counter()
        for _ in range(STEPS):
            step()
        torch.cuda.synchronize()
        wall = time.perf_counter() - t
    prof.export_chrome_trace(str(out / f"trace-{label}.json"))
    analyze(out / f"trace-{label}.json", STEPS, wall, say)


def trainpy(out: Path, label: str, overrides: list[str], say: Report) -> None:
    import lightning.pytorch as L

    from sparsetrain.training import app

    class StepTable(L.Callback):
        """Host clock at each hook of every step, the loss check's wait, and allocator counters."""

        HOOKS = ("batch_start", "before_backward", "after_backward", "before_optimizer_step", "batch_end")

        def __init__(self):
            self.rows, self.row, self.wait = [], None, 0.0

        def _stamp(self, hook):
            if self.row is not None:
                self.row[hook] = time.perf_counter()

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if self.row is None:
                watch = pl_module.loss_watch
                first_nonfinite = watch.first_nonfinite

                def timed():
                    t = time.perf_counter()
                    try:
                        return first_nonfinite()
                    finally:
                        self.wait += time.perf_counter() - t
                watch.first_nonfinite = timed
            self.row = {"step": trainer.global_step, **_allocator_counts()}
            self.rows.append(self.row)
            self.wait = 0.0
            self._stamp("batch_start")

        def on_before_backward(self, trainer, pl_module, loss):
            self._stamp("before_backward")

        def on_after_backward(self, trainer, pl_module):
            self._stamp("after_backward")

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            self._stamp("before_optimizer_step")

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self._stamp("batch_end")
            self.row["loss_check_wait"] = self.wait

        def on_train_end(self, trainer, pl_module):
            throughput = next((c for c in trainer.callbacks if type(c).__name__ == "Throughput"), None)
            gpu = throughput.step_seconds if throughput is not None else []
            say("per step (ms; host: time from the hook named to the next; gpu: batch start to batch start on the "
                "GPU's clock; alloc: new device segments / retries / new pinned host blocks)")
            say(f"{'step':>5} {'gpu':>8} {'fwd':>7} {'bwd':>7} {'to_opt':>7} {'opt':>7} {'to_next':>8} {'wait':>7} "
                f"{'alloc':>10}")
            for i, row in enumerate(self.rows):
                nxt = self.rows[i + 1] if i + 1 < len(self.rows) else None
                marks = [row.get(h) for h in self.HOOKS] + [nxt["batch_start"] if nxt else None]
                parts = [(b - a) * 1e3 if a is not None and b is not None else float("nan")
                         for a, b in zip(marks, marks[1:])]
                delta = [(nxt or row)[k] - row[k] for k in ("device_allocs", "alloc_retries", "host_allocs")]
                g = gpu[i] * 1e3 if i < len(gpu) else float("nan")
                say(f"{row['step']:>5} {g:8.1f} " + " ".join(f"{p:7.1f}" for p in parts[:4]) +
                    f" {parts[4]:8.1f} {row.get('loss_check_wait', 0) * 1e3:7.1f} {'/'.join(map(str, delta)):>10}")

    class Timeline(L.Callback):
        def __init__(self):
            self.prof, self.t = None, 0.0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == START:
                torch.cuda.synchronize()
                self.prof = _profiler()
                self.prof.__enter__()
                self.t = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if self.prof is not None and trainer.global_step == START + STEPS:
                torch.cuda.synchronize()
                wall = time.perf_counter() - self.t
                self.prof.__exit__(None, None, None)
                self.prof.export_chrome_trace(str(out / f"trace-{label}.json"))
                self.prof = None
                analyze(out / f"trace-{label}.json", STEPS, wall, say)

        def on_train_end(self, trainer, pl_module):
            throughput = next((c for c in trainer.callbacks if type(c).__name__ == "Throughput"), None)
            if throughput is not None:
                say(f"train.py images/s over its unprofiled windows: {throughput.images_per_second}")

    build_callbacks = app.build_callbacks
    app.build_callbacks = lambda *a, **k: [*build_callbacks(*a, **k), StepTable(), Timeline()]
    if not any(o.startswith("trainer.max_steps=") for o in overrides):
        overrides = [*overrides, f"trainer.max_steps={START + STEPS + 1}"]
    sys.argv = [str(ROOT / "train.py"), *overrides]
    try:
        runpy.run_path(str(ROOT / "train.py"), run_name="__main__")
    except SystemExit as exit_:
        if exit_.code not in (None, 0):
            raise


def _allocator_counts() -> dict:
    device = torch.cuda.memory_stats()
    try:
        host = torch.cuda.host_memory_stats().get("num_host_alloc", 0)
    except (AttributeError, RuntimeError):  # torch without host allocator statistics
        host = 0
    return {"device_allocs": device.get("num_device_alloc", 0), "alloc_retries": device.get("num_alloc_retries", 0),
            "host_allocs": host}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     epilog="trainpy: train.py overrides; bare: semi24|dense graph|eager")
    parser.add_argument("out", type=Path, help="folder for the report and the raw trace")
    parser.add_argument("label", help="names the report: OUT/timeline-LABEL.txt")
    parser.add_argument("mode", choices=("trainpy", "bare"))
    parser.add_argument("rest", nargs="*", help="train.py overrides (trainpy) or SPARSITY MODE (bare)")
    parser.add_argument("--no-stack", action="store_true", help="record torch ops only, not Python stacks")
    parser.add_argument("--start", type=int, default=START, help="first profiled step")
    # Intermixed: the options may come after the positionals, and a `--` before the overrides is allowed.
    args = parser.parse_intermixed_args(argv)
    if args.mode == "bare" and len(args.rest) != 2:
        parser.error("bare takes SPARSITY (semi24|dense) and MODE (graph|eager)")
    return args


def main(argv=None) -> int:
    global WITH_STACK, START
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("profile_timeline.py: error: needs a CUDA GPU", file=sys.stderr)
        return 2
    WITH_STACK, START = not args.no_stack, args.start
    args.out.mkdir(parents=True, exist_ok=True)
    say = Report(args.out / f"timeline-{args.label}.txt", args.label)
    if args.mode == "bare":
        bare(args.out, args.label, args.rest[0], args.rest[1], say)
    else:
        trainpy(args.out, args.label, args.rest, say)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
