"""SparseClassifier details: optimizer parameter groups (decay, DRESS score lr), the learning-rate schedule and how
per-step scalars are logged."""
import functools

import pytest
import torch
from torch import nn

from sparsetrain.sparse import BlockConfig, sparsify_
from sparsetrain.training.lr import lr_multiplier
from sparsetrain.training.module import SparseClassifier, param_groups


def _dress_mlp() -> nn.Module:
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
    sparsify_(model, BlockConfig(block_size=16, sparsity=0.5, criterion="scores"), include=["*"],
              exclude=[])
    return model


def _ids(group) -> set:
    return {id(p) for p in group["params"]}


def test_scores_get_their_own_group_with_a_scaled_lr_and_no_decay():
    model = _dress_mlp()
    factory = functools.partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.05)
    decay, no_decay, scores = param_groups(model, factory, score_lr_scale=0.1)
    assert _ids(decay) == {id(model[0].weight), id(model[2].weight)}
    assert _ids(no_decay) == {id(model[0].bias), id(model[2].bias)}
    assert _ids(scores) == {id(model[0].block_scores), id(model[2].block_scores)}
    assert scores["weight_decay"] == 0.0 and scores["lr"] == pytest.approx(1e-4)
    optimizer = factory([decay, no_decay, scores])
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([1e-3, 1e-3, 1e-4])


def test_scale_one_leaves_the_score_group_on_the_base_lr():
    groups = param_groups(_dress_mlp(), functools.partial(torch.optim.SGD, lr=0.1), score_lr_scale=1.0)
    assert "lr" not in groups[-1]


def test_a_scaled_score_lr_needs_an_explicit_base_lr():
    with pytest.raises(ValueError, match="optim.lr"):
        param_groups(_dress_mlp(), functools.partial(torch.optim.AdamW), score_lr_scale=0.5)


def test_the_classifier_refuses_a_non_positive_score_lr_scale():
    with pytest.raises(ValueError, match="score_lr_scale"):
        SparseClassifier(_dress_mlp(), num_classes=4, optimizer=torch.optim.AdamW, sched={}, score_lr_scale=0.0)


def test_logged_scalars_are_made_on_the_device_with_their_value():
    """Per-step floats are logged as device tensors (no blocking host-to-GPU copy each step)."""
    from sparsetrain.training.loggers import device_scalar
    scalar = device_scalar(0.25, torch.device("cpu"))
    assert scalar.ndim == 0 and scalar.device.type == "cpu" and scalar.item() == 0.25


def test_an_unknown_schedule_name_fails_at_step_0_even_inside_the_warm_up():
    # LambdaLR calls the multiplier once when it is built (step 0): a typo must fail there, not when warm-up ends.
    with pytest.raises(ValueError, match=r"unknown sched.name 'linear'.*\['cosine', 'constant'\]"):
        lr_multiplier(0, total_steps=100, name="linear", warmup_steps=10)
    assert lr_multiplier(0, total_steps=100, name="cosine", warmup_steps=10) == pytest.approx(0.1)


@pytest.mark.parametrize("bar", [False, True])
def test_training_values_reach_the_progress_bar_only_when_one_is_shown(bar, tmp_path):
    """Lightning converts progress-bar values to Python numbers after every batch (a host sync each step on a
    GPU): a run without a bar must not log any there."""
    import lightning.pytorch as L
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(16, 8), torch.randint(0, 3, (16,))), batch_size=4)
    module = SparseClassifier(nn.Linear(8, 3), num_classes=3,
                              optimizer=functools.partial(torch.optim.SGD, lr=0.1), sched={"name": "constant"})
    trainer = L.Trainer(max_steps=2, enable_progress_bar=bar, logger=False, enable_checkpointing=False,
                        enable_model_summary=False, default_root_dir=tmp_path, accelerator="cpu")
    trainer.fit(module, data)
    shown = {"train/loss", "train/acc"} & set(trainer.progress_bar_metrics)
    assert shown == ({"train/loss", "train/acc"} if bar else set())
