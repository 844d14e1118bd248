"""Faults: preemption signals, kills during a checkpoint write, damaged checkpoints, non-finite losses."""
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import lightning.pytorch as L
import pytest
import torch

import sparsetrain.training.app as app
from sparsetrain.training.app import train
from sparsetrain.training.checkpoints import AtomicCheckpointIO, CheckpointError, load_checkpoint_file
from sparsetrain.training.module import NonFiniteLossError
from sparsetrain.training.preemption import PREEMPTED_EXIT_CODE
from sparsetrain.training.resumable import read_metric_rows
from tests.helpers import ROOT, TINY, compose_cfg
from tests.resume_helpers import (STEPS, assert_runs_identical, assert_same, assert_same_rows, load, metric_rows,
                                  one_thread, output_of, overrides, resume_path, send_and_wait, start_cli, straight_run,
                                  wait_until, wait_until_trained)

DENSE = ["recipe=fmnist_dense", *TINY, "model.depth=2", "model.embed_dim=64", "model.num_heads=2"]


@pytest.fixture(autouse=True)
def single_thread():
    with one_thread():
        yield


# ----------------------------------------------------------------------------------------------------------
# Preemption: SIGTERM, SIGUSR1, SLURM auto-requeue
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("signum, recipe", [(signal.SIGTERM, "fmnist_vit_24"), (signal.SIGUSR1, "fmnist_vit_block")],
                         ids=["SIGTERM", "SIGUSR1"])
def test_preemption_signal_saves_exits_75_and_the_resumed_run_continues_exactly(
        signum, recipe, tmp_path, tmp_path_factory):
    straight = straight_run(recipe, tmp_path_factory)
    root = tmp_path / "runs"
    proc = start_cli([*overrides(recipe), f"paths.root={root}"], cwd=tmp_path)
    run_dir = root / recipe / "default"
    wait_until_trained(proc, run_dir, 3, tmp_path)
    assert send_and_wait(proc, signum) == PREEMPTED_EXIT_CODE, output_of(tmp_path)[-3000:]

    saved = load(run_dir / "checkpoints" / "last.ckpt")["global_step"]
    assert f"stopped by a signal after step {saved}" in output_of(tmp_path)
    assert 3 <= saved < STEPS
    assert not (run_dir / "summary.json").exists()  # the run is not finished
    train(compose_cfg([*overrides(recipe), "resume=auto"], run_dir))
    assert_runs_identical(straight, run_dir, saved, recipe)


def test_slurm_sigusr1_keeps_lightnings_requeue_and_resume_auto_takes_the_newest(tmp_path):
    """Under SLURM, SIGUSR1 stays Lightning's: hpc checkpoint + `scontrol requeue`, training goes on."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    scontrol = fake_bin / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "scontrol_calls.txt"}\n')
    scontrol.chmod(0o755)
    slurm = {"SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1", "SLURM_JOB_NAME": "train", "SLURM_JOB_ID": "4242",
             "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NODELIST": "localhost",
             "PATH": f"{fake_bin}:{os.environ['PATH']}"}
    root = tmp_path / "runs"
    args = [*DENSE, "trainer.max_steps=400", "trainer.max_epochs=100", "callbacks.checkpoint.every_n_train_steps=1",
            "trainer.log_every_n_steps=1", f"paths.root={root}"]
    proc = start_cli(args, cwd=tmp_path, env=slurm)
    run_dir = root / "fmnist_dense" / "default"
    wait_until_trained(proc, run_dir, 2, tmp_path)
    proc.send_signal(signal.SIGUSR1)
    hpc = run_dir / "hpc_ckpt_1.ckpt"
    wait_until(lambda: (tmp_path / "scontrol_calls.txt").is_file(), proc, tmp_path)
    assert (tmp_path / "scontrol_calls.txt").read_text().split() == ["requeue", "4242"]
    assert hpc.is_file() and proc.poll() is None, "SIGUSR1 under SLURM must not stop training"
    # SLURM then sends SIGTERM before it kills the job
    assert send_and_wait(proc, signal.SIGTERM) == PREEMPTED_EXIT_CODE, output_of(tmp_path)[-3000:]
    last = run_dir / "checkpoints" / "last.ckpt"
    assert load(last)["global_step"] >= load(hpc)["global_step"]
    assert resume_path(run_dir, "auto") == last
    os.utime(hpc)  # an hpc checkpoint newer than last.ckpt is the one to continue from
    assert resume_path(run_dir, "auto") == hpc


# ----------------------------------------------------------------------------------------------------------
# Atomic checkpoint writes
# ----------------------------------------------------------------------------------------------------------

STALLED_WRITER = textwrap.dedent("""
    import os, sys, time, torch
    from sparsetrain.training.checkpoints import AtomicCheckpointIO

    def stalled_fsync(fd):  # the new checkpoint is written but not yet renamed into place
        open(sys.argv[2], "w").close()
        time.sleep(120)

    os.fsync = stalled_fsync
    new = {"state_dict": {"w": torch.zeros(256, 1024)}, "global_step": 2}
    AtomicCheckpointIO().save_checkpoint(new, sys.argv[1])
""")


def test_sigkill_during_a_checkpoint_write_leaves_the_previous_checkpoint_whole(tmp_path):
    run_dir = tmp_path / "run"
    last = run_dir / "checkpoints" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(256, 1024)}, "global_step": 1}, last)
    marker = tmp_path / "writing"
    proc = subprocess.Popen([sys.executable, "-c", STALLED_WRITER, str(last), str(marker)], cwd=ROOT,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))
    wait_until(marker.is_file, proc, tmp_path)
    partial = list(last.parent.glob(".last.ckpt.tmp-*"))
    assert len(partial) == 1 and partial[0].stat().st_size > 0, "the new checkpoint was being written"
    assert send_and_wait(proc, signal.SIGKILL) == -signal.SIGKILL

    assert load_checkpoint_file(last)["global_step"] == 1
    assert resume_path(run_dir, "auto") == last
    assert not partial[0].exists(), "resume removes what the killed write left behind"


def test_a_save_that_fails_midway_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    last = tmp_path / "checkpoints" / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"state_dict": {"w": torch.ones(4)}, "global_step": 1}, last)

    def disk_full(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(4)}, "global_step": 2}, last)
    monkeypatch.undo()
    assert load_checkpoint_file(last)["global_step"] == 1
    assert [p.name for p in last.parent.iterdir()] == ["last.ckpt"]


# ----------------------------------------------------------------------------------------------------------
# Damaged checkpoints
# ----------------------------------------------------------------------------------------------------------


def test_truncated_checkpoint_is_named_and_resume_auto_falls_back_exactly_to_the_newest_good_one(tmp_path, capsys):
    # 4 batches per epoch: the best-by-val/acc checkpoint beside last.ckpt was written at the end of an epoch
    base = [*DENSE, "data.train_size=16", "trainer.max_epochs=100", "trainer.max_steps=12",
            "trainer.log_every_n_steps=1", "model.drop_path_rate=0.1"]
    straight, damaged = tmp_path / "straight", tmp_path / "damaged"
    train(compose_cfg(base, straight))
    (best,) = (straight / "checkpoints").glob("step*.ckpt")
    (damaged / "checkpoints").mkdir(parents=True)
    shutil.copy2(best, damaged / "checkpoints" / best.name)
    last = damaged / "checkpoints" / "last.ckpt"
    whole = (straight / "checkpoints" / "last.ckpt").read_bytes()
    last.write_bytes(whole[: len(whole) // 2])

    with pytest.raises(CheckpointError, match=f"{last}.*corrupt or truncated"):
        load_checkpoint_file(last)
    with pytest.raises(CheckpointError, match="last.ckpt is corrupt or truncated"):
        train(compose_cfg([*base, f"resume={last}"], damaged))

    capsys.readouterr()
    assert train(compose_cfg([*base, "resume=auto"], damaged))["global_step"] == 12
    fallback = damaged / "checkpoints" / best.name
    assert f"skipped unusable last.ckpt; continuing from {fallback}" in capsys.readouterr().out
    # Resuming from an end-of-epoch checkpoint is exact too (data order, RNG, logging step).
    a, b = load(straight / "checkpoints" / "last.ckpt"), load(last)
    assert_same(a["state_dict"], b["state_dict"], "state_dict")
    assert_same(a["optimizer_states"], b["optimizer_states"], "optimizer_states")
    resumed_from = load(fallback)["global_step"]
    assert 0 < resumed_from < 12 and resumed_from % 4 == 0
    assert_same_rows([r for r in metric_rows(straight) if int(r["step"]) >= resumed_from], metric_rows(damaged))


def test_resume_auto_refuses_when_every_checkpoint_is_damaged(tmp_path):
    train(compose_cfg([*DENSE, "trainer.max_steps=2"], tmp_path))
    for path in (tmp_path / "checkpoints").glob("*.ckpt"):
        path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="every checkpoint .* is unusable.*run_name="):
        train(compose_cfg([*DENSE, "trainer.max_steps=4", "resume=auto"], tmp_path))


# ----------------------------------------------------------------------------------------------------------
# Non-finite loss: nonfinite=skip | stop
# ----------------------------------------------------------------------------------------------------------


class PoisonOnce(L.Callback):
    """Test hook: at `step`, make that batch's input NaN, or put an inf into one layer's weight."""

    def __init__(self, step: int, layer: str = ""):
        self.step, self.layer, self.done = step, layer, False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step != self.step or self.done:
            return
        self.done = True
        if self.layer:
            with torch.no_grad():
                pl_module.model.get_submodule(self.layer).weight[0, 0] = float("inf")
        else:
            batch[0].fill_(float("nan"))


def with_callback(monkeypatch, callback):
    build_callbacks = app.build_callbacks
    monkeypatch.setattr(app, "build_callbacks", lambda *a, **k: [*build_callbacks(*a, **k), callback])


def test_nonfinite_skip_drops_the_step_and_training_goes_on(tmp_path, monkeypatch, caplog):
    with_callback(monkeypatch, PoisonOnce(step=2))
    cfg = [*DENSE, "trainer.max_steps=4", "nonfinite=skip", "trainer.log_every_n_steps=1"]
    summary = train(compose_cfg(cfg, tmp_path))
    assert summary["global_step"] == 4 and summary["skipped_steps"] == 1
    assert "step 2: loss is nan, step skipped (nonfinite=skip)" in caplog.text
    state = load(tmp_path / "checkpoints" / "last.ckpt")["state_dict"]
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    rows = read_metric_rows(tmp_path / "csv" / "metrics.csv")
    assert any(r.get("train/skipped_steps") == "1.0" for r in rows)


def test_nonfinite_skip_under_accumulation_drops_the_whole_optimizer_step(tmp_path, monkeypatch, caplog):
    """The NaN micro-batch's backward runs (the check waits for the optimizer step), so its gradients are in the
    accumulated sum: the step must drop them all, or every weight would turn NaN."""
    with_callback(monkeypatch, PoisonOnce(step=1))
    cfg = [*DENSE, "trainer.max_steps=3", "nonfinite=skip", "+trainer.accumulate_grad_batches=2"]
    summary = train(compose_cfg(cfg, tmp_path))
    assert summary["global_step"] == 3 and summary["skipped_steps"] == 1
    assert "step 1: loss is nan, step skipped (nonfinite=skip)" in caplog.text
    state = load(tmp_path / "checkpoints" / "last.ckpt")["state_dict"]
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_nonfinite_stop_checkpoints_then_names_the_step_and_the_first_bad_layer(tmp_path, monkeypatch, capsys):
    with_callback(monkeypatch, PoisonOnce(step=3, layer="blocks.1.mlp.fc1"))
    cfg = [*DENSE, "trainer.max_steps=6", "nonfinite=stop", "callbacks.checkpoint.every_n_train_steps=1"]
    with pytest.raises(NonFiniteLossError) as error:
        train(compose_cfg(cfg, tmp_path))
    saved = tmp_path / "checkpoints" / "nonfinite-step0000003.ckpt"
    message = str(error.value)
    assert "at step 3" in message and "first non-finite output: blocks.1.mlp.fc1" in message
    assert str(saved) in message and "optim.lr" in message
    ckpt = load(saved)  # written before the error reached the caller
    assert ckpt["global_step"] == 3
    assert torch.isinf(ckpt["state_dict"]["model.blocks.1.mlp.fc1.weight"]).any()

    # Its weights are not finite, so resume=auto continues from the step-3 checkpoint before it, saying why.
    capsys.readouterr()
    assert resume_path(tmp_path, "auto") == tmp_path / "checkpoints" / "last.ckpt"
    assert "skipped unusable nonfinite-step0000003.ckpt" in capsys.readouterr().out
    with pytest.raises(CheckpointError, match="non-finite weights.*blocks.1.mlp.fc1.weight"):
        load_checkpoint_file(saved)


def test_nonfinite_stop_on_bad_data_then_resume_retries_the_step_and_ends_as_if_it_never_failed(tmp_path, monkeypatch):
    cfg = [*DENSE, "trainer.max_steps=6", "trainer.log_every_n_steps=1", "model.drop_path_rate=0.1"]
    train(compose_cfg(cfg, tmp_path / "straight"))
    build_callbacks = app.build_callbacks
    with_callback(monkeypatch, PoisonOnce(step=3))  # a NaN batch: the weights are still finite
    with pytest.raises(NonFiniteLossError, match="at step 3; first non-finite output: patch_embed.proj"):
        train(compose_cfg(cfg, tmp_path / "failed"))
    monkeypatch.setattr(app, "build_callbacks", build_callbacks)  # the data is good again

    assert resume_path(tmp_path / "failed", "auto").name == "nonfinite-step0000003.ckpt"
    assert train(compose_cfg([*cfg, "resume=auto"], tmp_path / "failed"))["global_step"] == 6
    a, b = (load(tmp_path / run / "checkpoints" / "last.ckpt") for run in ("straight", "failed"))
    assert_same(a["state_dict"], b["state_dict"], "state_dict")
    assert_same_rows(metric_rows(tmp_path / "straight"), metric_rows(tmp_path / "failed"))
