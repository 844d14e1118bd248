import pytest
import torch

from sparsetrain.sparse.block import (
    BlockScoreSTE,
    block_mask_from_scores,
    block_norms,
    expand_block_mask,
    flip_rate,
    kept_block_count,
)
from sparsetrain.sparse.config import Act24Config, BlockConfig, Semi24Config, config_from_dict


def test_block_norms_match_per_tile_norm():
    w = torch.randn(8, 12)
    norms = block_norms(w, 4)
    assert norms.shape == (2, 3)
    assert torch.allclose(norms[1, 2], w[4:8, 8:12].norm())


def test_block_norms_reject_non_divisible_dims_naming_them():
    with pytest.raises(ValueError, match=r"10x6 and block size 4"):
        block_norms(torch.randn(10, 6), 4)


def test_top_blocks_kept_with_round_and_at_least_one():
    scores = torch.tensor([[0.1, 0.9, 0.5], [0.7, 0.2, 0.3]])
    mask = block_mask_from_scores(scores, sparsity=0.5)
    assert mask.tolist() == [[False, True, True], [True, False, False]]
    assert block_mask_from_scores(scores, sparsity=0.99).sum() == 1
    assert kept_block_count(10, 0.9) == 1
    assert kept_block_count(10, 0.75) == 2  # round(2.5) goes to even
    assert kept_block_count(64, 0.9) == 6


def test_ties_go_to_the_lower_flat_index():
    mask = block_mask_from_scores(torch.ones(3, 4), sparsity=0.5)
    assert mask.flatten().tolist() == [True] * 6 + [False] * 6


def test_expand_block_mask_repeats_each_block_over_its_tile():
    block_mask = torch.tensor([[True, False], [False, True]])
    full = expand_block_mask(block_mask, 3)
    assert full.shape == (6, 6)
    assert full[:3, :3].all() and not full[:3, 3:].any() and full[3:, 3:].all()


def test_ste_trains_scores_and_weights_together():
    w = torch.randn(8, 8, requires_grad=True)
    scores = block_norms(w, 4).requires_grad_(True)
    mask = BlockScoreSTE.apply(scores, 0.5)
    assert mask.dtype == scores.dtype and mask.sum() == 2
    upstream = torch.randn(8, 8)
    (w * expand_block_mask(mask, 4) * upstream).sum().backward()
    # Straight-through: every score, kept or pruned, gets the sum of upstream * w over its block.
    expected = (upstream * w.detach()).reshape(2, 4, 2, 4).sum(dim=(1, 3))
    assert torch.allclose(scores.grad, expected)
    assert torch.equal(w.grad, upstream * expand_block_mask(mask.detach(), 4))


def test_flip_rate_counts_changed_entries():
    old = torch.tensor([True, True, False, False])
    new = torch.tensor([True, False, True, False])
    assert flip_rate(old, new) == 0.5
    with pytest.raises(ValueError, match="differ in shape"):
        flip_rate(old, new[:2])


def test_config_validation_names_the_fix():
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        BlockConfig(sparsity=1.0)
    with pytest.raises(ValueError, match="positive int"):
        BlockConfig(block_size=0)
    with pytest.raises(ValueError, match="use one of"):
        BlockConfig(grad_mode="srste")
    with pytest.raises(ValueError, match="grad_mode='srste'"):
        Semi24Config(srste_lambda=1e-4)
    with pytest.raises(ValueError, match="BlockConfig"):
        Semi24Config(criterion="scores")
    with pytest.raises(ValueError, match="use one of"):
        Act24Config(backend="cutlass")
    assert BlockConfig(block_size=48).block_size == 48


def test_config_from_dict_maps_patterns_and_rejects_unknown_keys():
    assert config_from_dict({"pattern": "dense"}) is None
    assert config_from_dict({"pattern": "semi24", "transposable": False}) == Semi24Config(transposable=False)
    assert config_from_dict({"pattern": "block", "sparsity": 0.5}) == BlockConfig(sparsity=0.5)
    assert config_from_dict({"pattern": "act24", "layer_globs": ["*fc2"]}).layer_globs == ("*fc2",)
    with pytest.raises(ValueError, match=r"allowed keys: \['pattern', 'block_size'"):
        config_from_dict({"pattern": "block", "blocksize": 32})
    with pytest.raises(ValueError, match="not known"):
        config_from_dict({"pattern": "2:4"})


def test_multi_subnet_loss_is_the_weighted_sum_of_each_levels_loss():
    """DRESS multi-subnet training: the step's loss is sum_i w_i * loss(level_i) on shared weights, and the
    model is left at the first (main) level."""
    from timm.layers import Mlp

    from sparsetrain.sparse import BlockConfig, sparse_modules, sparsify_
    from sparsetrain.sparse.block import set_block_level
    from sparsetrain.training.module import SparseClassifier
    torch.manual_seed(0)
    net = torch.nn.Sequential(Mlp(64, 128, out_features=10))
    sparsify_(net, BlockConfig(block_size=16, sparsity=0.75, criterion="scores"), skip_dense_by_default=False)
    levels, weights = [0.75, 0.5, 0.25], [1.0, 0.5, 2.0]
    module = SparseClassifier(net, num_classes=10, optimizer=torch.optim.SGD, sched={}, subnet_levels=levels,
                              subnet_weights=weights)
    module.log = lambda *args, **kwargs: None  # no trainer here
    x, y = torch.randn(6, 64), torch.randint(0, 10, (6,))
    total, _ = module._multi_subnet_loss(x, y)
    expected = 0.0
    for level, weight in zip(levels, weights):
        set_block_level(net, level)
        expected = expected + weight * torch.nn.functional.cross_entropy(net(x), y)
    set_block_level(net, levels[0])
    torch.testing.assert_close(total, expected)
    assert all(layer.level == 0.75 for _, layer in sparse_modules(net))


@pytest.mark.parametrize("criterion", ["magnitude", "scores"])
def test_a_final_mask_gives_pruned_blocks_no_gradient_whatever_the_grad_mode(criterion):
    """grad_mode=ste trains pruned blocks while the mask may still change; once the schedule says it never will,
    they get no gradient (what the block-sparse weight gradient computes), and the graph key says so."""
    from torch import nn

    from sparsetrain.sparse.layers import SparseLinear
    from sparsetrain.sparse.schedules import PruneSchedule
    from sparsetrain.training.cuda_graphs import graph_key

    torch.manual_seed(0)
    layer = SparseLinear.from_dense(nn.Linear(64, 32), BlockConfig(block_size=16, sparsity=0.5, criterion=criterion),
                                    "fc")
    schedule = PruneSchedule(kind="gradual", pattern="block", target=0.5, end_step=4, freeze_mask_after=4)
    x = torch.randn(8, 64)

    def pruned_grad(step):
        layer.apply_phase(schedule.phase(step), step)
        layer.weight.grad = None
        layer(x).sum().backward()
        return layer.weight.grad[~layer.mask]

    assert pruned_grad(4).abs().sum() > 0 and layer.grad_mode == "ste"
    key_before = graph_key([layer], x)
    assert torch.equal(pruned_grad(5), torch.zeros_like(pruned_grad(5))) and layer.grad_mode == "masked"
    assert graph_key([layer], x) != key_before
