"""train.py as a user runs it: what a run prints, one-line errors, multirun sweeps with a summary table, wandb
offline."""
import json
import re
from collections import Counter

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


# A run whose output goes to a file: the default progress bar setting and data workers, 10 steps that end before
# the first validation (16 batches per epoch), a progress line every 5 steps.
LOGGED_RUN = ["recipe=fmnist_vit_24", "data=synthetic", "data.img_size=32", "data.batch_size=4", "data.train_size=64",
              "data.val_size=16", "trainer.accelerator=cpu", "trainer.precision=32-true", "trainer.max_steps=10",
              "trainer.limit_val_batches=1", "trainer.log_every_n_steps=5", "callbacks.progress_every_n_steps=5",
              "model.depth=1", "sched.warmup_steps=0"]
HYDRA_LOG_LINE = re.compile(r"^\[[^]]+\]\[[^]]+\]\[[A-Z]+\] - (.*)$")


def test_a_run_writing_to_a_file_prints_progress_lines_and_ends_with_one_block(tmp_path):
    proc = run_cli([*LOGGED_RUN, f"paths.root={tmp_path / 'runs'}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "runs" / "fmnist_vit_24" / "default"
    summary = json.loads((run_dir / "summary.json").read_text())
    out = proc.stdout

    for step in (5, 10):
        line = rf"step {step}/10  epoch 0  loss \d+\.\d{{4}}  acc \d\.\d{{4}}  [\d.,]+ img/s"
        assert re.search(line, out), out[-3000:]
    block = out[out.index("run finished: fmnist_vit_24"):].splitlines()
    checkpoint_mib = (run_dir / "checkpoints" / "last.ckpt").stat().st_size / 2**20
    assert block[1:] == [
        f"  val/acc      {summary['metrics']['val/acc']:.4f}",
        f"  val/loss     {summary['metrics']['val/loss']:.4f}",
        "  steps        10",
        block[4],
        block[5],
        f"  checkpoints  checkpoints/last.ckpt ({checkpoint_mib:.1f} MiB)",
        f"  run dir      {run_dir}",
    ]
    assert re.fullmatch(rf"  images/s     [\d.,]+ steady state \(from step {summary['steady_from_step']}\), "
                        r"[\d.,]+ over the whole run", block[4]), block[4]
    assert re.fullmatch(r"  wall time    [\dhms. ]+", block[5]), block[5]

    messages = [m.group(1) for line in out.splitlines() if (m := HYDRA_LOG_LINE.match(line))]
    assert messages and not [m for m, n in Counter(messages).items() if n > 1]
    assert out.count("linear/conv layers are sparse") == 1  # the layer table, without a log line per layer
    assert not [m for m in messages if m.startswith("sparsify ")]
    assert "\r" not in out  # no progress bar redrawing a line
    # Lightning's records reach the console once (through Hydra's handler), and no warning is printed.
    assert proc.stderr == ""


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
    assert "exists and is not empty" not in proc.stderr  # continuing in its own checkpoint folder is the point
    assert (run_dir / "wandb_id.txt").read_text().strip() == run_id
    assert len(list((run_dir / "wandb").glob(f"offline-run-*-{run_id}"))) >= 1


def test_bad_input_is_one_line_exit_2_and_leaves_an_earlier_run_alone(tmp_path):
    """A mistake Hydra finds while composing (an unknown recipe, a YAML syntax error) and one the checks after it
    find, each pointed at the directory of a finished run. test_config_checks.py has the rest, in-process."""
    proc = run_cli(["recipe=fmnist_dense", *_tiny_cli(tmp_path / "runs")], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "runs" / "fmnist_dense" / "default"
    before = {path: path.read_bytes() for path in run_dir.rglob("*") if path.is_file()}
    mtimes = {path: path.stat().st_mtime_ns for path in before}
    (tmp_path / "mine" / "recipe").mkdir(parents=True)
    (tmp_path / "mine" / "recipe" / "broken.yaml").write_text("model:\n  name: vit\n   depth: 2\n")
    same_dir = [f"hydra.run.dir={run_dir}", *_tiny_cli(tmp_path / "runs")]
    for args, line in [
        (["recipe=vit_l24"], "recipe=vit_l24: no such recipe option; did you mean recipe=vit_l_24? (the options: "),
        (["-cd", str(tmp_path / "mine"), "recipe=broken"],
         "mine/recipe/broken.yaml line 3, column 9: YAML syntax error, mapping values are not allowed here"),
        (["recipe=fmnist_dense", "optim.lr=abc"], "optim.lr=abc must be a number > 0, e.g. optim.lr=1e-3"),
    ]:
        proc = run_cli([*args, *same_dir], cwd=tmp_path)
        assert proc.returncode == 2, (args, proc.stderr[-3000:])
        assert proc.stderr.startswith(f"sparsetrain: error: {line}") and proc.stderr.count("\n") == 1, proc.stderr
        assert {path: path.read_bytes() for path in run_dir.rglob("*") if path.is_file()} == before
        assert {path: path.stat().st_mtime_ns for path in before} == mtimes
