"""Every prune_schedule group, run through the real app on a one-block ViT: the zeros actually present
in each sparse layer's effective weight, step by step, are the ones the schedule promises. And DRESS
state (block scores, masks) comes back from a checkpoint exactly."""
import re

import lightning.pytorch as L
import pytest
import torch

import sparsetrain.training.app as app
from sparsetrain.sparse.block import kept_block_count
from sparsetrain.sparse.masks import mask_24_transposable
from sparsetrain.sparse.sparsify import sparse_modules
from tests.helpers import ROOT, TINY, compose_cfg

SCHEDULES = sorted(p.stem for p in (ROOT / "conf" / "prune_schedule").glob("*.yaml"))
# One transformer block is enough: its two MLP linears are the sparse layers of both recipes below.
SMALL = [*TINY, "model.depth=1", "trainer.max_epochs=5", "callbacks.checkpoint.every_n_train_steps=1"]
SEMI24 = "recipe=fmnist_vit_24"
# fmnist_vit_block: DRESS scores, 16x16 blocks, 80%, on blocks.*.mlp.* (512x128 and 128x512: 256 blocks each).
BLOCK = "recipe=fmnist_vit_block"
# One-shot and iterative schedules update the mask once per prune, too rarely for scores to train (the app
# refuses them with DRESS): those tests prune the same blocks by magnitude.
MAGNITUDE = "sparsity.criterion=magnitude"
BLOCKS_PER_LAYER = 256
TARGET = 0.8


class StepRecorder(L.Callback):
    """After every training step: the fraction of exact zeros in each sparse layer's effective weight
    (the weight the forward multiplied by), and a copy of its sparsity state."""

    def __init__(self):
        self.zeros: dict[int, dict[str, float]] = {}
        self.masks: dict[int, dict[str, torch.Tensor]] = {}
        self.state_at_end: dict[str, torch.Tensor] = {}
        self.state_at_start: dict[str, torch.Tensor] = {}

    def on_train_start(self, trainer, pl_module):
        self.state_at_start = sparsity_state(pl_module.model)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step - 1  # global_step already counts the step just taken
        layers = sparse_modules(pl_module.model)
        self.zeros[step] = {name: (m.effective_weight() == 0).float().mean().item() for name, m in layers}
        self.masks[step] = {name: m.mask.clone() for name, m in layers}
        self.state_at_end = sparsity_state(pl_module.model)


def sparsity_state(model) -> dict:
    return {f"{name}.{key}": value.detach().clone()
            for name, m in sparse_modules(model) for key, value in m.state_dict().items() if key != "weight"}


@pytest.fixture
def recorder(monkeypatch):
    recorder = StepRecorder()
    build_callbacks = app.build_callbacks
    monkeypatch.setattr(app, "build_callbacks", lambda *args, **kwargs: [*build_callbacks(*args, **kwargs), recorder])
    return recorder


def run(recipe, schedule, steps, run_dir, *overrides):
    app.train(compose_cfg([recipe, *SMALL, f"prune_schedule={schedule}", f"trainer.max_steps={steps}", *overrides],
                          run_dir))


def block_zeros(level: float) -> float:
    """Fraction of a layer's weights that are zero when `level` of its blocks are pruned."""
    return 1 - kept_block_count(BLOCKS_PER_LAYER, level) / BLOCKS_PER_LAYER


def assert_zeros(recorder, expected_by_step: dict[int, float]):
    assert sorted(recorder.zeros) == sorted(expected_by_step)
    for step, expected in expected_by_step.items():
        for name, zeros in recorder.zeros[step].items():
            assert zeros == pytest.approx(expected, abs=1e-6), f"step {step}, {name}"


def assert_mask_fixed_from(recorder, first_step: int):
    for step in range(first_step + 1, max(recorder.masks) + 1):
        for name, mask in recorder.masks[step].items():
            assert torch.equal(mask, recorder.masks[first_step][name]), f"mask of {name} moved at step {step}"


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_every_schedule_group_builds_for_block_sparsity(schedule, tmp_path):
    cfg = compose_cfg([BLOCK, f"prune_schedule={schedule}"], tmp_path)
    built = app.build_schedule(cfg.prune_schedule, cfg.sparsity, steps=1407)
    assert built.target == cfg.sparsity.sparsity


@pytest.mark.parametrize("schedule, steps, message", [
    ("finetune", 468, r"sparsity starts at step 700 but the run ends after 468 steps, so it trains dense"),
    ("gradual", 500, r"reaches 0.8 only at step 700 but the run ends after 500 steps"),
])
def test_a_run_too_short_for_its_schedule_warns(schedule, steps, message, tmp_path, caplog):
    cfg = compose_cfg([BLOCK, f"prune_schedule={schedule}", MAGNITUDE], tmp_path)
    app.build_schedule(cfg.prune_schedule, cfg.sparsity, steps=steps)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and re.search(message, warnings[0]), caplog.text
    caplog.clear()
    app.build_schedule(cfg.prune_schedule, cfg.sparsity, steps=1407)
    assert "prune_schedule:" not in caplog.text


def test_one_shot_is_dense_until_its_step_then_fixed_2to4(recorder, tmp_path):
    run(SEMI24, "one_shot", 5, tmp_path, "prune_schedule.prune_step=2")
    assert_zeros(recorder, {0: 0.0, 1: 0.0, 2: 0.5, 3: 0.5, 4: 0.5})
    assert_mask_fixed_from(recorder, 2)


def test_finetune_trains_dense_then_prunes_and_finetunes_with_a_fixed_mask(recorder, tmp_path):
    run(BLOCK, "finetune", 6, tmp_path, MAGNITUDE, "prune_schedule.dense_warmup_steps=3")
    assert_zeros(recorder, {0: 0.0, 1: 0.0, 2: 0.0, 3: block_zeros(TARGET), 4: block_zeros(TARGET),
                            5: block_zeros(TARGET)})
    assert_mask_fixed_from(recorder, 3)


def test_finetune_of_a_trained_dense_checkpoint_prunes_its_weights_at_step_0(recorder, tmp_path):
    # NVIDIA's ASP recipe (the accuracy table's semi24_prune_trained): a finished dense run's weights, pruned
    # once before the first step, then fine-tuned with the mask fixed.
    app.train(compose_cfg([SEMI24, *SMALL, "sparsity=dense", "trainer.max_steps=2"], tmp_path / "dense"))
    checkpoint = tmp_path / "dense" / "checkpoints" / "last.ckpt"
    dense_weights = torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]
    run(SEMI24, "finetune", 3, tmp_path / "asp", "prune_schedule.finetune_steps=3", f"model.pretrained_path={checkpoint}")
    assert_zeros(recorder, {0: 0.5, 1: 0.5, 2: 0.5})
    assert_mask_fixed_from(recorder, 0)
    for name, mask in recorder.masks[0].items():
        assert torch.equal(mask, mask_24_transposable(dense_weights[f"model.{name}.weight"].abs())), name


def test_constant_warms_up_dense_refreshes_every_k_steps_and_freezes(recorder, tmp_path):
    run(SEMI24, "constant", 9, tmp_path, "prune_schedule.dense_warmup_steps=2", "prune_schedule.update_every=2",
        "prune_schedule.freeze_mask_after=4")
    assert_zeros(recorder, {step: 0.0 if step < 2 else 0.5 for step in range(9)})
    for name in recorder.masks[2]:
        assert torch.equal(recorder.masks[3][name], recorder.masks[2][name]), f"{name} refreshed between updates"
    assert_mask_fixed_from(recorder, 4)  # the update at step 4 is the last one


@pytest.mark.parametrize("length", ["prune_schedule.finetune_steps=2", "prune_schedule.finetune_epochs=0.25"])
def test_finetune_length_sets_the_prune_step_from_the_end(recorder, tmp_path, length):
    # TINY: 32 images in batches of 4, so an epoch is 8 steps and a quarter epoch 2
    run(BLOCK, "finetune", 6, tmp_path, MAGNITUDE, length)
    assert_zeros(recorder, {step: 0.0 if step < 4 else block_zeros(TARGET) for step in range(6)})
    assert_mask_fixed_from(recorder, 4)


@pytest.mark.parametrize("overrides, message", [
    (["prune_schedule.finetune_steps=2", "prune_schedule.finetune_epochs=1"], "not both"),
    (["prune_schedule.finetune_steps=50"], "does not fit"),
    (["prune_schedule.finetune_steps=0"], "at least one step"),
])
def test_impossible_finetune_lengths_are_refused(overrides, message, tmp_path):
    cfg = compose_cfg([BLOCK, *SMALL, "prune_schedule=finetune", MAGNITUDE, "trainer.max_steps=6", *overrides],
                      tmp_path)
    with pytest.raises(app.ConfigError, match=message):
        app.build_schedule(cfg.prune_schedule, cfg.sparsity, steps=6, steps_per_epoch=8)


def test_gradual_block_sparsity_follows_the_cubic_ramp(recorder, tmp_path):
    end, every = 4, 2
    run(BLOCK, "gradual", 7, tmp_path, f"prune_schedule.end_step={end}", f"prune_schedule.update_every={every}")

    def cubic(step):  # Zhu & Gupta from 0 at step 0 to TARGET at `end`, read at the last mask update
        updated_at = min(step - step % every, end)
        return TARGET * (1 - (1 - updated_at / end) ** 3)

    assert_zeros(recorder, {step: block_zeros(cubic(step)) for step in range(7)})
    assert 0 < recorder.zeros[2]["blocks.0.mlp.fc1"] < block_zeros(TARGET)


def test_iterative_prunes_a_step_further_each_cycle(recorder, tmp_path):
    run(BLOCK, "iterative", 6, tmp_path, MAGNITUDE, "prune_schedule.cycles=2", "prune_schedule.cycle_steps=2")
    half, full = block_zeros(TARGET / 2), block_zeros(TARGET)
    assert_zeros(recorder, {0: half, 1: half, 2: full, 3: full, 4: full, 5: full})


def test_dense_final_runs_the_last_30_percent_dense(recorder, tmp_path):
    run(SEMI24, "dense_final", 10, tmp_path)
    assert_zeros(recorder, {step: 0.5 if step < 7 else 0.0 for step in range(10)})


def test_dress_scores_and_masks_survive_checkpoint_and_resume(recorder, tmp_path):
    multi = ["sparsity=dress_multi", "sparsity.subnet_levels=[0.8,0.6,0.4]"]
    run(BLOCK, "constant", 3, tmp_path, *multi)
    before_stop = recorder.state_at_end
    assert any(key.endswith("block_scores") for key in before_stop)
    run(BLOCK, "constant", 4, tmp_path, *multi, "resume=auto")
    assert before_stop.keys() == recorder.state_at_start.keys()
    for key, value in before_stop.items():
        assert torch.equal(recorder.state_at_start[key], value), key
    scores = next(key for key in before_stop if key.endswith("block_scores"))
    assert not torch.equal(recorder.state_at_end[scores], before_stop[scores]), "scores kept training after resume"
