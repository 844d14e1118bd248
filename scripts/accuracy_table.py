"""Train the accuracy-table grid on Fashion-MNIST and write its table from each run's summary.json.

    python scripts/accuracy_table.py --model vit resnet --seeds 0 1 --jobs 8   # the whole grid
    python scripts/accuracy_table.py --model vit --only dense,semi24 --extra trainer.max_epochs=1
    python scripts/accuracy_table.py --table-only                              # rebuild the table

Runs that already have a summary.json are not trained again (scripts/grid_runs.py), so the grid can
be filled over several sessions. Every row names the exact command that produced it. Validation is
the 10k t10k test split; the block-sparsity schedule was chosen beforehand on a held-out part of the
training split (scripts/block_recipe_study.py), never on t10k.

The table goes to runs/accuracy/accuracy.md, beside the runs it reads. results/accuracy.md is the committed
record: tables of several devices and sessions with their analysis, assembled by hand from these tables, so the
script never writes it unless told to (--out).
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
# Block sparsity, magnitude and DRESS alike: the cubic ramp that won scripts/block_recipe_study.py on
# held-out data (results/block-recipe-study.md), with the blocks re-picked every step: DRESS as specified
# (each step the scores above the level's percentile pick the blocks, and the STE trains the scores), and
# magnitude on the same cadence.


def _blocks(criterion: str, level: float) -> tuple[str, ...]:
    sparsity = "dress" if criterion == "scores" else "block"
    return (f"sparsity={sparsity}", "sparsity.block_size=16", f"sparsity.sparsity={level}")


def _block(criterion: str, level: float, update_every: int = 1) -> tuple[str, ...]:
    return (*_blocks(criterion, level), "prune_schedule=gradual", f"prune_schedule.update_every={update_every}")


def _block_from_trained(criterion: str, *extra: str) -> tuple[str, ...]:
    """superblock's protocol: the trained dense model pruned to 80% from the first step, blocks re-picked every
    step (scores start at the trained blocks' norms unless told otherwise); the run starts from FROM_DENSE."""
    return (*_blocks(criterion, 0.8), "prune_schedule=constant", *extra)


# method -> (label, overrides on top of the model's recipe)
METHODS = {
    "dense": ("dense", ("sparsity=dense",)),
    # The ASP row below trains twice (the dense run, then the fine-tune): this is dense with the same total.
    "dense_6ep": ("dense, 6 epochs (as long as the ASP row's dense run and fine-tune together)",
                  ("sparsity=dense", "trainer.max_epochs=6")),
    "semi24": ("2:4 from scratch", ("sparsity=semi24",)),
    "semi24_oneshot_ft": ("2:4 one-shot prune of the dense model at step 700 + 704-step sparse fine-tune",
                          ("sparsity=semi24", "prune_schedule=finetune")),
    "semi24_oneshot_ft2ep": ("2:4 one-shot prune of the dense model after epoch 1 + 2-epoch sparse fine-tune",
                             ("sparsity=semi24", "prune_schedule=finetune", "prune_schedule.finetune_epochs=2")),
    # NVIDIA's ASP recipe: the trained dense model (the dense row's run of the same seed), pruned once, then
    # fine-tuned for as long as it was trained, learning-rate schedule restarted (warm-up, cosine).
    "semi24_prune_trained": ("2:4 one-shot prune of the trained dense model + 3-epoch sparse fine-tune, LR schedule "
                             "restarted (NVIDIA's ASP recipe)",
                             ("sparsity=semi24", "prune_schedule=finetune", "prune_schedule.finetune_epochs=3")),
    "semi24_dense_final": ("2:4, last 30% of steps dense (pruned weights restart at zero)",
                           ("sparsity=semi24", "prune_schedule=dense_final")),
    "semi24_dense_final_keep": ("2:4, last 30% of steps dense (pruned weights kept as the STE left them)",
                                ("sparsity=semi24", "prune_schedule=dense_final",
                                 "prune_schedule.dense_final_pruned=keep")),
    "block80_mag": ("block 80%, 16x16, magnitude", _block("magnitude", 0.8)),
    "block90_mag": ("block 90%, 16x16, magnitude", _block("magnitude", 0.9)),
    "block80_gmp": ("block 80%, 16x16, magnitude, masked gradients (Zhu & Gupta: pruned blocks stay pruned)",
                    (*_block("magnitude", 0.8), "sparsity.grad_mode=masked")),
    "block90_gmp": ("block 90%, 16x16, magnitude, masked gradients (Zhu & Gupta: pruned blocks stay pruned)",
                    (*_block("magnitude", 0.9), "sparsity.grad_mode=masked")),
    "block80_dress": ("block 80%, 16x16, DRESS scores", _block("scores", 0.8)),
    # Blocks re-picked every step while the level ramps (to step 700), then one fixed mask for the rest: the
    # network fine-tunes a stable subnetwork (Zhu & Gupta's fixed final mask), both criteria alike.
    "block80_dress_freeze": ("block 80%, 16x16, DRESS scores, mask fixed after the ramp (step 700)",
                             (*_block("scores", 0.8), "prune_schedule.freeze_mask_after=700")),
    "block80_mag_freeze": ("block 80%, 16x16, magnitude, mask fixed after the ramp (step 700)",
                           (*_block("magnitude", 0.8), "prune_schedule.freeze_mask_after=700")),
    # superblock's supermask layers multiply the weight by the mask (`w * subnet`), so pruned weights get no
    # gradient and come back as they left; only the scores (straight-through) decide which blocks return.
    "block80_dress_masked": ("block 80%, 16x16, DRESS scores, pruned weights frozen (superblock's w * mask)",
                             (*_block("scores", 0.8), "sparsity.grad_mode=masked")),
    "block90_dress": ("block 90%, 16x16, DRESS scores", _block("scores", 0.9)),
    # The 2026-11-25 H100 grid's schedule (blocks re-picked every 50 steps, the gradual schedule's default then),
    # kept to re-run those rows with the BatchNorm statistics re-estimated.
    "block80_mag_every50": ("block 80%, 16x16, magnitude, blocks re-picked every 50 steps",
                            _block("magnitude", 0.8, update_every=50)),
    "block80_dress_every50": ("block 80%, 16x16, DRESS scores, blocks re-picked every 50 steps",
                              _block("scores", 0.8, update_every=50)),
    "block90_mag_every50": ("block 90%, 16x16, magnitude, blocks re-picked every 50 steps",
                            _block("magnitude", 0.9, update_every=50)),
    "block90_dress_every50": ("block 90%, 16x16, DRESS scores, blocks re-picked every 50 steps",
                              _block("scores", 0.9, update_every=50)),
    # Scores that move 10x slower than the weights: fewer blocks swap per step, which a network whose layers
    # feed BatchNorm (the ResNet) may need while the blocks are re-picked every step.
    "block80_dress_slow": ("block 80%, 16x16, DRESS scores at 0.1x the learning rate",
                           (*_block("scores", 0.8), "sparsity.score_lr_scale=0.1")),
    "block80_dress_slow_all": ("block 80%, 16x16, DRESS scores at 0.1x the learning rate, every linear (attention too)",
                               (*_block("scores", 0.8), "sparsity.score_lr_scale=0.1")),
    # The ViT with every linear block-sparse (attention's qkv and proj too, as superblock sparsifies them): the
    # MLPs alone lose nothing at 80%, so no recovery can show there.
    "block80_mag_all": ("block 80%, 16x16, magnitude, every linear (attention too)", _block("magnitude", 0.8)),
    "block80_dress_all": ("block 80%, 16x16, DRESS scores, every linear (attention too)", _block("scores", 0.8)),
    # The same scope with pruned weights frozen: GMP can never bring a block back, DRESS only through its scores.
    "block80_gmp_all": ("block 80%, 16x16, magnitude, masked gradients (GMP), every linear (attention too)",
                        (*_block("magnitude", 0.8), "sparsity.grad_mode=masked")),
    "block80_dress_masked_all": ("block 80%, 16x16, DRESS scores, pruned weights frozen (superblock's w * mask), "
                                 "every linear (attention too)",
                                 (*_block("scores", 0.8), "sparsity.grad_mode=masked")),
    # superblock's own protocol: prune a trained dense model (the dense row's run of the same seed) at the level
    # from the first step, then fine-tune as long as it trained with the schedule restarted; blocks re-picked
    # every step, by the scores (initialised at the trained blocks' norms) or by magnitude.
    "block80_mag_trained_all": ("block 80%, 16x16, magnitude, every linear and 1x1 conv, pruned from the trained "
                                "dense model + 3-epoch fine-tune, LR schedule restarted",
                                _block_from_trained("magnitude")),
    "block80_dress_trained_all": ("block 80%, 16x16, DRESS scores, every linear and 1x1 conv, pruned from the "
                                  "trained dense model + 3-epoch fine-tune, LR schedule restarted",
                                  _block_from_trained("scores")),
    # The same protocol with pruned weights frozen. Magnitude: the trained model pruned once by block norm and
    # fine-tuned with that mask (a pruned block ranks below every kept one). DRESS: superblock exactly (`w *
    # subnet`), the scores start at the trained blocks' norms and are the only way a pruned block returns.
    "block80_gmp_trained_all": ("block 80%, 16x16, magnitude, masked gradients (one-shot, mask fixed), every linear "
                                "and 1x1 conv, pruned from the trained dense model + 3-epoch fine-tune, LR schedule "
                                "restarted",
                                _block_from_trained("magnitude", "sparsity.grad_mode=masked")),
    "block80_dress_masked_trained_all": ("block 80%, 16x16, DRESS scores, pruned weights frozen (superblock's w * "
                                         "mask), every linear and 1x1 conv, pruned from the trained dense model + "
                                         "3-epoch fine-tune, LR schedule restarted",
                                         _block_from_trained("scores", "sparsity.grad_mode=masked")),
    # superblock's protocol on the block scope of the other rows (the ViT's MLPs, every 1x1 conv of the ResNet).
    "block80_mag_trained": ("block 80%, 16x16, magnitude, pruned from the trained dense model + 3-epoch fine-tune, "
                            "LR schedule restarted",
                            _block_from_trained("magnitude")),
    "block80_dress_trained": ("block 80%, 16x16, DRESS scores, pruned from the trained dense model + 3-epoch "
                              "fine-tune, LR schedule restarted",
                              _block_from_trained("scores")),
    "block80_gmp_trained": ("block 80%, 16x16, magnitude, masked gradients (one-shot, mask fixed), pruned from the "
                            "trained dense model + 3-epoch fine-tune, LR schedule restarted",
                            _block_from_trained("magnitude", "sparsity.grad_mode=masked")),
    "block80_dress_masked_trained": ("block 80%, 16x16, DRESS scores, pruned weights frozen (superblock's w * mask), "
                                     "pruned from the trained dense model + 3-epoch fine-tune, LR schedule restarted",
                                     _block_from_trained("scores", "sparsity.grad_mode=masked")),
    # superblock's own score init (uniform in [0, 1): the first mask is random) with its `w * mask` layers.
    "block80_dress_superblock_all": ("block 80%, 16x16, DRESS scores drawn uniform (superblock's init), pruned weights "
                                     "frozen (superblock's w * mask), every linear (attention too)",
                                     (*_block("scores", 0.8), "sparsity.score_init=uniform",
                                      "sparsity.grad_mode=masked")),
    "block80_dress_superblock_trained_all": ("block 80%, 16x16, DRESS scores drawn uniform (superblock's init), pruned "
                                             "weights frozen (superblock's w * mask), every linear and 1x1 conv, "
                                             "pruned from the trained dense model + 3-epoch fine-tune, LR schedule "
                                             "restarted",
                                             _block_from_trained("scores", "sparsity.score_init=uniform",
                                                                 "sparsity.grad_mode=masked")),
    # A control, not a method: random blocks. Scores drawn uniform and trained a million times slower than the
    # weights (about 1e-6 in a whole run, against gaps of ~1e-3 between neighbouring scores), so the blocks
    # never re-rank: a random mask, nested as the level ramps. Where it ties the criteria, the choice of
    # blocks is not what costs accuracy.
    "block80_random": ("block 80%, 16x16, random blocks (control: uniform scores that never re-rank)",
                       (*_block("scores", 0.8), "sparsity.score_init=uniform", "sparsity.score_lr_scale=1e-6")),
    "block80_random_all": ("block 80%, 16x16, random blocks (control: uniform scores that never re-rank), every "
                           "linear (attention too)",
                           (*_block("scores", 0.8), "sparsity.score_init=uniform", "sparsity.score_lr_scale=1e-6")),
    "block80_random_trained_all": ("block 80%, 16x16, random blocks (control: uniform scores that never re-rank), "
                                   "every linear and 1x1 conv, pruned from the trained dense model + 3-epoch "
                                   "fine-tune, LR schedule restarted",
                                   _block_from_trained("scores", "sparsity.score_init=uniform",
                                                       "sparsity.score_lr_scale=1e-6")),
}
# Block methods that keep the recipe's own scope (every layer) instead of BLOCK_SCOPE: their names end in "_all".
EVERY_LAYER = tuple(method for method in METHODS if method.endswith("_all"))
# Methods that start from the weights of the dense row's run of the same seed (trained after it): "_trained".
FROM_DENSE = tuple(method for method in METHODS if method.endswith(("_trained", "_trained_all")))


def dense_checkpoint(model: str, seed: int, root: Path = RUNS) -> Path:
    recipe, _ = MODELS[model]
    return root / recipe / f"{model}-dense-s{seed}" / "checkpoints" / "last.ckpt"


def runs_of(model: str, method: str, seeds, root: Path = RUNS) -> list[Run]:
    recipe, model_overrides = MODELS[model]
    method_keys = {override.split("=")[0] for override in METHODS[method][1]}
    model_overrides = tuple(o for o in model_overrides if o.split("=")[0] not in method_keys)  # the method's win
    scope = BLOCK_SCOPE[model] if method.startswith("block") and method not in EVERY_LAYER else ()
    return [Run(root, recipe, f"{model}-{method}-s{seed}",
                (*METHODS[method][1], *scope, *model_overrides, *COMMON, f"seed={seed}",
                 *((f"model.pretrained_path={dense_checkpoint(model, seed, root)}",) if method in FROM_DENSE else ())))
            for seed in seeds]


def seed_of(run_name: str) -> int:
    """The seed in a run name made by runs_of ("vit-dense-s1" -> 1)."""
    return int(run_name.rsplit("-s", 1)[1])


def finished_runs(model: str, method: str, root: Path = RUNS) -> list[Run]:
    """Every seed of (model, method) that has a summary.json under root."""
    recipe, _ = MODELS[model]
    seeds = sorted(seed_of(p.parent.name)
                   for p in (root / recipe).glob(f"{model}-{method}-s*/summary.json"))
    return runs_of(model, method, seeds, root)


SEMI24_METHODS = ("semi24", "semi24_oneshot_ft", "semi24_oneshot_ft2ep", "semi24_prune_trained", "semi24_dense_final")


def _stats(model: str, method: str, root: Path) -> tuple[float, float] | None:
    accs = accuracies(finished_runs(model, method, root))
    return mean_and_spread(accs) if accs else None


def _verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def targets(model: str, root: Path = RUNS) -> list[str]:
    """The issue's targets for every row they concern (each 2:4 method; block 80% DRESS), marked met / MISSED /
    not run yet, with the margins behind the verdict."""
    dense = _stats(model, "dense", root)
    if dense is None:
        return [f"- {model}: no finished dense run, so no target can be judged yet"]
    lines = []
    for method in SEMI24_METHODS:
        semi = _stats(model, method, root)
        label = METHODS[method][0]
        if semi is None:
            lines.append(f"- {model}: {label} within 0.5 points of dense: not run yet")
            continue
        margin = f"{100 * (semi[0] - dense[0]):+.2f} pt"
        if method in FROM_DENSE:  # judged as the literature does, against the model it was pruned from
            margin += " vs the dense model it was pruned from"
            matched = _stats(model, "dense_6ep", root)
            if matched is not None:
                margin += f"; {100 * (semi[0] - matched[0]):+.2f} pt vs dense trained as long"
        lines.append(f"- {model}: {label} within 0.5 points of dense: {_verdict(dense[0] - semi[0] <= 0.005)} "
                     f"({margin})")
    # Two magnitude baselines: with the straight-through estimator (pruned blocks train on and can grow back,
    # itself a recovery mechanism) and classical gradual magnitude pruning (masked gradients, pruned blocks
    # stay pruned). DRESS is judged against each that has run, and its fixed-final-mask variant against
    # magnitude on the same schedule.
    for dress_method, baseline, what in (
            ("block80_dress", "block80_mag", "magnitude (ste)"),
            ("block80_dress", "block80_gmp", "magnitude (masked, GMP)"),
            ("block80_dress_freeze", "block80_mag_freeze", "magnitude (ste), both with the mask fixed after the ramp"),
            ("block80_dress_all", "block80_mag_all", "magnitude (ste), both on every linear"),
            ("block80_dress_slow", "block80_mag", "magnitude (ste), DRESS scores at 0.1x the learning rate"),
            ("block80_dress_slow_all", "block80_mag_all",
             "magnitude (ste), both on every linear, DRESS scores at 0.1x the learning rate"),
            ("block80_dress_masked", "block80_gmp", "magnitude (masked, GMP), both with pruned weights frozen"),
            ("block80_dress_every50", "block80_mag_every50", "magnitude (ste), both re-picked every 50 steps"),
            ("block80_dress_masked_all", "block80_gmp_all",
             "magnitude (masked, GMP), both on every linear with pruned weights frozen"),
            ("block80_dress_trained", "block80_mag_trained",
             "magnitude (ste), both pruned from the trained dense model"),
            ("block80_dress_masked_trained", "block80_gmp_trained",
             "magnitude (one-shot, mask fixed), both with pruned weights frozen, pruned from the trained dense model"),
            ("block80_dress_trained_all", "block80_mag_trained_all",
             "magnitude (ste), both on every linear and 1x1 conv, pruned from the trained dense model"),
            ("block80_dress_masked_trained_all", "block80_gmp_trained_all",
             "magnitude (one-shot, mask fixed), both with pruned weights frozen, on every linear and 1x1 conv, "
             "pruned from the trained dense model")):
        dress = _stats(model, dress_method, root)
        magnitude = _stats(model, baseline, root)
        if dress_method != "block80_dress" and dress is None and magnitude is None:
            continue  # a variant nobody ran for this model
        goal = f"- {model}: block 80% DRESS within 1.5 points of dense and ahead of {what}"
        if dress is None or magnitude is None:
            lines.append(f"{goal}: not run yet")
            continue
        lead = dress[0] - magnitude[0]
        # A lead smaller than the seeds' own spread is not evidence that DRESS is ahead: a tie misses the target.
        tie = abs(lead) < max(dress[1], magnitude[1])
        lines.append(f"{goal}: {_verdict(dense[0] - dress[0] <= 0.015 and lead > 0 and not tie)} "
                     f"({100 * (dress[0] - dense[0]):+.2f} pt vs dense, {100 * lead:+.2f} pt vs {what}"
                     f"{': a tie, inside the seed spread' if tie else ''})")
    return lines


def table(root: Path = RUNS, notes: str = "") -> str:
    lines = ["# Fashion-MNIST accuracy by sparsity method", "",
             "Top-1 on the 10k test split (mean and spread over seeds), from each run's summary.json. "
             "Made by `scripts/accuracy_table.py`; each row's exact command is in its run directory "
             "(`command.txt`). Block rows: 16x16 blocks on the ViT's MLP linears (attention stays dense) "
             "and on every 1x1 conv of the ResNet, both criteria under the same gradual schedule (chosen "
             "on held-out training data, results/block-recipe-study.md), blocks re-picked every step. The "
             "ResNet is ResNet-50: 2:4 and block sparsity serve linears and 1x1 convs, and only the bottleneck "
             "ResNets have 1x1 convs (ResNet-18/34 are 3x3 convs and would leave nothing sparse).", "",
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
            steps = str(first["global_step"])
            if method in FROM_DENSE:  # the dense run it started from trained too
                dense_run = runs_of(model, "dense", [seed_of(runs[0].name)], root)[0].summary()
                steps = f"{dense_run['global_step']} dense + {steps}" if dense_run else f"? dense + {steps}"
            lines.append(f"| {model} | {label} | {len(accs)} | {mean:.4f} | {delta} | {spread:.4f} | "
                         f"{steps} | {first.get('device', '?')} | `{runs[0].command()}` |")
    lines += ["", "Targets (from the literature: NVIDIA's 2:4 recipe, SR-STE, superblock):"]
    for model in MODELS:
        lines += targets(model, root)
    return "\n".join([*lines, "", notes]).rstrip() + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), nargs="+", default=["vit"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--only", default=",".join(METHODS), help="comma-separated methods")
    parser.add_argument("--extra", nargs="*", default=[], help="more train.py overrides for every run")
    parser.add_argument("--jobs", type=int, default=1, help="runs trained at once")
    parser.add_argument("--table-only", action="store_true")
    parser.add_argument("--out", default=str(RUNS / "accuracy.md"))
    parser.add_argument("--notes", default=str(ROOT / "results" / "accuracy-notes.md"),
                        help="notes on how the runs were made, appended to the table when the file exists")
    args = parser.parse_args(argv)
    errors = []
    if not args.table_only:
        unknown = sorted(set(args.only.split(",")) - set(METHODS))
        if unknown:
            parser.error(f"unknown methods {unknown}; choose from {list(METHODS)}")
        methods = args.only.split(",")
        # Two waves: the runs that start from a dense run's checkpoint wait for the dense runs.
        for wave in ([m for m in methods if m not in FROM_DENSE], [m for m in methods if m in FROM_DENSE]):
            runs = [Run(r.root, r.recipe, r.name, (*r.overrides, *args.extra))
                    for model in args.model for method in wave for r in runs_of(model, method, args.seeds)]
            errors += train_all(runs, args.jobs)
    notes = Path(args.notes)
    return write_report(Path(args.out), table(notes=notes.read_text() if notes.is_file() else ""), errors)


if __name__ == "__main__":
    sys.exit(main())
