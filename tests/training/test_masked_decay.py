"""Masked decay: pruned weights shrink by masked_decay x lr after every optimizer step, kept ones do not."""
import pytest
import torch
from torch import nn

from sparsetrain.export import network_state, read_checkpoint
from sparsetrain.sparse.config import Act24Config, BlockConfig, Semi24Config
from sparsetrain.sparse.layers import SparseLinear
from sparsetrain.sparse.schedules import Phase
from sparsetrain.training.app import ConfigError, train
from tests.helpers import TINY, compose_cfg


@pytest.mark.parametrize("config", [Semi24Config(), BlockConfig(block_size=8, sparsity=0.5)])
def test_only_pruned_weights_shrink(config):
    layer = SparseLinear.from_dense(nn.Linear(32, 16), config, "fc")
    layer.apply_phase(Phase("sparse", True, 0.5, update_mask=True), step=0)
    layer.update_mask()
    before, keep = layer.weight.detach().clone(), layer.mask.clone()
    layer.decay_pruned_weights(0.25)
    assert torch.equal(layer.weight[keep], before[keep])
    torch.testing.assert_close(layer.weight[~keep], 0.75 * before[~keep])


def test_dense_phases_and_activation_sparse_layers_are_left_alone():
    inactive = SparseLinear.from_dense(nn.Linear(32, 16), Semi24Config(), "fc")
    inactive.set_active(False)
    act = SparseLinear.from_dense(nn.Linear(32, 16), Act24Config(layer_globs=("*",)), "fc")
    for layer in (inactive, act):
        before = layer.weight.detach().clone()
        layer.decay_pruned_weights(0.5)
        assert torch.equal(layer.weight, before)


def test_a_factor_of_one_or_more_is_refused():
    layer = SparseLinear.from_dense(nn.Linear(32, 16), Semi24Config(), "fc")
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        layer.decay_pruned_weights(1.0)


def _pruned_magnitude(run_dir) -> float:
    """Mean |w| of the pruned entries of the first MLP linear in the run's last checkpoint."""
    state = network_state(read_checkpoint(run_dir / "checkpoints" / "last.ckpt"))
    weight, mask = state["blocks.0.mlp.fc1.weight"], state["blocks.0.mlp.fc1.mask"]
    return weight[~mask.bool()].abs().mean().item()


def test_a_run_with_masked_decay_ends_with_smaller_pruned_weights(tmp_path):
    common = ["recipe=fmnist_vit_24", *TINY, "model.depth=1", "optim.lr=1e-3", "trainer.max_steps=4"]
    train(compose_cfg(common, tmp_path / "plain"))
    train(compose_cfg([*common, "sparsity.masked_decay=600"], tmp_path / "decayed"))
    # 0.6 x the cosine lr multiplier per step over 4 steps: the pruned weights keep well under half
    assert _pruned_magnitude(tmp_path / "decayed") < 0.5 * _pruned_magnitude(tmp_path / "plain")


@pytest.mark.parametrize("decay", ["-1", "1000"])
def test_impossible_masked_decay_stops_before_training(decay, tmp_path):
    with pytest.raises(ConfigError, match="masked_decay"):
        train(compose_cfg(["recipe=fmnist_vit_24", *TINY, "optim.lr=1e-3", f"sparsity.masked_decay={decay}"],
                          tmp_path))
