"""Train the accuracy-table grid on Fashion-MNIST and write results/accuracy.md from each run's summary.json.

    python scripts/accuracy_table.py --model vit --seeds 0 1            # all methods, 2 seeds
    python scripts/accuracy_table.py --model vit --only dense,semi24 --extra trainer.max_epochs=1
    python scripts/accuracy_table.py --table-only                        # rebuild the table from runs

Runs that already have a summary.json are not trained again, so the grid can be filled over several
sessions. Every row names the exact command that produced it.
"""
import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "runs" / "accuracy"
RECIPE = {"vit": "fmnist_dense", "resnet": "fmnist_resnet_24"}

# method -> (label, overrides on top of the model's recipe)
METHODS = {
    "dense": ("dense", ["sparsity=dense"]),
    "semi24": ("2:4 from scratch", ["sparsity=semi24"]),
    "semi24_oneshot_ft": ("2:4 one-shot prune of the dense model + fine-tune",
                          ["sparsity=semi24", "prune_schedule=finetune"]),
    "semi24_dense_final": ("2:4, last 30% of steps dense", ["sparsity=semi24", "prune_schedule=dense_final"]),
    "block80_mag": ("block 80%, 16x16, magnitude",
                    ["sparsity=block", "sparsity.block_size=16", "sparsity.sparsity=0.8"]),
    "block90_mag": ("block 90%, 16x16, magnitude",
                    ["sparsity=block", "sparsity.block_size=16", "sparsity.sparsity=0.9"]),
    "block80_dress": ("block 80%, 16x16, DRESS scores",
                      ["sparsity=dress", "sparsity.block_size=16", "sparsity.sparsity=0.8"]),
    "block90_dress": ("block 90%, 16x16, DRESS scores",
                      ["sparsity=dress", "sparsity.block_size=16", "sparsity.sparsity=0.9"]),
}


def command(model: str, method: str, seed: int, extra: list) -> list:
    return [f"recipe={RECIPE[model]}", *METHODS[method][1], f"seed={seed}", *extra,
            f"paths.root={RUNS}", f"run_name={model}-{method}-s{seed}", "trainer.enable_progress_bar=false"]


def run_dir(model: str, method: str, seed: int) -> Path:
    return RUNS / RECIPE[model] / f"{model}-{method}-s{seed}"


def train(model: str, method: str, seed: int, extra: list) -> None:
    if (run_dir(model, method, seed) / "summary.json").is_file():
        return
    args = command(model, method, seed, extra)
    print("python train.py " + " ".join(args), flush=True)
    log = RUNS / f"{model}-{method}-s{seed}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        subprocess.run([sys.executable, str(ROOT / "train.py"), *args], stdout=f, stderr=subprocess.STDOUT,
                       check=True, cwd=ROOT)
    (run_dir(model, method, seed) / "command.txt").write_text("python train.py " + " ".join(args) + "\n")


def mean_accuracy(model: str, method: str):
    runs = sorted(RUNS.glob(f"{RECIPE[model]}/{model}-{method}-s*/summary.json"))
    accs = [json.loads(p.read_text())["metrics"]["val/acc"] for p in runs]
    return (statistics.mean(accs) if accs else None), accs, runs


def targets(model: str) -> list:
    """The issue's targets, each marked met / missed / not run yet."""
    dense, _, _ = mean_accuracy(model, "dense")
    semi, _, _ = mean_accuracy(model, "semi24")
    dress, _, _ = mean_accuracy(model, "block80_dress")
    magnitude, _, _ = mean_accuracy(model, "block80_mag")

    def verdict(ok):
        return "not run yet" if ok is None else ("met" if ok else "MISSED")

    semi_ok = None if None in (dense, semi) else dense - semi <= 0.005
    dress_ok = None if None in (dense, dress, magnitude) else (dense - dress <= 0.015 and dress > magnitude)
    return [f"- {model}: 2:4 from scratch within 0.5 points of dense: {verdict(semi_ok)}",
            f"- {model}: block 80% DRESS within 1.5 points of dense and ahead of magnitude: {verdict(dress_ok)}"]


def table() -> str:
    lines = ["# Fashion-MNIST accuracy by sparsity method", "",
             "Top-1 on the 10k test split (mean and spread over seeds), from each run's summary.json. "
             "Made by `scripts/accuracy_table.py`; each row's exact command is in its run directory "
             "(`command.txt`).", "",
             "| model | method | seeds | top-1 mean | vs dense | spread (max-min) | steps | command (seed 0) |",
             "|---|---|---|---|---|---|---|---|"]
    for model in RECIPE:
        dense, _, _ = mean_accuracy(model, "dense")
        for method, (label, _) in METHODS.items():
            mean, accs, runs = mean_accuracy(model, method)
            if not runs:
                continue
            steps = json.loads(runs[0].read_text())["global_step"]
            delta = "" if dense is None else f"{100 * (mean - dense):+.2f} pt"
            cmd = runs[0].parent / "command.txt"
            cmd_text = cmd.read_text().strip().replace(f"{ROOT}/", "") if cmd.is_file() else ""
            lines.append(f"| {model} | {label} | {len(accs)} | {mean:.4f} | {delta} | {max(accs) - min(accs):.4f} | "
                         f"{steps} | `{cmd_text}` |")
    lines += ["", "Targets (from the literature: NVIDIA's 2:4 recipe, SR-STE, superblock):"]
    for model in RECIPE:
        lines += targets(model)
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(RECIPE), default="vit")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--only", default=",".join(METHODS), help="comma-separated methods")
    parser.add_argument("--extra", nargs="*", default=[], help="more train.py overrides for every run")
    parser.add_argument("--table-only", action="store_true")
    args = parser.parse_args(argv)
    if not args.table_only:
        for seed in args.seeds:
            for method in args.only.split(","):
                train(args.model, method, seed, args.extra)
    out = ROOT / "results" / "accuracy.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text(table())
    print(out.read_text())


if __name__ == "__main__":
    main()
