"""Train the accuracy-table grid on Fashion-MNIST and write results/accuracy.md from each run's summary.json.

    python scripts/accuracy_table.py --model vit resnet --seeds 0 1 --jobs 8   # the whole grid
    python scripts/accuracy_table.py --model vit --only dense,semi24 --extra trainer.max_epochs=1
    python scripts/accuracy_table.py --table-only                              # rebuild the table

Runs that already have a summary.json are not trained again (scripts/grid_runs.py), so the grid can
be filled over several sessions. Every row names the exact command that produced it. Validation is
the 10k t10k test split; the block-sparsity schedule was chosen beforehand on a held-out part of the
training split (scripts/block_recipe_study.py), never on t10k.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from grid_runs import ROOT, Run, accuracies, mean_and_spread, train_all, write_report  # noqa: E402

RUNS = ROOT / "runs" / "accuracy"
# model -> (recipe, overrides): 3 epochs (1404 steps at batch 128) for both models.
MODELS = {"vit": ("fmnist_dense", ()), "resnet": ("fmnist_resnet_24", ("trainer.max_epochs=3",))}
COMMON = ("data.num_workers=1",)
# Where block sparsity goes: the ViT's MLP linears (as recipes/fmnist_vit_block and superblock do; the
# block kernels serve the MLP GEMMs), every 1x1 conv of the ResNet.
BLOCK_SCOPE = {"vit": ("sparsity.include=[blocks.*.mlp.*]",), "resnet": ()}
# Block sparsity, magnitude and DRESS alike: the schedule that won scripts/block_recipe_study.py on
# held-out data (results/block-recipe-study.md).
BLOCK_SCHEDULE = ("prune_schedule=gradual",)


def _block(criterion: str, level: float) -> tuple[str, ...]:
    sparsity = "dress" if criterion == "scores" else "block"
    return (f"sparsity={sparsity}", "sparsity.block_size=16", f"sparsity.sparsity={level}", *BLOCK_SCHEDULE)


# method -> (label, overrides on top of the model's recipe)
METHODS = {
    "dense": ("dense", ("sparsity=dense",)),
    "semi24": ("2:4 from scratch", ("sparsity=semi24",)),
    "semi24_oneshot_ft": ("2:4 one-shot prune of the dense model + fine-tune",
                          ("sparsity=semi24", "prune_schedule=finetune")),
    "semi24_dense_final": ("2:4, last 30% of steps dense", ("sparsity=semi24", "prune_schedule=dense_final")),
    "block80_mag": ("block 80%, 16x16, magnitude", _block("magnitude", 0.8)),
    "block90_mag": ("block 90%, 16x16, magnitude", _block("magnitude", 0.9)),
    "block80_dress": ("block 80%, 16x16, DRESS scores", _block("scores", 0.8)),
    "block90_dress": ("block 90%, 16x16, DRESS scores", _block("scores", 0.9)),
}


NOTES = """Notes (H100 runs of 2026-11-25, fp32, 13 runs side by side on one GPU via scripts/gpu_accuracy.sh):
- Seeds: 0 and 1 for every row; the ViT's dense and block-80% rows also have seeds 2 and 3, added because
  at two seeds DRESS trailed magnitude by 0.06 pt, inside the seed spread. Every finished seed is counted.
- Block sparsity on *every* ViT linear (attention too; seeds 0-1, same gradual schedule): magnitude 0.8505
  (-2.16 pt), DRESS 0.8517 (-2.04 pt): DRESS ahead, but outside the 1.5-point target. With the MLPs alone
  (the recipe's and superblock's scope) this small ViT loses nothing measurable at 80% or 90%.
- Held-out study (results/block-recipe-study.md): under the same gradual schedule DRESS beat magnitude
  (0.8614 vs 0.8493 on every linear, 0.8788 vs 0.8751 on the MLPs), but magnitude with a mask
  recomputed every step from step 0 (0.8619) ties DRESS's best (0.8623): the learned scores help most
  against magnitude masks that are re-ranked only every 50 steps.
- The ResNet's block rows are where DRESS clearly wins: +1.9 pt over magnitude at 80%, +3.3 pt at 90%.
"""


def runs_of(model: str, method: str, seeds, root: Path = RUNS) -> list[Run]:
    recipe, model_overrides = MODELS[model]
    scope = BLOCK_SCOPE[model] if method.startswith("block") else ()
    return [Run(root, recipe, f"{model}-{method}-s{seed}",
                (*METHODS[method][1], *scope, *model_overrides, *COMMON, f"seed={seed}")) for seed in seeds]


def finished_runs(model: str, method: str, root: Path = RUNS) -> list[Run]:
    """Every seed of (model, method) that has a summary.json under root."""
    recipe, _ = MODELS[model]
    seeds = sorted(int(p.parent.name.rsplit("-s", 1)[1])
                   for p in (root / recipe).glob(f"{model}-{method}-s*/summary.json"))
    return runs_of(model, method, seeds, root)


def targets(model: str, root: Path = RUNS) -> list[str]:
    """The issue's targets, each marked met / MISSED / not run yet, with the margins behind the verdict."""
    stats = {}
    for method in ("dense", "semi24", "block80_dress", "block80_mag"):
        accs = accuracies(finished_runs(model, method, root))
        stats[method] = mean_and_spread(accs) if accs else None
    if None in stats.values():
        return [f"- {model}: 2:4 / DRESS targets: not run yet (a method of the grid has no finished run)"]
    (dense, _), (semi, _), (dress, dress_spread), (magnitude, mag_spread) = (
        stats[m] for m in ("dense", "semi24", "block80_dress", "block80_mag"))

    def verdict(ok):
        return "met" if ok else "MISSED"

    lead = dress - magnitude
    # A lead smaller than the seeds' own spread is not evidence that one criterion is better.
    tie = ": a tie, the lead is inside the seed spread" if abs(lead) < max(dress_spread, mag_spread) else ""
    return [f"- {model}: 2:4 from scratch within 0.5 points of dense: {verdict(dense - semi <= 0.005)} "
            f"({100 * (semi - dense):+.2f} pt)",
            f"- {model}: block 80% DRESS within 1.5 points of dense and ahead of magnitude: "
            f"{verdict(dense - dress <= 0.015 and lead > 0)} ({100 * (dress - dense):+.2f} pt vs dense, "
            f"{100 * lead:+.2f} pt vs magnitude{tie})"]


def table(root: Path = RUNS) -> str:
    lines = ["# Fashion-MNIST accuracy by sparsity method", "",
             "Top-1 on the 10k test split (mean and spread over seeds), from each run's summary.json. "
             "Made by `scripts/accuracy_table.py`; each row's exact command is in its run directory "
             "(`command.txt`). Block rows: 16x16 blocks on the ViT's MLP linears (attention stays dense) "
             "and on every 1x1 conv of the ResNet, both criteria under the same gradual schedule, chosen "
             "on held-out training data (results/block-recipe-study.md).", "",
             "| model | method | seeds | top-1 mean | vs dense | spread (max-min) | steps | device | command (first seed) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for model in MODELS:
        dense_accs = accuracies(finished_runs(model, "dense", root))
        dense = mean_and_spread(dense_accs)[0] if dense_accs else None
        for method, (label, _) in METHODS.items():
            runs = finished_runs(model, method, root)
            if not runs:
                continue
            accs = accuracies(runs)
            mean, spread = mean_and_spread(accs)
            first = runs[0].summary()
            delta = "" if dense is None else f"{100 * (mean - dense):+.2f} pt"
            lines.append(f"| {model} | {label} | {len(accs)} | {mean:.4f} | {delta} | {spread:.4f} | "
                         f"{first['global_step']} | {first.get('device', '?')} | `{runs[0].command()}` |")
    lines += ["", "Targets (from the literature: NVIDIA's 2:4 recipe, SR-STE, superblock):"]
    for model in MODELS:
        lines += targets(model, root)
    return "\n".join([*lines, "", NOTES]) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), nargs="+", default=["vit"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--only", default=",".join(METHODS), help="comma-separated methods")
    parser.add_argument("--extra", nargs="*", default=[], help="more train.py overrides for every run")
    parser.add_argument("--jobs", type=int, default=1, help="runs trained at once")
    parser.add_argument("--table-only", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "results" / "accuracy.md"))
    args = parser.parse_args(argv)
    errors = []
    if not args.table_only:
        unknown = sorted(set(args.only.split(",")) - set(METHODS))
        if unknown:
            parser.error(f"unknown methods {unknown}; choose from {list(METHODS)}")
        runs = [Run(r.root, r.recipe, r.name, (*r.overrides, *args.extra))
                for model in args.model for method in args.only.split(",") for r in runs_of(model, method, args.seeds)]
        errors = train_all(runs, args.jobs)
    return write_report(Path(args.out), table(), errors)


if __name__ == "__main__":
    sys.exit(main())
