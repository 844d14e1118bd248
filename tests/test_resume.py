"""Exact resume: a run SIGKILLed mid-epoch and continued with resume=auto ends bit-identical to one that never
stopped (weights, masks, block scores, optimizer, LR schedule, data position, RNG, logged metrics)."""
import signal

import pytest
import torch
from torch.utils.data import Dataset

from sparsetrain.training.app import train
from sparsetrain.training.checkpoints import find_resume_checkpoint
from sparsetrain.training.data import EpochSeededSampler, SeededAugmentation, SyntheticDataModule
from tests.helpers import compose_cfg
from tests.resume_helpers import (BATCHES_PER_EPOCH, RECIPE_OVERRIDES, STEPS, assert_runs_identical, load,
                                  one_thread, overrides, send_and_wait, start_cli, straight_run, wait_until_trained)


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

    resumed_from = load(find_resume_checkpoint(run_dir, "auto"))["global_step"]
    assert 0 < resumed_from < STEPS and resumed_from % BATCHES_PER_EPOCH, "the kill must land mid-epoch"
    summary = train(compose_cfg([*overrides(recipe), "resume=auto"], run_dir))
    assert summary["global_step"] == STEPS
    assert_runs_identical(straight, run_dir, resumed_from, recipe)
    assert not [w for w in recwarn if "not resumable" in str(w.message)]


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
