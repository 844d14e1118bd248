"""Exact resume: a run SIGKILLed mid-epoch and continued with resume=auto ends bit-identical to one that never
stopped (weights, masks, block scores, optimizer, LR schedule, data position, RNG, logged metrics)."""
import os
import signal
import subprocess
import sys

import pytest
import torch
from torch.utils.data import Dataset

from sparsetrain.training.app import train
from sparsetrain.training.data import EpochSeededSampler, SeededAugmentation, SyntheticDataModule
from sparsetrain.training.resumable import read_metric_rows
from tests.helpers import ROOT, compose_cfg
from tests.resume_helpers import (BATCHES_PER_EPOCH, ONE_THREAD, RECIPE_OVERRIDES, STEPS, assert_runs_identical,
                                  load, logged_steps, one_thread, overrides, resume_path, send_and_wait, start_cli,
                                  straight_run, wait_until_trained)


@pytest.fixture(autouse=True)
def single_thread():
    with one_thread():
        yield


@pytest.mark.parametrize("recipe", list(RECIPE_OVERRIDES))
def test_sigkill_mid_epoch_then_resume_auto_matches_a_straight_run(recipe, tmp_path, tmp_path_factory, recwarn):
    straight = straight_run(recipe, tmp_path_factory)
    root = tmp_path / "runs"
    proc = start_cli([*overrides(recipe), f"paths.root={root}"], cwd=tmp_path)
    run_dir = root / recipe / "default"
    wait_until_trained(proc, run_dir, 3, tmp_path)
    assert send_and_wait(proc, signal.SIGKILL) == -signal.SIGKILL

    resumed_from = load(resume_path(run_dir, "auto"))["global_step"]
    assert 0 < resumed_from < STEPS and resumed_from % BATCHES_PER_EPOCH, "the kill must land mid-epoch"
    summary = train(compose_cfg([*overrides(recipe), "resume=auto"], run_dir))
    assert summary["global_step"] == STEPS
    assert_runs_identical(straight, run_dir, resumed_from, recipe)
    assert not [w for w in recwarn if "not resumable" in str(w.message)]


# train.py that dies (as from SIGKILL: no handler, no flush) right after it writes last.ckpt for step
# argv[1]: the moment after Lightning saved a step's checkpoint and before it logged that step.
DIES_AFTER_CHECKPOINT = """
import os, runpy, sys
from sparsetrain.training.checkpoints import AtomicCheckpointIO
save, last_step = AtomicCheckpointIO.save_checkpoint, int(sys.argv.pop(1))
def save_then_die(self, checkpoint, path, storage_options=None):
    save(self, checkpoint, path, storage_options)
    if checkpoint["global_step"] == last_step:
        os._exit(9)
AtomicCheckpointIO.save_checkpoint = save_then_die
sys.argv[0] = "train.py"
runpy.run_path("train.py", run_name="__main__")
"""


def test_a_kill_between_a_checkpoint_and_its_log_row_loses_no_row(tmp_path, tmp_path_factory):
    recipe = "fmnist_vit_24"
    straight = straight_run(recipe, tmp_path_factory)
    root = tmp_path / "runs"
    env = dict(os.environ, PYTHONPATH=str(ROOT), **ONE_THREAD)
    env.pop("HYDRA_FULL_ERROR", None)
    died = subprocess.run([sys.executable, "-c", DIES_AFTER_CHECKPOINT, "4", *overrides(recipe), f"paths.root={root}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert died.returncode == 9, died.stdout[-3000:] + died.stderr[-3000:]
    run_dir = root / recipe / "default"
    assert load(run_dir / "checkpoints" / "last.ckpt")["global_step"] == 4
    assert logged_steps(run_dir) == [0, 1, 2], "the process died before it logged step 3"

    summary = train(compose_cfg([*overrides(recipe), "resume=auto"], run_dir))
    assert summary["global_step"] == STEPS
    assert_runs_identical(straight, run_dir, 4, recipe)


@pytest.mark.parametrize("recipe", list(RECIPE_OVERRIDES))
def test_metrics_measured_every_k_steps_have_rows_at_those_steps_only(recipe, tmp_path_factory):
    # the runs measure sparsity every 3 steps and log the training values every step
    rows = read_metric_rows(straight_run(recipe, tmp_path_factory) / "csv" / "metrics.csv")
    for name in ("sparsity/flip_rate", "sparsity/mask_checksum", "sparsity/layer/blocks.0.mlp.fc1"):
        assert [int(row["step"]) for row in rows if name in row] == list(range(0, STEPS, 3)), name
    assert [int(row["step"]) for row in rows if "train/loss" in row] == list(range(STEPS))


def test_train_loader_resumes_mid_epoch_with_exactly_the_remaining_batches():
    data = SyntheticDataModule(train_size=40, val_size=8, batch_size=4, img_size=8, channels=1)
    data.setup("fit")
    loader = data.train_dataloader()
    loader.sampler.set_epoch(2)
    epoch = [labels for _, labels in loader]
    batches = iter(loader)
    for _ in range(3):
        next(batches)
    state = loader.state_dict()
    assert state == {"epoch": 2, "batches": 3, "batch_size": 4, "num_replicas": 1}

    resumed = data.train_dataloader()
    resumed.load_state_dict(state)
    resumed.sampler.set_epoch(2)  # Lightning does this before the first batch of the epoch
    rest = [labels for _, labels in resumed]
    assert len(rest) == len(epoch) - 3 and all(torch.equal(a, b) for a, b in zip(rest, epoch[3:]))
    assert resumed.state_dict()["batches"] == len(epoch)
    resumed.sampler.set_epoch(3)  # the skip applies to the resumed epoch only
    assert len(list(resumed)) == len(epoch)


def test_resume_with_another_batch_size_skips_the_samples_seen_and_says_so(caplog):
    data = SyntheticDataModule(train_size=40, val_size=8, batch_size=5, img_size=8, channels=1)
    data.setup("fit")
    loader = data.train_dataloader()
    loader.load_state_dict({"epoch": 0, "batches": 3, "batch_size": 4, "num_replicas": 1})
    order = list(EpochSeededSampler(40, seed=0))
    assert list(loader.batch_sampler)[0] == order[12:17]
    assert "not at an exact batch boundary" in caplog.text


class RandomNoise(Dataset):
    """A 'transform' that draws from the global RNG, as torchvision's random transforms do."""

    def __len__(self):
        return 8

    def __getitem__(self, index):
        return torch.rand(3)


def test_augmentation_depends_on_seed_epoch_and_index_only():
    data = SeededAugmentation(RandomNoise(), seed=0)
    torch.manual_seed(1)
    first = data[(5, 0)]
    torch.manual_seed(2)
    again = data[(5, 0)]
    assert torch.equal(first, again)
    assert not torch.equal(first, data[(5, 1)]) and not torch.equal(first, data[(4, 0)])
    before = torch.get_rng_state()
    data[(3, 0)]
    assert torch.equal(before, torch.get_rng_state()), "the global RNG must be left as it was"
