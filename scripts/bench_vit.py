"""Dense vs 2:4 training speed of the ViT recipes on the GPU at hand, appended as rows of a JSON-lines record.

    python scripts/bench_vit.py [--models l,h,g] [--figures mlp,step,trainpy] [--repeats 3]
                                [--record results/speed.jsonl]
    python scripts/bench_vit.py --table [--record results/speed.jsonl]

Figures, each for dense, 2:4 MLPs (`mlp24`) and 2:4 MLPs + attention projections (`all24`), side by side in one
run on the same shapes, bf16:
  mlp      one block's MLP (Linear-GELU-Linear at the model's widths, batch x tokens rows), forward + backward,
           replayed from a CUDA graph: GPU ms per call (no attention in it: dense and mlp24 only)
  step     the bare training step of the whole model: the recipe's model and batch, bf16 autocast, fused AdamW,
           gradient clipping, forward + backward replayed from a graph as train.py's cuda_graph does; ms per step
  trainpy  `python train.py recipe=vit_X_24 data=synthetic ...`: images/s of its steady state (summary.json)
  block    dense against the block recipe (vit_b_block, vit_l_block: 90% of 64x64 blocks on the MLPs, ramped over
           the first 30% of the steps, then frozen) through train.py, BLOCK_STEPS steps each, images/s from each
           run's step_times.csv: the ramp phase and the frozen phase (median step within each, after warm-up and
           graph capture), and the whole run of the recipe (its end_fraction ramping, the rest frozen), from those
           two medians
Each figure is measured `--repeats` times with the variants interleaved (so drift hits them alike); a row holds
the median, min and max over the repeats, with the commit, date, device and versions. `--table` prints the
newest row of every (model, figure, variant) as markdown, with the speed-up of each variant over dense of the
same run; `python scripts/tables.py` puts it into results/speed.md.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import gc
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import tables  # noqa: E402  (scripts/ is on sys.path when a script runs)

MODELS = {"b": "vit_b_24", "l": "vit_l_24", "h": "vit_h_24", "g": "vit_g_24"}  # --models letter -> recipe
BLOCK_RECIPES = {"vit_b_24": "vit_b_block", "vit_l_24": "vit_l_block"}  # the `block` figure's recipes
# variant -> the sparse_layers option (conf/sparse_layers/) whose layers run 2:4; dense: none
VARIANTS = {"dense": None, "mlp24": "vit_mlp", "all24": "vit_mlp_attention"}
FIGURES = ("mlp", "step", "trainpy", "block")
UNITS = {"mlp": "ms", "step": "ms", "trainpy": "images/s", "block": "images/s"}
STEP_TIMED, STEP_WARMUP = 10, 5  # bare loop: steps per repeat, after this many warm-up steps
TRAIN_PY_STEPS = 60  # summary.json's steady state is the median step of the second half
TRAIN_PY_WORKERS = 8  # synthetic images are drawn on the CPU: enough loader workers to keep up with the GPU
BLOCK_STEPS = 100  # the `block` figure's steps per run; the block recipe's end_fraction of them ramp, then freeze
# Steps left out of each phase's median: the first steps (allocators, tuning) and, once frozen, the steps before
# the frozen phase's CUDA graph replays (it is captured on its second step).
WARMUP_STEPS, FROZEN_SETTLE_STEPS = 5, 10


def recipe_settings(recipe: str) -> dict:
    """Model name, batch and image size as `python train.py recipe=...` composes them."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[f"recipe={recipe}"])
    return {"model": cfg.model.name, "batch": int(cfg.data.batch_size), "img_size": int(cfg.data.img_size),
            "drop_path_rate": float(cfg.model.drop_path_rate), "ramp_fraction": cfg.prune_schedule.get("end_fraction")}


def build_vit(settings: dict, variant: str) -> nn.Module:
    from sparsetrain.sparse import Semi24Config, sparsify_
    from sparsetrain.models import create_model

    torch.manual_seed(0)
    model = create_model(settings["model"], num_classes=10, img_size=settings["img_size"],
                         drop_path_rate=settings["drop_path_rate"]).cuda().train()
    if VARIANTS[variant]:
        sparsify_(model, Semi24Config(), include=sparse_layers(VARIANTS[variant]))
    return model


def sparse_layers(option: str) -> list[str]:
    """The module-name globs of a sparse_layers option, as train.py applies them."""
    return yaml.safe_load((ROOT / "conf" / "sparse_layers" / f"{option}.yaml").read_text())["include"]


def bare_vit_step(settings: dict, variant: str, cuda_graph: bool = True,
                  compile_mode: str | None = None) -> Callable[[], None]:
    """train.py's step without Lightning: its model and sparsity, bf16 autocast over fp32 weights (without the
    cast cache, as Lightning runs it), fused AdamW, grad-norm clipping, label smoothing, one batch kept on the GPU;
    cuda_graph: forward+backward through GraphedTraining, as train.py's option; compile_mode: torch.compile as
    train.py's `compile` option. The model lives as the step does."""
    from sparsetrain.training.compile import compile_in_place
    from sparsetrain.training.cuda_graphs import GraphedTraining

    model = build_vit(settings, variant)
    if compile_mode is not None:
        compile_in_place(model, compile_mode, "cuda", torch.bfloat16)
    if cuda_graph:
        GraphedTraining(model).install()
    opt = torch.optim.AdamW(model.parameters(), lr=4e-4, weight_decay=0.05, fused=True)
    images = torch.randn(settings["batch"], 3, settings["img_size"], settings["img_size"], device="cuda")
    labels = torch.randint(0, 10, (settings["batch"],), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
            logits = model(images)
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return step


def events_ms(fn: Callable[[], None], calls: int) -> float:
    """GPU-clock ms per call of `calls` back-to-back calls of fn."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / calls


def mlp_block(settings: dict, variant: str) -> Callable[[], float]:
    """A repeat of the `mlp` figure: 20 forward+backward calls of the MLP captured in one graph, replayed."""
    from sparsetrain.sparse import Semi24Config, sparsify_

    d, h = settings["widths"]
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(d, h), nn.GELU(), nn.Linear(h, d)).to("cuda", torch.bfloat16)
    if variant != "dense":
        sparsify_(mlp, Semi24Config())
    x = torch.randn(settings["tokens"], d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn_like(x)

    def call():
        mlp(x).backward(grad)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # first-use work (algorithm search, tuning) off the capture
        for _ in range(3):
            call()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    gc.collect()  # an eager autograd node kept alive by a cycle would break the capture (cuda_graphs.py says why)
    graph = torch.cuda.CUDAGraph()
    inner = 20
    with torch.cuda.graph(graph):
        for _ in range(inner):
            call()
    graph.replay()

    def timed() -> float:
        _ = mlp, x, grad  # the graph replays on their memory: this closure keeps them alive as long as it lives
        return events_ms(graph.replay, 3) / inner
    return timed


def model_widths(settings: dict) -> dict:
    """The MLP's widths and the rows it sees (batch x tokens), read off the model built on the meta device."""
    from sparsetrain.models import create_model

    with torch.device("meta"):
        model = create_model(settings["model"], num_classes=10, img_size=settings["img_size"])
    fc1 = model.blocks[0].mlp.fc1
    tokens = model.patch_embed.num_patches + getattr(model, "num_prefix_tokens", 1)
    return {"widths": (fc1.in_features, fc1.out_features), "tokens": settings["batch"] * tokens}


def train_py_run(recipe: str, overrides: list[str], settings: dict, root: Path, steps: int) -> Path:
    """`python train.py recipe=RECIPE data=synthetic ...` for `steps` steps; returns its run directory."""
    run_name = f"run-{time.monotonic_ns()}"
    cmd = [sys.executable, str(ROOT / "train.py"), f"recipe={recipe}", "data=synthetic", *overrides,
           f"data.train_size={settings['batch'] * steps}", f"data.num_workers={TRAIN_PY_WORKERS}",
           f"trainer.max_steps={steps}", "trainer.limit_val_batches=0", "trainer.enable_progress_bar=false",
           "logger=csv", f"paths.root={root}", f"run_name={run_name}"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"train.py failed ({done.returncode}): {done.stderr[-2000:]}")
    return root / recipe / run_name


def train_py_rate(recipe: str, variant: str, settings: dict, root: Path) -> float:
    """One train.py run's steady-state images/s."""
    sparsity = ["sparsity=dense"] if variant == "dense" else [f"sparse_layers={VARIANTS[variant]}"]
    run_dir = train_py_run(recipe, sparsity, settings, root, TRAIN_PY_STEPS)
    return json.loads((run_dir / "summary.json").read_text())["images_per_second"]


def phase_rates(run_dir: Path, ramp_fraction: float) -> dict[str, float]:
    """images/s of a BLOCK_STEPS run's ramp and frozen phases (median step of each, from step_times.csv), and of
    a whole run made of `ramp_fraction` ramp (the block recipe's end_fraction) and the rest frozen."""
    with open(run_dir / "step_times.csv") as f:
        steps = [(int(r["step"]), float(r["seconds"]), int(r["images"])) for r in csv.DictReader(f) if r["seconds"]]
    ramp_end = round(ramp_fraction * BLOCK_STEPS)
    ramp = [s for s in steps if WARMUP_STEPS <= s[0] < ramp_end]
    frozen = [s for s in steps if s[0] >= ramp_end + FROZEN_SETTLE_STEPS]
    images = statistics.median(n for _, _, n in steps)
    ramp_s, frozen_s = (statistics.median(sec for _, sec, _ in phase) for phase in (ramp, frozen))
    whole_s = ramp_fraction * ramp_s + (1 - ramp_fraction) * frozen_s
    return {"trainpy ramp phase": images / ramp_s, "trainpy frozen phase": images / frozen_s,
            f"trainpy whole run ({ramp_fraction:.0%} ramp, {1 - ramp_fraction:.0%} frozen)": images / whole_s}


def measure_block(recipe: str, repeats: int, say) -> dict[str, dict[str, list[float]]]:
    """{figure: {variant: one value per repeat}}: dense and the block recipe through train.py, interleaved."""
    settings = recipe_settings(recipe)
    ramp_fraction = recipe_settings(BLOCK_RECIPES[recipe])["ramp_fraction"]
    values: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    runs = {"dense": (recipe, ["sparsity=dense"]), "block": (BLOCK_RECIPES[recipe], [])}
    with tempfile.TemporaryDirectory() as root:
        for r in range(repeats):
            for variant, (name, overrides) in runs.items():
                run_dir = train_py_run(name, overrides, settings, Path(root), BLOCK_STEPS)
                for figure, rate in phase_rates(run_dir, ramp_fraction).items():
                    values[figure][variant].append(rate)
                    say(f"  {name} {figure} repeat {r}: {rate:.1f} images/s")
    return values


def measure(recipe: str, figure: str, repeats: int, say) -> dict[str, list[float]]:
    """{variant: one value per repeat} for one model and figure, the variants interleaved within each repeat."""
    settings = recipe_settings(recipe)
    variants = ["dense", "mlp24"] if figure == "mlp" else list(VARIANTS)
    values: dict[str, list[float]] = {v: [] for v in variants}
    if figure == "trainpy":
        with tempfile.TemporaryDirectory() as root:
            for r in range(repeats):
                for v in variants:
                    values[v].append(train_py_rate(recipe, v, settings, Path(root)))
                    say(f"  {recipe} trainpy {v} repeat {r}: {values[v][-1]:.1f} images/s")
        return values
    if figure == "mlp":
        settings.update(model_widths(settings))
        timers = {v: mlp_block(settings, v) for v in variants}
        for _ in range(repeats):
            for v in variants:
                values[v].append(timers[v]())
        return values
    for v in variants:  # one model at a time: a ViT-g and its optimizer fill much of the GPU
        step = bare_vit_step(settings, v)
        for _ in range(STEP_WARMUP):
            step()
        for _ in range(repeats):
            values[v].append(events_ms(step, STEP_TIMED))
        say(f"  {recipe} step {v}: " + ", ".join(f"{x:.2f}" for x in values[v]) + " ms")
        del step
        gc.collect()
        torch.cuda.empty_cache()
    return values


def environment(command: str) -> dict:
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    import triton

    return {"commit": git("rev-parse", "--short", "HEAD") + ("+dirty" if git("status", "--porcelain", "-uno") else ""),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M"),
            "device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "cusparselt": torch.backends.cusparselt.version(), "triton": triton.__version__,
            "python": platform.python_version(), "command": command}


def table(rows: list[dict]) -> str:
    """Markdown of the newest row of every (model, figure, variant), as results/speed.md shows a run."""
    return "\n".join(tables.table(tables.SPEED_HEADER, tables.speed_rows(rows)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="l,h,g", help="letters of MODELS, comma-separated")
    parser.add_argument("--figures", default=",".join(FIGURES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--record", type=Path, default=ROOT / "results" / "speed.jsonl")
    parser.add_argument("--table", action="store_true", help="print the record as markdown and exit")
    args = parser.parse_args()
    if args.table:
        rows = [json.loads(line) for line in args.record.read_text().splitlines() if line.strip()]
        print(table(rows))
        return 0
    models = args.models.split(",")
    figures = args.figures.split(",")
    unknown = [m for m in models if m not in MODELS] + [f for f in figures if f not in FIGURES]
    if unknown or args.repeats < 3:
        parser.error(f"unknown {unknown}; models from {list(MODELS)}, figures from {list(FIGURES)}, "
                     "--repeats of at least 3")
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    env = environment("python scripts/bench_vit.py " + " ".join(sys.argv[1:]))
    rows = []
    for letter in models:
        recipe = MODELS[letter]
        for figure in figures:
            say = lambda line: print(line, flush=True)  # noqa: E731
            if figure == "block":
                if recipe not in BLOCK_RECIPES:
                    print(f"  {recipe}: no block recipe, no block figure", flush=True)
                    continue
                measured = measure_block(recipe, args.repeats, say)
            else:
                measured = {figure: measure(recipe, figure, args.repeats, say)}
            for name, values in measured.items():
                for variant, xs in values.items():
                    row = {**env, "model": recipe, "figure": name, "variant": variant, "unit": UNITS[figure],
                           "median": statistics.median(xs), "min": min(xs), "max": max(xs), "repeats": len(xs),
                           "values": [round(x, 4) for x in xs]}
                    rows.append(row)
                    args.record.parent.mkdir(parents=True, exist_ok=True)
                    with open(args.record, "a") as f:  # appended as measured: a run stopped midway keeps its rows
                        f.write(json.dumps(row) + "\n")
            print(table(rows), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
