import dataclasses
import importlib.util

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from sparsetrain.sparse.block import block_mask_from_scores, block_norms, expand_block_mask, set_block_level
from sparsetrain.sparse.config import Act24Config, BlockConfig, Semi24Config
from sparsetrain.sparse.layers import (Act24Layer, BlockLayer, Semi24Layer, SparseConv1x1, SparseLinear,
                                      register_layer)
from sparsetrain.sparse.masks import is_24, is_transposable_24, mask_24, mask_24_transposable
from sparsetrain.sparse.schedules import Phase, PruneSchedule

TIGHT = dict(rtol=1e-5, atol=1e-5)


def seeded_linear(n_in=32, n_out=16, bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(n_in, n_out, bias=bias)


def test_from_dense_shares_parameters_and_keeps_names():
    dense = seeded_linear()
    sparse = SparseLinear.from_dense(dense, Semi24Config(), "fc")
    assert sparse.weight is dense.weight and sparse.bias is dense.bias
    assert [n for n, _ in sparse.named_parameters()] == ["weight", "bias"]
    assert set(sparse.state_dict()) == {"weight", "bias", "mask", "sparse_active", "mask_step", "mask_frozen"}
    with pytest.raises(TypeError, match="from_dense"):
        SparseLinear(4, 4)
    with pytest.raises(ValueError, match="not a multiple of 4.*leave it dense"):
        SparseLinear.from_dense(nn.Linear(10, 8), Semi24Config(), "odd")


@pytest.mark.parametrize("config, pattern_class", [(Semi24Config(), Semi24Layer), (Act24Config(), Act24Layer),
                                                    (BlockConfig(block_size=8), BlockLayer)])
def test_from_dense_builds_the_class_registered_for_the_config_type(config, pattern_class):
    linear = SparseLinear.from_dense(nn.Linear(32, 16), config, "fc")
    conv = SparseConv1x1.from_dense(nn.Conv2d(32, 16, 1), config, "conv")
    assert isinstance(linear, pattern_class) and isinstance(linear, nn.Linear)
    assert isinstance(conv, pattern_class) and isinstance(conv, nn.Conv2d)
    with pytest.raises(TypeError, match="build it with"):
        type(conv).from_dense(nn.Linear(32, 16), config, "fc")


def test_a_config_type_of_ones_own_gets_the_layer_registered_for_it():
    @dataclasses.dataclass
    class RowWise24Config(Semi24Config):
        transposable: bool = False

    with pytest.raises(TypeError, match="register_layer"):
        SparseLinear.from_dense(nn.Linear(32, 16), RowWise24Config(), "fc")

    @register_layer(RowWise24Config)
    class RowWise24Linear(Semi24Layer, SparseLinear):
        pass

    layer = SparseLinear.from_dense(nn.Linear(32, 16), RowWise24Config(), "fc")
    assert type(layer) is RowWise24Linear and is_24(layer.mask) and not is_transposable_24(layer.mask)


@pytest.mark.parametrize("transposable", [True, False])
def test_semi24_forward_equals_masked_dense(transposable):
    dense = seeded_linear()
    sparse = SparseLinear.from_dense(dense, Semi24Config(transposable=transposable), "fc").eval()
    assert is_transposable_24(sparse.mask) if transposable else is_24(sparse.mask)
    x = torch.randn(3, 5, 32)
    reference = F.linear(x, dense.weight * sparse.mask, dense.bias)
    torch.testing.assert_close(sparse(x), reference, **TIGHT)


def test_inactive_layer_is_exactly_nn_linear():
    dense = seeded_linear()
    x = torch.randn(4, 32)
    expected = dense(x)
    sparse = SparseLinear.from_dense(dense, Semi24Config(), "fc")
    sparse.set_active(False)
    assert torch.equal(sparse(x), expected)


def test_autocast_bf16_trains_the_fp32_master_weight():
    dense = seeded_linear()
    sparse = SparseLinear.from_dense(dense, Semi24Config(grad_mode="ste"), "fc").train()
    x = torch.randn(6, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = sparse(x)
    assert y.dtype == torch.bfloat16
    assert sparse.backend_name == "emulated"
    # The training forward took its mask from the bf16 copy of the weight.
    assert torch.equal(sparse.mask, mask_24_transposable(dense.weight.detach().bfloat16().abs()))
    gy = torch.randn_like(y)
    y.backward(gy)
    assert dense.weight.grad.dtype == torch.float32
    expected = gy.t().float() @ x.bfloat16().float()  # STE: the dense gradient, pruned entries included
    torch.testing.assert_close(dense.weight.grad, expected, rtol=2e-2, atol=2e-2)
    assert (dense.weight.grad[~sparse.mask] != 0).all()


def test_masked_grad_mode_zeroes_pruned_gradients():
    dense = seeded_linear()
    sparse = SparseLinear.from_dense(dense, Semi24Config(grad_mode="masked"), "fc")
    sparse(torch.randn(6, 32)).sum().backward()
    assert (dense.weight.grad[~sparse.mask] == 0).all()
    assert (dense.weight.grad[sparse.mask] != 0).all()


def test_training_forward_refreshes_the_mask_unless_frozen_or_eval():
    sparse = SparseLinear.from_dense(seeded_linear(), Semi24Config(), "fc")
    old = sparse.mask.clone()
    with torch.no_grad():
        sparse.weight.copy_(torch.randn_like(sparse.weight))
    sparse.eval()(torch.randn(2, 32))
    assert torch.equal(sparse.mask, old)  # eval uses the stored mask
    sparse.train()
    sparse.set_mask_frozen(True)
    sparse(torch.randn(2, 32))
    assert torch.equal(sparse.mask, old)
    sparse.set_mask_frozen(False)
    sparse(torch.randn(2, 32))
    assert not torch.equal(sparse.mask, old)
    expected_rate = (sparse.mask ^ old).float().mean().item()
    assert sparse.pop_flip_rate() == pytest.approx(expected_rate)
    assert sparse.pop_flip_rate() == 0.0


def test_eval_forwards_reuse_the_prepared_weight_until_weight_or_mask_change(monkeypatch):
    """Static 2:4 weights at inference: the backend prepares (compresses) W_s at the first eval forward only,
    again after an in-place update of the weight or of the mask, and at every training forward."""
    sparse = SparseLinear.from_dense(seeded_linear(), Semi24Config(), "fc").eval()
    backend = sparse._backend(sparse.weight.device, sparse.weight.dtype)
    calls = []
    original = backend.prepare_weight
    monkeypatch.setattr(backend, "prepare_weight", lambda *a, **k: calls.append(1) or original(*a, **k))
    x = torch.randn(3, 32)

    def reference():
        return F.linear(x, sparse.weight * sparse.mask, sparse.bias)

    with torch.no_grad():
        for _ in range(3):
            torch.testing.assert_close(sparse(x), reference(), **TIGHT)
        assert len(calls) == 1
        sparse.weight.mul_(2)
        torch.testing.assert_close(sparse(x), reference(), **TIGHT)
        assert len(calls) == 2
        sparse.mask.copy_(mask_24(torch.randn(16, 32)))
        torch.testing.assert_close(sparse(x), reference(), **TIGHT)
        assert len(calls) == 3
    sparse(x.requires_grad_(True)).sum().backward()  # a gradient wants the input-grad operand too
    assert len(calls) == 4 and x.grad is not None
    sparse.train()
    assert sparse._inference_operands is None
    sparse.set_mask_frozen(True)
    sparse(x)
    sparse(x)
    assert len(calls) == 6


def test_update_mask_returns_flip_rate_and_records_step():
    sparse = SparseLinear.from_dense(seeded_linear(), Semi24Config(), "fc")
    assert sparse.update_mask(step=3) == 0.0
    with torch.no_grad():
        sparse.weight.neg_().add_(torch.randn_like(sparse.weight))
    old = sparse.mask.clone()
    rate = sparse.update_mask(step=7)
    assert rate == pytest.approx((sparse.mask ^ old).float().mean().item()) and rate > 0
    assert sparse.mask_step.item() == 7
    with pytest.raises(ValueError, match="always 0.5"):
        sparse.update_mask(level=0.7)


def test_apply_phase_follows_the_schedule():
    sparse = SparseLinear.from_dense(seeded_linear(), Semi24Config(), "fc")
    schedule = PruneSchedule(kind="one_shot", pattern="semi24", prune_step=2)
    sparse.apply_phase(schedule.phase(0), 0)
    assert not sparse.sparse_active.item()
    sparse.apply_phase(schedule.phase(2), 2)
    assert sparse.sparse_active.item() and not sparse.mask_frozen.item() and sparse.mask_step.item() == 2
    sparse.apply_phase(schedule.phase(3), 3)
    assert sparse.mask_frozen.item() and sparse.mask_step.item() == 2


@pytest.mark.parametrize("config, kind", [
    (Semi24Config(), "constant"),  # dynamic mask: recomputed from the weights the optimizer just moved
    (Semi24Config(), "one_shot"),  # frozen mask: the one the sparse phase used
    (BlockConfig(block_size=4, sparsity=0.5, criterion="magnitude"), "constant"),
    (BlockConfig(block_size=4, sparsity=0.5, criterion="scores"), "constant"),
])
def test_dense_final_starts_from_the_sparse_network(config, kind):
    """At the switch to the final dense phase the pruned weights become zero (DSD), so the dense
    network computes what the sparse one did; with dense_final_pruned="keep" they come back as they are."""
    x = torch.randn(6, 32)
    for pruned in ("zero", "keep"):
        sparse = SparseLinear.from_dense(seeded_linear(), config, "fc")
        schedule = PruneSchedule(kind=kind, pattern=config.pattern, target=getattr(config, "sparsity", None),
                                 dense_final_fraction=0.5, total_steps=4, dense_final_pruned=pruned)
        sparse.apply_phase(schedule.phase(0), 0)
        sparse(x).sum().backward()
        with torch.no_grad():
            sparse.weight.add_(torch.randn_like(sparse.weight))  # an optimizer step after the forward
        sparse.apply_phase(schedule.phase(1), 1)
        kept = sparse.weight.detach().clone()
        sparse_out = sparse(x).detach()
        sparse.apply_phase(schedule.phase(2), 2)
        assert not sparse.sparse_active.item()
        if pruned == "zero":
            torch.testing.assert_close(sparse(x), sparse_out, **TIGHT)
            assert torch.equal(sparse.weight != 0, sparse.mask)
        else:
            assert torch.equal(sparse.weight, kept)


def test_dense_final_pruned_must_be_known():
    with pytest.raises(ValueError, match=r"dense_final_pruned='drop'.*\['zero', 'keep'\]"):
        PruneSchedule(kind="constant", dense_final_fraction=0.3, total_steps=10, dense_final_pruned="drop")


@pytest.mark.parametrize("grad_mode", ["ste", "masked"])
def test_masked_magnitude_blocks_never_come_back_as_the_level_rises(grad_mode):
    """Under masked gradients a pruned block is frozen at its old value: a rising level prunes kept
    blocks only (Zhu & Gupta), however large the frozen one is; under ste it competes on its norm."""
    sparse = SparseLinear.from_dense(seeded_linear(), BlockConfig(4, 0.25, grad_mode=grad_mode), "fc")
    before = sparse.mask.clone()
    row, col = (~before).nonzero()[0].tolist()
    block = (slice(row - row % 4, row - row % 4 + 4), slice(col - col % 4, col - col % 4 + 4))
    with torch.no_grad():
        sparse.weight[block] = 100.0  # a pruned block, now the largest of all
    sparse.update_mask(level=0.5)
    came_back = bool(sparse.mask[block].all())
    assert came_back == (grad_mode == "ste")
    if grad_mode == "masked":
        assert not (sparse.mask & ~before).any(), "the mask only shrinks while the level rises"
        sparse.update_mask(level=0.25)  # a falling level restores the largest pruned blocks first
        assert sparse.mask[block].all()


def test_masked_magnitude_prunes_by_the_trained_weights_after_a_dense_warmup():
    """The mask made at sparsify time (from the untrained weights) must not rank first after a dense
    phase in which every block trained."""
    sparse = SparseLinear.from_dense(seeded_linear(), BlockConfig(4, 0.5, grad_mode="masked"), "fc")
    schedule = PruneSchedule(kind="one_shot", pattern="block", target=0.5, prune_step=2)
    sparse.apply_phase(schedule.phase(0), 0)
    with torch.no_grad():
        sparse.weight.copy_(torch.randn_like(sparse.weight) * (~sparse.mask))  # warm-up grew the pruned blocks
    sparse.apply_phase(schedule.phase(2), 2)
    expected = expand_block_mask(block_mask_from_scores(block_norms(sparse.weight, 4), 0.5), 4)
    assert torch.equal(sparse.mask, expected)


class RecordOps(TorchDispatchMode):
    """The aten ops a block of code issues (each one a kernel launch on a GPU)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def test_a_steady_phase_issues_at_most_the_mask_step_fill():
    sparse = SparseLinear.from_dense(seeded_linear(), Semi24Config(), "fc")
    schedule = PruneSchedule(kind="one_shot", pattern="semi24", prune_step=2)
    every_step = PruneSchedule(kind="constant", pattern="semi24")
    sparse.apply_phase(schedule.phase(3), 3)  # frozen from here on
    with RecordOps() as frozen:
        sparse.apply_phase(schedule.phase(4), 4)
    sparse.apply_phase(every_step.phase(5), 5)
    with RecordOps() as updating:
        sparse.apply_phase(every_step.phase(6), 6)
    assert frozen.ops == [] and updating.ops == ["fill_"]
    assert not sparse.mask_frozen.item() and sparse.mask_step.item() == 6
    state = sparse.state_dict()
    state["sparse_active"].fill_(False)
    sparse.load_state_dict(state)  # the Python flags follow the loaded buffers
    sparse.apply_phase(every_step.phase(7), 7)
    assert sparse.sparse_active.item()


def test_conv1x1_equals_conv2d_with_masked_weight_in_both_layouts():
    torch.manual_seed(0)
    dense = nn.Conv2d(16, 8, kernel_size=1, bias=True)
    sparse = SparseConv1x1.from_dense(dense, Semi24Config(), "conv").eval()
    assert sparse.mask.shape == (8, 16)
    x = torch.randn(2, 16, 5, 3)
    reference = F.conv2d(x, dense.weight * sparse.mask[:, :, None, None], dense.bias)
    torch.testing.assert_close(sparse(x), reference, **TIGHT)
    y_cl = sparse(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(y_cl, reference, **TIGHT)
    assert y_cl.is_contiguous(memory_format=torch.channels_last)
    sparse.set_active(False)
    assert torch.equal(sparse(x), dense(x))


def test_conv1x1_rejects_strided_convs():
    with pytest.raises(ValueError, match="stride"):
        SparseConv1x1.from_dense(nn.Conv2d(16, 8, 1, stride=2), Semi24Config(), "down")


def test_srste_adds_decay_on_pruned_weights():
    lam = 0.1
    dense = seeded_linear()
    sparse = SparseLinear.from_dense(dense, Semi24Config(grad_mode="srste", srste_lambda=lam), "fc")
    x = torch.randn(4, 32)
    sparse(x).sum().backward()
    dense_grad = torch.ones(4, 16).t() @ x
    expected = dense_grad + lam * dense.weight.detach() * ~sparse.mask
    torch.testing.assert_close(dense.weight.grad, expected, **TIGHT)


def test_block_magnitude_forward_and_measured_sparsity():
    dense = seeded_linear(32, 16)
    sparse = SparseLinear.from_dense(dense, BlockConfig(block_size=8, sparsity=0.75), "fc").eval()
    kept_blocks = block_mask_from_scores(block_norms(dense.weight, 8), 0.75)
    assert kept_blocks.sum() == 2  # round(0.25 * 8)
    assert torch.equal(sparse.mask, expand_block_mask(kept_blocks, 8))
    x = torch.randn(3, 32)
    torch.testing.assert_close(sparse(x), F.linear(x, dense.weight * sparse.mask, dense.bias), **TIGHT)
    row = sparse.describe()
    assert row["measured_sparsity"] == pytest.approx(0.75) and row["level"] == 0.75
    assert row["pattern"] == "block" and row["kind"] == "linear" and row["shape"] == (16, 32)


@pytest.mark.parametrize("grad_mode", ["ste", "masked"])
def test_block_scores_train_with_the_weights(grad_mode):
    dense = seeded_linear(32, 16)
    sparse = SparseLinear.from_dense(dense, BlockConfig(block_size=8, sparsity=0.5, criterion="scores",
                                                        grad_mode=grad_mode), "fc")
    assert isinstance(sparse.block_scores, nn.Parameter)
    assert torch.equal(sparse.block_scores.detach(), block_norms(dense.weight, 8))
    assert "block_scores" in dict(sparse.named_parameters())
    x = torch.randn(5, 32)
    y = sparse(x)
    torch.testing.assert_close(y, F.linear(x, dense.weight * sparse.mask, dense.bias), **TIGHT)
    y.sum().backward()
    upstream = torch.ones(5, 16).t() @ x
    expected_scores = (upstream * dense.weight.detach()).reshape(2, 8, 4, 8).sum(dim=(1, 3))
    torch.testing.assert_close(sparse.block_scores.grad, expected_scores, **TIGHT)
    pruned = ~sparse.mask
    assert (dense.weight.grad[pruned] == 0).all() == (grad_mode == "masked")


INDEX_TENSORS = ("row_counts", "row_blocks", "col_counts", "col_blocks")


def _kernel_index(layer: SparseLinear):
    """The BlockIndex the layer's kernels would read now (block_kernel_operands: weight, bias, mask, index)."""
    return layer.block_kernel_operands(torch.float32)[3]


def _assert_index_of_mask(index, layer: SparseLinear) -> None:
    from sparsetrain.gpu.kernels.bsr_matmul import index_from_block_mask
    b = layer.sparse_config.block_size
    expected = index_from_block_mask(layer.mask[::b, ::b].contiguous(), b)
    for name in INDEX_TENSORS:
        assert torch.equal(getattr(index, name), getattr(expected, name)), name


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="the kernels' index needs triton")
def test_block_index_follows_a_schedule_update_in_place():
    """A CUDA graph captured earlier reads the index tensors it saw: an update must rewrite those, not new ones."""
    layer = SparseLinear.from_dense(seeded_linear(64, 64), BlockConfig(block_size=16, sparsity=0.5), "fc")
    index = _kernel_index(layer)
    storages = [getattr(index, name).data_ptr() for name in INDEX_TENSORS]
    with torch.no_grad():
        layer.weight.mul_(torch.rand_like(layer.weight))
    assert layer.update_mask() > 0
    before = index.row_blocks.clone()
    layer.sync_block_index()
    _assert_index_of_mask(index, layer)
    assert not torch.equal(index.row_blocks, before)
    assert [getattr(_kernel_index(layer), name).data_ptr() for name in INDEX_TENSORS] == storages


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="the kernels' index needs triton")
def test_block_index_is_rebuilt_after_learned_scores_wrote_the_mask_unseen():
    """A replayed forward whose scores pick the blocks writes the mask without moving its version counter."""
    layer = SparseLinear.from_dense(seeded_linear(64, 64), BlockConfig(block_size=16, sparsity=0.5,
                                                                       criterion="scores"), "fc")
    layer.set_mask_frozen(True)
    index = _kernel_index(layer)
    layer.set_mask_frozen(False)
    layer.sync_block_index()  # before the replay that lets the scores pick
    with torch.no_grad():  # what that replay does to the mask: .data shares no version counter
        layer.mask.data.copy_(~layer.mask)
    layer.set_mask_frozen(True)
    layer.sync_block_index()
    _assert_index_of_mask(index, layer)
    assert _kernel_index(layer).row_blocks.data_ptr() == index.row_blocks.data_ptr()


def test_set_block_level_switches_masks_of_every_block_layer():
    model = nn.Sequential(
        SparseLinear.from_dense(seeded_linear(32, 16), BlockConfig(block_size=8, sparsity=0.5), "0"),
        SparseLinear.from_dense(seeded_linear(16, 32, seed=1), BlockConfig(block_size=8, sparsity=0.5,
                                                                            criterion="scores"), "1"),
    )
    set_block_level(model, 0.75)
    assert all(layer.level == 0.75 for layer in model)
    assert all(layer.mask.float().mean().item() == pytest.approx(0.25) for layer in model)
    set_block_level(model, 0.0)
    assert all(layer.mask.all() for layer in model)


def test_block_level_survives_a_checkpoint():
    config = BlockConfig(block_size=8, sparsity=0.5, criterion="scores")
    source = SparseLinear.from_dense(seeded_linear(32, 16), config, "fc")
    source.set_level(0.75)
    target = SparseLinear.from_dense(seeded_linear(32, 16, seed=5), config, "fc")
    target.load_state_dict(source.state_dict())
    assert target.level == pytest.approx(0.75)
    torch.testing.assert_close(target.effective_weight(), source.effective_weight(), rtol=0, atol=0)


def test_dense_checkpoint_loads_strictly_and_masks_follow_its_weights():
    dense = seeded_linear(32, 16, seed=3)
    sparse = SparseLinear.from_dense(seeded_linear(32, 16, seed=4), BlockConfig(block_size=8, sparsity=0.5,
                                                                                 criterion="scores"), "fc")
    sparse.load_state_dict(dense.state_dict())
    assert torch.equal(sparse.weight, dense.weight)
    assert torch.equal(sparse.block_scores.detach(), block_norms(dense.weight, 8))
    expected = expand_block_mask(block_mask_from_scores(block_norms(dense.weight, 8), 0.5), 8)
    assert torch.equal(sparse.mask, expected)


def test_act24_prunes_the_inputs_and_leaves_the_weight_dense():
    dense = seeded_linear(32, 16)
    sparse = SparseLinear.from_dense(dense, Act24Config(), "mlp.fc2")
    assert sparse.mask.all() and sparse.describe()["measured_sparsity"] == 0.0
    x = torch.randn(4, 32, requires_grad=True)
    y = sparse(x)
    x_pruned = x.detach() * mask_24(x.detach().abs())
    torch.testing.assert_close(y, F.linear(x_pruned, dense.weight, dense.bias), **TIGHT)
    y.sum().backward()
    assert (x.grad[~mask_24(x.detach().abs())] == 0).all()


def test_cusparselt_request_is_deferred_to_the_first_forward():
    sparse = SparseLinear.from_dense(seeded_linear(64, 64), Semi24Config(backend="cusparselt"), "fc")
    assert sparse.describe()["backend"] == "cusparselt"
    with pytest.raises(ValueError, match="cusparselt cannot run"):
        sparse(torch.randn(2, 64))


@pytest.mark.gpu
def test_cuda_bf16_autocast_picks_cusparselt_and_matches_masked_dense():
    torch.manual_seed(0)
    dense = nn.Linear(256, 128).cuda()
    # narrow: `auto` would leave it masked dense, so ask for cuSPARSELt explicitly
    sparse = SparseLinear.from_dense(dense, Semi24Config(backend="cusparselt"), "fc").train()
    x = torch.randn(3, 40, 256, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = sparse(x)
    assert sparse.backend_name == "cusparselt" and y.dtype == torch.bfloat16
    w_masked = dense.weight.detach().bfloat16() * sparse.mask
    reference = F.linear(x.detach().bfloat16(), w_masked, dense.bias.detach().bfloat16())
    torch.testing.assert_close(y, reference, rtol=2e-2, atol=2e-2)
    gy = torch.randn_like(y)
    y.backward(gy)
    torch.testing.assert_close(x.grad, (gy @ w_masked).float(), rtol=2e-2, atol=2e-2)
    expected_w_grad = gy.reshape(-1, 128).t().float() @ x.detach().bfloat16().float().reshape(-1, 256)
    torch.testing.assert_close(dense.weight.grad, expected_w_grad, rtol=2e-2, atol=5e-1)


@pytest.mark.gpu
def test_cuda_conv1x1_channels_last_matches_conv2d():
    torch.manual_seed(0)
    dense = nn.Conv2d(128, 64, kernel_size=1).cuda()
    sparse = SparseConv1x1.from_dense(dense, Semi24Config(backend="cusparselt"), "conv").eval()
    x = torch.randn(4, 128, 7, 7, device="cuda").to(memory_format=torch.channels_last)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = sparse(x)
        reference = F.conv2d(x, dense.weight * sparse.mask[:, :, None, None], dense.bias)
    assert sparse.backend_name == "cusparselt"
    torch.testing.assert_close(y, reference, rtol=2e-2, atol=2e-2)


def test_block_scores_are_reseeded_from_the_weights_when_a_dense_phase_ends():
    torch.manual_seed(0)
    layer = SparseLinear.from_dense(nn.Linear(32, 32), BlockConfig(block_size=16, sparsity=0.5, criterion="scores"))
    layer.apply_phase(Phase("dense_warmup", active=False, level=0.0, update_mask=False), step=0)
    with torch.no_grad():
        layer.weight.mul_(torch.rand_like(layer.weight) * 3)  # what the dense phase learned
    stale = layer.block_scores.detach().clone()
    layer.apply_phase(Phase("pruning", active=True, level=0.5, update_mask=True), step=5)
    assert not torch.equal(layer.block_scores, stale)
    assert torch.allclose(layer.block_scores, block_norms(layer.weight.detach(), 16))


def test_uniform_score_init_draws_superblocks_scores_from_the_seed():
    def scores_of(seed):
        torch.manual_seed(seed)
        config = BlockConfig(block_size=8, sparsity=0.5, criterion="scores", score_init="uniform")
        return SparseLinear.from_dense(nn.Linear(32, 32), config, "fc")

    layer = scores_of(0)
    scores = layer.block_scores.detach().clone()
    assert ((scores >= 0) & (scores < 1)).all()
    assert not torch.allclose(scores, block_norms(layer.weight.detach(), 8))
    assert torch.equal(scores, scores_of(0).block_scores.detach())
    assert not torch.equal(scores, scores_of(1).block_scores.detach())
    assert torch.equal(layer.mask, expand_block_mask(block_mask_from_scores(scores, 0.5), 8))
    # A dense phase ending re-draws them, as a dense checkpoint loaded into the layer does.
    layer.apply_phase(Phase("dense_warmup", active=False, level=0.0, update_mask=False), step=0)
    layer.apply_phase(Phase("pruning", active=True, level=0.5, update_mask=True), step=5)
    redrawn = layer.block_scores.detach().clone()
    assert not torch.equal(redrawn, scores) and ((redrawn >= 0) & (redrawn < 1)).all()
    layer.load_state_dict(nn.Linear(32, 32).state_dict())
    assert not torch.equal(layer.block_scores.detach(), redrawn)


def test_score_init_is_checked_and_needs_learned_scores():
    with pytest.raises(ValueError, match="score_init='gaussian' is not supported"):
        BlockConfig(criterion="scores", score_init="gaussian")
    with pytest.raises(ValueError, match="criterion='scores'"):
        BlockConfig(criterion="magnitude", score_init="uniform")


@pytest.mark.parametrize("config", [Semi24Config(), BlockConfig(block_size=16, sparsity=0.5, criterion="scores")])
def test_the_backend_can_be_picked_before_the_first_forward(config):
    """torch.compile (the `compile:` option) picks every layer's route before tracing, block layers too."""
    layer = SparseLinear.from_dense(nn.Linear(32, 64), config, "fc")
    layer.resolve_backend_for("cpu", torch.float32)
    assert layer.backend_name == "emulated" and layer.backend_reason
