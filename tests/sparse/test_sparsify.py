import logging

import pytest
import timm
import torch
import torchvision
from torch import nn
from torchvision.models.resnet import Bottleneck, ResNet

from sparsetrain.sparse.config import Act24Config, BlockConfig, Semi24Config
from sparsetrain.sparse.layers import SparseConv1x1, SparseGemmLayer, SparseLinear
from sparsetrain.sparse.sparsify import densify_, layer_table, mask_checksum, sparse_modules, sparsify_

VIT_LINEARS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")


def tiny_vit(seed=0):
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, num_classes=10,
                             depth=2).eval()


def resnet18():
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None, num_classes=10).eval()


def small_bottleneck_resnet():
    """ResNet-50's layer types (bottlenecks with 1x1 convs, strided 1x1 downsamples) at a third of its size."""
    torch.manual_seed(0)
    return ResNet(Bottleneck, [1, 1, 1, 1], num_classes=10).eval()


def swapped(records):
    return {r["name"] for r in records if r["pattern"] != "dense"}


class OddShapes(nn.Module):
    def __init__(self):
        super().__init__()
        self.odd = nn.Linear(10, 6)
        self.even = nn.Linear(16, 8)

    def forward(self, x):
        return self.even(torch.cat([self.odd(x), x[:, :10]], dim=1))


def test_vit_swaps_exactly_attention_and_mlp_linears():
    model = tiny_vit()
    records = sparsify_(model, Semi24Config())
    expected = {f"blocks.{i}.{leaf}" for i in range(2) for leaf in VIT_LINEARS}
    assert swapped(records) == expected
    by_name = {r["name"]: r for r in records}
    assert by_name["head"]["reason"].startswith("dense: first/last layer kept dense by default")
    assert by_name["patch_embed.proj"]["reason"] == "dense: 4x4 conv, not a GEMM 2:4 can serve"
    assert {r["name"] for r in records} == {n for n, m in model.named_modules()
                                            if isinstance(m, (nn.Linear, nn.Conv2d))}
    assert {n for n, _ in sparse_modules(model)} == expected
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_bottleneck_resnet_swaps_stride1_1x1_convs_only():
    model = small_bottleneck_resnet()
    expected = {n for n, m in model.named_modules()
                if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.stride == (1, 1)}
    records = sparsify_(model, Semi24Config())
    assert "layer1.0.downsample.0" in expected and "layer1.0.conv1" in expected
    assert swapped(records) == expected
    assert all(isinstance(model.get_submodule(n), SparseConv1x1) for n in expected)
    reasons = {r["name"]: r["reason"] for r in records}
    assert reasons["conv1"] == "dense: 7x7 conv, not a GEMM 2:4 can serve"
    assert "kept dense by default" in reasons["fc"]
    assert "stride=(2, 2)" in reasons["layer2.0.downsample.0"]
    x = torch.randn(2, 3, 32, 32).to(memory_format=torch.channels_last)
    assert model.to(memory_format=torch.channels_last)(x).shape == (2, 10)


def test_resnet18_has_no_layer_2_4_can_serve():
    records = sparsify_(resnet18(), Semi24Config())
    assert swapped(records) == set()
    assert all(r["reason"].startswith("dense: ") for r in records)


def test_include_exclude_globs_and_filter_fn():
    model = tiny_vit()
    records = sparsify_(model, Semi24Config(), include=["blocks.*.mlp.*"], exclude=["blocks.1.*"])
    assert swapped(records) == {"blocks.0.mlp.fc1", "blocks.0.mlp.fc2"}
    reasons = {r["name"]: r["reason"] for r in records}
    assert reasons["blocks.1.mlp.fc1"] == "dense: matched exclude glob 'blocks.1.*'"
    assert reasons["blocks.0.attn.qkv"] == "dense: not matched by include globs ['blocks.*.mlp.*']"

    model = tiny_vit()
    records = sparsify_(model, Semi24Config(), filter_fn=lambda module, fqn: module.out_features > 192)
    assert swapped(records) == {"blocks.0.attn.qkv", "blocks.0.mlp.fc1", "blocks.1.attn.qkv", "blocks.1.mlp.fc1"}
    assert {r["reason"] for r in records if r["name"].endswith("fc2")} == {"dense: filter_fn returned False"}
    with pytest.raises(ValueError, match="list of globs"):
        sparsify_(tiny_vit(), Semi24Config(), include="blocks.*")


def test_skip_dense_by_default_can_be_turned_off_and_the_model_can_name_its_own():
    model = tiny_vit()
    assert "head" in swapped(sparsify_(model, Semi24Config(transposable=False), skip_dense_by_default=False))
    model = tiny_vit()
    model.sparsetrain_dense_by_default = ("blocks.0",)
    records = sparsify_(model, Semi24Config(transposable=False))
    assert swapped(records) == {f"blocks.1.{leaf}" for leaf in VIT_LINEARS} | {"head"}  # it replaces timm's names


def test_shapes_2_4_cannot_serve_stay_dense_with_a_logged_reason(caplog):
    model = OddShapes()
    with caplog.at_level(logging.DEBUG, logger="sparsetrain"):
        records = sparsify_(model, Semi24Config())
    reasons = {r["name"]: r["reason"] for r in records}
    assert reasons["odd"] == "dense: in_features 10 is not a multiple of 4 (2:4 groups run along the input dim)"
    assert swapped(records) == {"even"}
    assert any("odd" in m and "not a multiple of 4" in m for m in caplog.messages)

    records = sparsify_(OddShapes(), BlockConfig(block_size=8))
    reasons = {r["name"]: r["reason"] for r in records}
    assert "block size 8 does not divide" in reasons["odd"] and swapped(records) == {"even"}


def test_a_forced_cusparselt_backend_leaves_a_layer_it_cannot_serve_dense():
    """Checked when sparsifying, on any device: the run goes on with that layer dense, never stops at its
    first forward."""
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(64, 128), nn.Linear(128, 96), nn.Linear(96, 8))
    records = sparsify_(model, Semi24Config(backend="cusparselt"))
    reasons = {r["name"]: r["reason"] for r in records}
    assert swapped(records) == {"1"}
    assert reasons["2"] == ("dense: sparsity.backend=cusparselt cannot serve this 96x128 layer: out_features 96 is "
                            "not a multiple of 64 (backend=auto runs it masked dense instead)")


def test_act24_swaps_only_the_second_mlp_linear():
    records = sparsify_(tiny_vit(), Act24Config())
    assert swapped(records) == {"blocks.0.mlp.fc2", "blocks.1.mlp.fc2"}
    assert {r["pattern"] for r in records if r["name"].endswith("fc2")} == {"act24"}


def test_subclassed_linears_and_dense_configs_stay_dense():
    model = nn.Sequential(nn.MultiheadAttention(16, 2), nn.Linear(16, 16))
    records = sparsify_(model, Semi24Config())
    reasons = {r["name"]: r["reason"] for r in records}
    assert "NonDynamicallyQuantizableLinear is a subclass of nn.Linear" in reasons["0.out_proj"]
    assert swapped(records) == {"1"}
    with pytest.raises(ValueError, match="already sparse"):
        sparsify_(model, Semi24Config())
    records = sparsify_(tiny_vit(), None)
    assert swapped(records) == set() and {r["reason"] for r in records} == {"dense: sparsity pattern is dense"}


@pytest.mark.parametrize("config", [Semi24Config(), BlockConfig(block_size=16, sparsity=0.5, criterion="scores")])
def test_state_dict_round_trips_into_a_freshly_sparsified_model(config):
    trained = tiny_vit(seed=0)
    sparsify_(trained, config)
    layer = trained.blocks[0].mlp.fc1
    layer.set_mask_frozen(True)
    trained.blocks[1].attn.qkv.set_active(False)
    if isinstance(config, BlockConfig):
        with torch.no_grad():
            layer.block_scores.copy_(torch.rand_like(layer.block_scores))
        layer.update_mask(level=0.75, step=11)
    else:
        with torch.no_grad():
            layer.weight.copy_(torch.randn_like(layer.weight))
        layer.update_mask(step=11)
    fresh = tiny_vit(seed=1)
    sparsify_(fresh, config)  # sparsify first, then load, as on resume
    fresh.load_state_dict(trained.state_dict(), strict=True)
    for name, value in trained.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], value), name
    assert fresh.blocks[0].mlp.fc1.mask_step.item() == 11 and fresh.blocks[0].mlp.fc1._frozen
    assert not fresh.blocks[1].attn.qkv._active
    assert fresh.blocks[0].mlp.fc1.level == layer.level
    assert mask_checksum(fresh) == mask_checksum(trained)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(fresh(x), trained(x))


def test_mask_checksum_changes_with_any_mask():
    model = tiny_vit()
    sparsify_(model, Semi24Config())
    before = mask_checksum(model)
    assert mask_checksum(model) == before
    mask = model.blocks[1].mlp.fc2.mask
    mask[0, :4] = ~mask[0, :4]
    assert mask_checksum(model) != before


@pytest.mark.parametrize("config", [Semi24Config(), BlockConfig(block_size=16, sparsity=0.5, criterion="scores"),
                                    BlockConfig(block_size=16, sparsity=0.75)])
def test_densify_keeps_the_outputs_and_measured_sparsity_is_true(config):
    model = tiny_vit()
    sparsify_(model, config)
    level = 0.5 if isinstance(config, Semi24Config) else config.sparsity
    for row in layer_table(model):
        if row["pattern"] != "dense":
            layer = model.get_submodule(row["name"])
            zeros = (layer.effective_weight() == 0).sum().item()
            assert row["measured_sparsity"] == pytest.approx(level)
            assert zeros == round(level * layer.weight.numel())
    x = torch.randn(2, 3, 32, 32)
    sparse_out = model(x)
    names = densify_(model)
    assert len(names) == 8 and not sparse_modules(model)
    assert all(type(model.get_submodule(n)) is nn.Linear for n in names)
    torch.testing.assert_close(model(x), sparse_out, rtol=1e-5, atol=1e-5)
    assert all(row["pattern"] == "dense" for row in layer_table(model))


def test_layer_table_lists_dense_layers_with_their_reason():
    model = tiny_vit()
    sparsify_(model, Semi24Config())
    rows = {row["name"]: row for row in layer_table(model)}
    assert rows["head"]["pattern"] == "dense" and "kept dense by default" in rows["head"]["reason"]
    assert rows["blocks.0.mlp.fc1"]["backend"] == "emulated"
    assert set(rows["head"]) == set(rows["blocks.0.mlp.fc1"])
    assert isinstance(model.blocks[0].mlp.fc1, SparseLinear) and isinstance(model.blocks[0].mlp.fc1, SparseGemmLayer)


def test_mask_checksum_tells_two_transposable_masks_apart():
    # Every transposable 2:4 mask has the same count per row and column: a position-linear sum would
    # give them all one value, and DDP ranks that disagree would look as if they agreed.
    first, second = nn.Sequential(nn.Linear(64, 64)), nn.Sequential(nn.Linear(64, 64))
    for model, seed in ((first, 0), (second, 1)):
        torch.manual_seed(seed)
        nn.init.normal_(model[0].weight)
        sparsify_(model, Semi24Config(), skip_dense_by_default=False)
    assert not torch.equal(first[0].mask, second[0].mask)
    assert mask_checksum(first) != mask_checksum(second)
