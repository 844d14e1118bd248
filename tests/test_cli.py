"""train.py as a user runs it: one-line errors, multirun sweeps with a summary table, wandb offline."""
import json

import yaml

from tests.helpers import TINY, run_cli
from tests.wandb_records import read_run


def _tiny_cli(root):
    return [*TINY, f"paths.root={root}"]


def test_run_prints_layer_table_and_writes_summary(tmp_path):
    proc = run_cli(["recipe=fmnist_vit_24", *_tiny_cli(tmp_path / "runs")], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "runs" / "fmnist_vit_24" / "default"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["global_step"] == 2 and "images_per_second" in summary
    assert "layers are sparse" in proc.stdout
    assert "blocks.0.mlp.fc1" in proc.stdout


def test_multirun_runs_each_job_in_its_own_directory_with_a_summary_table(tmp_path):
    proc = run_cli(["-m", "recipe=fmnist_vit_24", "optim.lr=1e-3,3e-3", "run_name=sweep1",
                    *_tiny_cli(tmp_path / "runs")], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep = tmp_path / "runs" / "sweeps" / "sweep1"
    jobs = sorted(p.parent.name for p in sweep.glob("*/summary.json"))
    assert len(jobs) == 2
    lrs = sorted(yaml.safe_load((sweep / job / "config.yaml").read_text())["optim"]["lr"] for job in jobs)
    assert lrs == [1e-3, 3e-3]
    table = (sweep / "summary.md").read_text()
    assert table.count("\n") == 4  # header, rule, two jobs
    for job in jobs:
        assert (sweep / job / "csv" / "metrics.csv").is_file()


def test_wandb_runs_offline_without_account_and_keeps_its_id_on_resume(tmp_path):
    env = {"WANDB_API_KEY": "", "WANDB_MODE": "", "HOME": str(tmp_path), "WANDB_SILENT": "true"}
    args = ["recipe=fmnist_vit_24", *_tiny_cli(tmp_path / "runs"), "logger=wandb", "trainer.max_steps=26",
            "trainer.log_every_n_steps=1", "callbacks.sparsity_log_every=5", "data.train_size=256"]
    proc = run_cli(args, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "runs" / "fmnist_vit_24" / "default"
    run_id = (run_dir / "wandb_id.txt").read_text().strip()
    offline = list((run_dir / "wandb").glob(f"offline-run-*-{run_id}"))
    assert offline, list((run_dir / "wandb").iterdir())
    logged = read_run(next(offline[0].glob("run-*.wandb")))
    assert logged["run_id"] == run_id
    expected = {"train/loss", "train/acc", "val/acc", "lr", "perf/images_per_s", "perf/tflops_dense_equiv",
                "sparsity/flip_rate", "sparsity/phase", "sparsity/level", "sparsity/mask_checksum",
                "sparsity/layer/blocks.0.mlp.fc1", "masks/blocks.0.attn.qkv/_type", "layers/_type"}
    assert expected <= logged["history_keys"], expected - logged["history_keys"]
    assert {"sparsity", "model", "optim"} <= logged["config_keys"], logged["config_keys"]
    assert "wandb sync" in proc.stdout
    assert (run_dir / "csv" / "metrics.csv").is_file()
    proc = run_cli([*args, "resume=auto", "trainer.max_steps=28", "trainer.max_epochs=2"], cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run_dir / "wandb_id.txt").read_text().strip() == run_id
    assert len(list((run_dir / "wandb").glob(f"offline-run-*-{run_id}"))) >= 1


def test_bad_input_stops_with_one_line_naming_the_fix(tmp_path):
    proc = run_cli(["recipe=fmnist_dense", *_tiny_cli(tmp_path / "runs"), "optim.lr=-0.1"], cwd=tmp_path)
    assert proc.returncode == 2
    assert "sparsetrain: error: optim.lr=-0.1 must be > 0" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_unknown_recipe_lists_options_on_the_command_line(tmp_path):
    proc = run_cli(["recipe=fmnist_vit_42"], cwd=tmp_path)
    assert proc.returncode != 0
    assert "fmnist_vit_24" in proc.stderr
