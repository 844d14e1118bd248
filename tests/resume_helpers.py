"""Shared by the kill-and-resume tests: a small config, runs of train.py in the background, and a comparison
of two finished runs (checkpoint state and metrics.csv) that must be identical."""
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from sparsetrain.training.app import train
from sparsetrain.training.checkpoints import load_resume_checkpoint
from sparsetrain.training.resumable import read_metric_rows
from tests.helpers import ROOT, TINY, compose_cfg

STEPS = 20
BATCHES_PER_EPOCH = 16  # data.train_size / data.batch_size
# TINY with a 2-block, width-64 ViT (fast 2:4 masks), drop path (so the RNG state matters), an epoch boundary
# inside the resumed part, a checkpoint and a CSV row every step, and sparsity logs every 3 steps (so a resume
# lands between two logs of the flip rate).
SMALL = [*TINY, "data.train_size=64", "trainer.max_epochs=100", f"trainer.max_steps={STEPS}", "model.depth=2",
         "model.embed_dim=64", "model.num_heads=2", "model.drop_path_rate=0.1",
         "callbacks.checkpoint.every_n_train_steps=1", "callbacks.sparsity_log_every=3",
         "trainer.log_every_n_steps=1"]
# The block recipe also trains dense for 8 steps first, so the schedule changes phase after the resume.
RECIPE_OVERRIDES = {"fmnist_vit_24": [], "fmnist_vit_block": ["prune_schedule.dense_warmup_steps=8"]}

_straight_runs: dict = {}


def overrides(recipe: str) -> list:
    return [f"recipe={recipe}", *SMALL, *RECIPE_OVERRIDES[recipe]]


def straight_run(recipe: str, tmp_path_factory) -> Path:
    """The run directory of `recipe` trained STEPS steps without a stop (trained once per pytest run)."""
    if recipe not in _straight_runs:
        run_dir = tmp_path_factory.mktemp(f"straight-{recipe}")
        train(compose_cfg(overrides(recipe), run_dir))
        _straight_runs[recipe] = run_dir
    return _straight_runs[recipe]


# One intra-op thread, here and in every train.py these tests start: runs compared bit for bit must reduce in
# the same order, and tiny models train several times faster on a busy 2-core machine without thread hand-offs.
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@contextmanager
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def start_cli(args: list, cwd: Path, env: dict = None) -> subprocess.Popen:
    """`python train.py ARGS` in the background (one thread); its output goes to cwd/output.txt."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", **ONE_THREAD, **(env or {}))
    env.pop("HYDRA_FULL_ERROR", None)
    out = open(cwd / "output.txt", "w")
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, env=env,
                            stdout=out, stderr=subprocess.STDOUT)


def output_of(cwd: Path) -> str:
    path = cwd / "output.txt"
    return path.read_text() if path.is_file() else ""


def logged_steps(run_dir: Path) -> list:
    path = run_dir / "csv" / "metrics.csv"
    if not path.is_file():
        return []
    return [int(row["step"]) for row in read_metric_rows(path) if "train/loss" in row]


def wait_until(condition, proc: subprocess.Popen, cwd: Path, timeout: float = 180) -> None:
    """Poll `condition()` while `proc` runs; fail with its output if it exits first or time runs out."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"train.py exited ({proc.returncode}) too early:\n{output_of(cwd)[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"gave up waiting after {timeout}s:\n{output_of(cwd)[-3000:]}")
        time.sleep(0.05)


def wait_until_trained(proc: subprocess.Popen, run_dir: Path, steps: int, cwd: Path) -> None:
    """Wait until metrics.csv (written as each step is logged) holds `steps` training steps."""
    wait_until(lambda: len(logged_steps(run_dir)) >= steps, proc, cwd)


def send_and_wait(proc: subprocess.Popen, signum: int, timeout: float = 120) -> int:
    proc.send_signal(signum)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def assert_same(a, b, where: str) -> None:
    """Exact equality of nested checkpoint content (tensors bit for bit)."""
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), f"{where} differs"
    elif isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and np.array_equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys {set(a) ^ set(b)}"
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{where}: length"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def metric_rows(run_dir: Path) -> list:
    """metrics.csv rows without the wall-clock ones (images/s)."""
    rows = read_metric_rows(run_dir / "csv" / "metrics.csv")
    return [{k: v for k, v in row.items() if not k.startswith("perf/")} for row in rows]


def assert_runs_identical(straight: Path, resumed: Path, resumed_from: int, recipe: str) -> None:
    """The resumed run ends where the straight one does, bit for bit, and logged the same numbers."""
    a, b = load(straight / "checkpoints" / "last.ckpt"), load(resumed / "checkpoints" / "last.ckpt")
    assert a["global_step"] == b["global_step"] == STEPS
    sparsity_state = [k for k in a["state_dict"] if k.endswith((".mask", ".block_scores", ".mask_step"))]
    assert any(k.endswith(".block_scores") for k in sparsity_state) == (recipe == "fmnist_vit_block")
    assert sparsity_state, "no masks in the checkpoint"
    assert_same(a["state_dict"], b["state_dict"], "state_dict")  # weights, masks, block scores
    assert_same(a["optimizer_states"], b["optimizer_states"], "optimizer_states")
    assert_same(a["lr_schedulers"], b["lr_schedulers"], "lr_schedulers")
    assert a["epoch"] == b["epoch"]
    assert_same(a["loops"]["fit_loop"]["state_dict"], b["loops"]["fit_loop"]["state_dict"], "data position")
    for key in ("ResumeState", "SparsityScheduler"):
        assert_same(a["callbacks"][key], b["callbacks"][key], f"callbacks.{key}")

    rows_a, rows_b = metric_rows(straight), metric_rows(resumed)
    after_a = [r for r in rows_a if int(r["step"]) >= resumed_from]
    after_b = [r for r in rows_b if int(r["step"]) >= resumed_from]
    for name in ("lr", "sparsity/phase", "sparsity/flip_rate", "train/loss", "val/acc"):
        assert any(name in r for r in after_a), name
    assert_same_rows(after_a, after_b)
    # The rows before the resume point survived the restart too.
    assert_same_rows(rows_a, rows_b)


def assert_same_rows(rows_a: list, rows_b: list) -> None:
    for a, b in zip(rows_a, rows_b):
        diff = {k: (a.get(k), b.get(k)) for k in set(a) | set(b) if a.get(k) != b.get(k)}
        assert not diff, f"metrics.csv, step {a.get('step')}: {diff}"
    assert len(rows_a) == len(rows_b), "metrics.csv: different numbers of rows"


def resume_path(run_dir: Path, resume: str | None) -> Path | None:
    """The checkpoint `resume` means in run_dir (the one train() would continue from)."""
    return load_resume_checkpoint(run_dir, resume)[0]
