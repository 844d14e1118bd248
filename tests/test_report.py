"""sparsetrain.report on fake run directories shaped like the ones train.py writes."""
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from lightning.pytorch.loggers import CSVLogger
from matplotlib import image as mpimg
from matplotlib.backends.backend_agg import FigureCanvasAgg

from sparsetrain.report import comparison_groups, find_run_dirs, load_runs, main, plot_layer_sparsity
from sparsetrain.training.sweep import write_sweep_summary

STEPS_PER_EPOCH = 100
EPOCHS = 3
LOG_EVERY = 10
SPARSITY_LOG_EVERY = 50
VIT_LINEARS = [f"blocks.{b}.{layer}" for b in range(2) for layer in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]
SHAPES = {"attn.qkv": [576, 192], "attn.proj": [192, 192], "mlp.fc1": [768, 192], "mlp.fc2": [192, 768]}


def sparsity_config(pattern, level=None, block_size=None, criterion="magnitude"):
    if pattern == "dense":
        return {"pattern": "dense", "include": ["*"], "exclude": []}
    if pattern == "semi24":
        return {"pattern": "semi24", "transposable": True, "backend": "auto", "grad_mode": "ste",
                "srste_lambda": 0.0, "criterion": "magnitude", "include": ["*"], "exclude": []}
    return {"pattern": "block", "block_size": block_size, "sparsity": level, "criterion": criterion,
            "grad_mode": "ste", "include": ["blocks.*.mlp.*"], "exclude": []}


def layer_records(sparsity):
    """summary.json's layers: the first and last layer always dense; block runs sparsify only the MLPs."""
    pattern = sparsity["pattern"]
    records = [{"name": "patch_embed.proj", "shape": [192, 16], "pattern": "dense", "backend": None,
                "measured_sparsity": None, "reason": "first layer stays dense"}]
    for name in VIT_LINEARS:
        sparse = pattern == "semi24" or (pattern == "block" and ".mlp." in name)
        level = 0.5 if pattern == "semi24" else sparsity.get("sparsity")
        records.append({"name": name, "shape": SHAPES[name.split(".", 2)[2]],
                        "pattern": pattern if sparse else "dense", "backend": "emulated" if sparse else None,
                        "measured_sparsity": (level + 0.003 * len(records)) if sparse else None,
                        "reason": "cpu: masked dense" if sparse else "not matched by include"})
    records.append({"name": "head", "shape": [10, 192], "pattern": "dense", "backend": None,
                    "measured_sparsity": None, "reason": "classifier stays dense"})
    return records


def write_metrics(run_dir, final_acc, level, sparse_layers, flip_rate=True):
    """csv/metrics.csv through Lightning's own CSVLogger, logged the way the callbacks log it."""
    logger = CSVLogger(save_dir=str(run_dir), name="csv", version="")
    rng = np.random.default_rng(len(str(run_dir)))
    last = STEPS_PER_EPOCH * EPOCHS
    for step in range(1, last + 1):
        epoch = (step - 1) // STEPS_PER_EPOCH
        progress = step / last
        if step % LOG_EVERY == 0:
            logger.log_metrics({"train/loss": 2.3 * math.exp(-2.5 * progress) + 0.1 * rng.random(),
                                "train/acc": final_acc * (1 - math.exp(-4 * progress)) + 0.05 * rng.random(),
                                "lr": 1e-3 * math.cos(progress * math.pi / 2), "epoch": epoch,
                                "sparsity/phase": 2.0, "perf/images_per_s": 900 + 50 * rng.random(),
                                **({"sparsity/level": level} if sparse_layers else {})}, step=step)
        if sparse_layers and flip_rate and (step % SPARSITY_LOG_EVERY == 0 or step == 1):
            logger.log_metrics({"sparsity/flip_rate": (1.1 - final_acc) * math.exp(-3 * progress),
                                "epoch": epoch,
                                **{f"sparsity/layer/{name}": level for name in sparse_layers}}, step=step)
        if step % STEPS_PER_EPOCH == 0:
            val_acc = final_acc - 0.1 * (EPOCHS - 1 - epoch)
            logger.log_metrics({"val/loss": 2.5 * (1 - val_acc), "val/acc": val_acc,
                                "epoch": epoch}, step=step)
            logger.save()  # Lightning flushes every few steps; later columns make it rewrite the header
    logger.finalize("success")


def make_run(run_dir, recipe, pattern, level=None, block_size=None, criterion="magnitude", final_acc=0.85,
             flip_rate=True, seed=0, lr=1e-3):
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True)
    sparsity = sparsity_config(pattern, level, block_size, criterion)
    config = {"seed": seed, "recipe_name": recipe, "run_name": run_dir.name, "objective": "val/acc",
              "data": {"batch_size": 128, "seed": seed}, "model": {"name": "vit_fmnist"}, "optim": {"lr": lr},
              "sparsity": sparsity, "trainer": {"max_epochs": EPOCHS, "default_root_dir": str(run_dir)},
              "paths": {"root": "runs", "run_dir": str(run_dir)}}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    layers = layer_records(sparsity)
    summary = {"recipe": recipe, "run_dir": str(run_dir), "metrics": {"val/acc": final_acc, "val/loss": 0.9},
               "objective": final_acc, "global_step": STEPS_PER_EPOCH * EPOCHS, "epoch": EPOCHS - 1,
               "images_per_second": 931.5, "wall_seconds": 42.0, "skipped_steps": 0, "layers": layers,
               "config": str(run_dir / "config.yaml"), "device": "cpu", "torch": "2.14.1"}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    sparse_layers = [layer["name"] for layer in layers if layer["pattern"] != "dense"]
    run_level = 0.5 if pattern == "semi24" else (level or 0.0)
    write_metrics(run_dir, final_acc, run_level, sparse_layers, flip_rate)
    return run_dir


def linked_pngs(report: Path) -> list:
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report.read_text())
    return [report.parent / link for link in links]


def assert_real_png(path: Path):
    assert path.is_file(), f"report links {path}, which was not written"
    pixels = mpimg.imread(path)
    assert pixels.shape[0] >= 200 and pixels.shape[1] >= 200, f"{path} is only {pixels.shape}"
    assert pixels[..., :3].var() > 0, f"{path} is a blank picture"


@pytest.fixture
def method_runs(tmp_path):
    """One run per method, as runs/<recipe>/<run_name> directories."""
    runs = tmp_path / "runs"
    return [
        make_run(runs / "fmnist_dense" / "default", "fmnist_dense", "dense", final_acc=0.90, flip_rate=False),
        make_run(runs / "fmnist_vit_24" / "default", "fmnist_vit_24", "semi24", final_acc=0.88),
        make_run(runs / "fmnist_vit_block" / "mag50", "fmnist_vit_block", "block", 0.5, 16, final_acc=0.87),
        make_run(runs / "fmnist_vit_block" / "mag80", "fmnist_vit_block", "block", 0.8, 16, final_acc=0.80),
        make_run(runs / "fmnist_vit_block" / "dress80", "fmnist_vit_block", "block", 0.8, 16, "scores", 0.84),
        make_run(runs / "fmnist_vit_block" / "dress80_b32", "fmnist_vit_block", "block", 0.8, 32, "scores", 0.82),
    ]


def test_single_run_report_goes_into_the_run_dir(tmp_path, capsys):
    run = make_run(tmp_path / "runs" / "fmnist_vit_24" / "default", "fmnist_vit_24", "semi24")

    assert main([str(run)]) == 0

    report = run / "report.md"
    assert str(report) in capsys.readouterr().out
    text = report.read_text()
    assert "fmnist_vit_24/default" in text and "| 2:4 |" in text
    pngs = linked_pngs(report)
    assert sorted(p.name for p in pngs) == ["curves.png", "flip_rate.png", "layers_00_fmnist_vit_24_default.png"]
    for png in pngs:
        assert_real_png(png)
    assert "accuracy_vs_sparsity" not in text  # one run has nothing to compare against


def test_several_runs_compare_methods_in_common_parent(tmp_path, method_runs):
    assert main([str(run) for run in method_runs]) == 0

    report = tmp_path / "runs" / "report" / "report.md"
    text = report.read_text()
    table_rows = [line for line in text.splitlines() if line.startswith("| fmnist_")]
    assert len(table_rows) == len(method_runs)
    assert "| fmnist_dense/default | fmnist_dense | dense | 0 | - | 0.9000 | 300 | 932 |" in table_rows
    assert "| fmnist_vit_24/default | fmnist_vit_24 | 2:4 | 0.5 | - |" in table_rows[1]
    assert "| block/magnitude | 0.8 | 16 |" in table_rows[3]
    assert "| block/DRESS | 0.8 | 32 |" in table_rows[5]
    pngs = linked_pngs(report)
    assert report.parent / "figures" / "accuracy_vs_sparsity.png" in pngs
    assert len([p for p in pngs if p.name.startswith("layers_")]) == len(method_runs) - 1  # dense has none
    for png in pngs:
        assert_real_png(png)


def test_runs_alike_but_for_the_method_group_by_method(method_runs):
    groups = comparison_groups(load_runs(method_runs))

    assert list(groups) == ["dense", "2:4", "block/magnitude", "block/DRESS"]
    assert {run.block_size for run in groups["block/DRESS"]} == {16, 32}  # told apart by marker, not by line


def test_lr_sweep_gets_one_group_per_lr_averaging_only_its_seeds(tmp_path):
    sweep = tmp_path / "runs" / "sweeps" / "lr"
    for lr, acc in ((1e-3, 0.88), (3e-3, 0.80)):
        for seed in (0, 1):
            make_run(sweep / f"optim.lr={lr},seed={seed}", "fmnist_vit_24", "semi24", final_acc=acc + seed / 100,
                     seed=seed, lr=lr)
            make_run(sweep / f"optim.lr={lr},recipe=fmnist_dense,seed={seed}", "fmnist_dense", "dense",
                     final_acc=0.9, flip_rate=False, seed=seed, lr=lr)

    groups = comparison_groups(load_runs(find_run_dirs([sweep])))

    assert {label: sorted((run.config["optim"]["lr"], run.config["seed"]) for run in runs)
            for label, runs in groups.items()} == {
        "dense, optim.lr=0.001": [(1e-3, 0), (1e-3, 1)], "dense, optim.lr=0.003": [(3e-3, 0), (3e-3, 1)],
        "2:4, optim.lr=0.001": [(1e-3, 0), (1e-3, 1)], "2:4, optim.lr=0.003": [(3e-3, 0), (3e-3, 1)]}
    assert main([str(sweep), "--out", str(tmp_path / "out")]) == 0
    assert_real_png(tmp_path / "out" / "figures" / "accuracy_vs_sparsity.png")


def test_a_long_run_label_wraps_inside_the_layer_plot(tmp_path):
    job = ",".join(f"sparsity.option_{i}=value_{i}" for i in range(8))
    run_dir = make_run(tmp_path / "runs" / "sweeps" / "long" / job, "fmnist_vit_24", "semi24")
    run = load_runs([run_dir])[0]

    fig = plot_layer_sparsity(run, tmp_path / "layers.png")

    title = fig.axes[0].title.get_window_extent(FigureCanvasAgg(fig).get_renderer())
    assert "\n" in fig.axes[0].get_title()
    assert 0 <= title.x0 and title.x1 <= fig.bbox.width, (title, fig.bbox)


def test_sweep_root_stands_for_its_jobs(tmp_path):
    sweep = tmp_path / "runs" / "sweeps" / "block_levels"
    for level in (0.5, 0.7, 0.9):
        make_run(sweep / f"sparsity.sparsity={level}", "fmnist_vit_block", "block", level, 16, final_acc=1 - level / 4)
    write_sweep_summary(sweep)  # the sweep's own summary.json and summary.md, as the Hydra callback writes them
    (sweep / ".submitit").mkdir()

    assert main([str(sweep), "--out", str(tmp_path / "out")]) == 0

    text = (tmp_path / "out" / "report.md").read_text()
    for level in (0.5, 0.7, 0.9):
        assert f"| sparsity.sparsity={level} | fmnist_vit_block | block/magnitude | {level} | 16 |" in text
    assert len(re.findall(r"^\| sparsity\.sparsity=", text, flags=re.M)) == 3
    for png in linked_pngs(tmp_path / "out" / "report.md"):
        assert_real_png(png)


def test_dense_run_without_flip_rate_still_builds(tmp_path):
    run = make_run(tmp_path / "fmnist_dense" / "default", "fmnist_dense", "dense", flip_rate=False)

    assert main([str(run)]) == 0

    text = (run / "report.md").read_text()
    assert "_Not drawn: no run logged sparsity/flip_rate" in text
    assert "_Not drawn: no layer in summary.json has a measured sparsity" in text
    assert [p.name for p in linked_pngs(run / "report.md")] == ["curves.png"]


def test_run_that_logged_no_rows_gets_a_report_without_curves(tmp_path):
    run = make_run(tmp_path / "fmnist_vit_24" / "crashed", "fmnist_vit_24", "semi24")
    (run / "csv" / "metrics.csv").write_text("epoch,step,train/acc,train/loss\n")

    assert main([str(run)]) == 0

    assert "_Not drawn: no run has train/ or val/ loss or accuracy rows" in (run / "report.md").read_text()


def test_missing_path_is_a_clear_error(tmp_path, capsys):
    missing = tmp_path / "runs" / "nope"

    with pytest.raises(SystemExit) as exit_info:
        main([str(missing)])

    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"{missing} does not exist" in err and "summary.json" in err


def _empty_summary(run):
    (run / "summary.json").write_text("")


def _no_metrics(run):
    (run / "csv" / "metrics.csv").unlink()


def _no_config(run):
    (run / "config.yaml").unlink()


def _config_without_pattern(run):
    (run / "config.yaml").write_text("seed: 0\nsparsity: {}\n")


@pytest.mark.parametrize("damage, bad_file, expected", [
    (_empty_summary, "summary.json", "is empty; expected the JSON object train.py writes"),
    (_no_metrics, "csv/metrics.csv", "not found; expected the CSVLogger metrics"),
    (_no_config, "config.yaml", "not found; expected the resolved Hydra config"),
    (_config_without_pattern, "config.yaml", "has no sparsity.pattern"),
])
def test_broken_run_dir_names_the_file_and_what_it_expected(tmp_path, capsys, damage, bad_file, expected):
    run = make_run(tmp_path / "fmnist_vit_24" / "default", "fmnist_vit_24", "semi24")
    damage(run)

    with pytest.raises(SystemExit):
        main([str(run)])

    err = capsys.readouterr().err
    assert str(run / bad_file) in err and expected in err


def test_directory_without_runs_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)

    with pytest.raises(SystemExit):
        main([str(tmp_path / "empty")])

    assert "has no summary.json, nor any subdirectory with one" in capsys.readouterr().err


def test_python_dash_m_entry_point(tmp_path):
    run = make_run(tmp_path / "fmnist_vit_24" / "default", "fmnist_vit_24", "semi24")

    done = subprocess.run([sys.executable, "-m", "sparsetrain.report", str(run), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120)

    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out" / "report.md").is_file()
