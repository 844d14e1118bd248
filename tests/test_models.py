"""create_model: timm ViTs on small images, torchvision ResNet stems, Squared-ReLU MLPs, local weights."""

import socket
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
import torchvision
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from sparsetrain.models import SquaredReLU, create_model

CONF = Path(__file__).resolve().parents[1] / "conf"


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Nothing is ever downloaded: any connection attempt fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("create_model tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def tiny_vit(**options) -> nn.Module:
    """vit_tiny at 28 px with 4 px patches (49 tokens) and 2 blocks: enough structure, milliseconds to run."""
    return create_model(
        "vit_tiny_patch16_224", num_classes=10, in_chans=1, img_size=28, patch_size=4, depth=2, **options
    )


def small_resnet18(**options) -> nn.Module:
    return create_model("resnet18", num_classes=10, in_chans=1, small_input_stem=True, **options)


def test_timm_vit_runs_on_28px_images():
    model = tiny_vit()
    assert isinstance(model, timm.models.VisionTransformer)
    assert model.patch_embed.proj.kernel_size == (4, 4)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_timm_dense_by_default_names_first_layer_and_classifier():
    model = tiny_vit()
    assert model.sparsetrain_dense_by_default == ("patch_embed.proj", "head")
    for name in model.sparsetrain_dense_by_default:
        assert isinstance(model.get_submodule(name), (nn.Conv2d, nn.Linear))


def test_timm_resnet_when_asked_for_timm():
    model = create_model("resnet18", num_classes=10, source="timm")
    assert isinstance(model, timm.models.ResNet)
    assert model.sparsetrain_dense_by_default == ("conv1", "fc")


@pytest.mark.parametrize("in_chans, size", [(1, 28), (3, 32)])
def test_torchvision_resnet_small_stem(in_chans, size):
    model = create_model("resnet18", num_classes=10, in_chans=in_chans, small_input_stem=True)
    assert isinstance(model, torchvision.models.ResNet)
    assert model.conv1.in_channels == in_chans
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, nn.Identity)
    assert model.fc.out_features == 10
    assert model.sparsetrain_dense_by_default == ("conv1", "fc")
    model.eval()
    assert model(torch.randn(2, in_chans, size, size)).shape == (2, 10)


def test_torchvision_resnet_standard_stem_takes_other_channel_counts():
    model = create_model("resnet18", num_classes=7, in_chans=1, img_size=28)  # img_size: ResNets take any size
    assert model.conv1.in_channels == 1 and model.conv1.kernel_size == (7, 7)
    assert isinstance(model.maxpool, nn.MaxPool2d)
    model.eval()
    assert model(torch.randn(1, 1, 28, 28)).shape == (1, 7)


def test_torchvision_resnet_stays_untouched_for_rgb():
    model = create_model("wide_resnet50_2", num_classes=5)
    assert model.conv1.kernel_size == (7, 7) and model.conv1.in_channels == 3 and model.fc.out_features == 5


def test_squared_relu_replaces_every_mlp_activation():
    model = tiny_vit(mlp_act="squared_relu")
    assert all(isinstance(block.mlp.act, SquaredReLU) for block in model.blocks)
    assert not any(isinstance(module, nn.GELU) for module in model.modules())
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert torch.equal(SquaredReLU()(torch.tensor([-2.0, 0.0, 3.0])), torch.tensor([0.0, 0.0, 9.0]))


def test_squared_relu_needs_mlp_blocks():
    with pytest.raises(ValueError, match="no timm Mlp block in resnet18.*mlp_act=null"):
        create_model("resnet18", num_classes=10, source="timm", mlp_act="squared_relu")


@pytest.mark.parametrize(
    "name, source, suggestion",
    [
        ("resnet19", "auto", "resnet18"),
        ("vit_tiny_patch16_22", "auto", "vit_tiny_patch16_224"),
        ("resnet5O", "torchvision", "resnet50"),
    ],
)
def test_unknown_name_suggests_close_matches(name, source, suggestion):
    with pytest.raises(ValueError, match=f"unknown model '{name}'.*close matches:.*{suggestion}") as error:
        create_model(name, num_classes=10, source=source)
    assert "set model.name" in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(name="resnet18", source="hub"), "model.source='hub' is not supported"),
        (dict(name="resnet18", mlp_act="gelu"), "model.mlp_act='gelu' is not supported"),
        (dict(name="resnet18", patch_size=4), "has no patch_size.*model.source=timm"),
        (dict(name="resnet18", drop_path_rate=0.1), "has no patch_size, drop_path_rate"),
        (dict(name="vit_tiny_patch16_224", small_input_stem=True), "set model.img_size and model.patch_size"),
    ],
)
def test_option_misuse_names_the_fix(options, message):
    with pytest.raises(ValueError, match=message):
        create_model(num_classes=10, **options)


def assert_same_weights(model: nn.Module, reference: nn.Module) -> None:
    loaded, expected = model.state_dict(), reference.state_dict()
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[key], expected[key]) for key in expected)


def test_pretrained_state_dict_round_trip(tmp_path):
    reference = small_resnet18()
    path = tmp_path / "weights.pt"
    torch.save(reference.state_dict(), path)
    assert_same_weights(small_resnet18(pretrained_path=str(path)), reference)


def test_pretrained_lightning_checkpoint(tmp_path):
    reference = tiny_vit(mlp_act="squared_relu")
    state_dict = {f"model.{key}": value for key, value in reference.state_dict().items()}
    # A compiled network adds `_orig_mod.`; other LightningModule state sits outside `model.`.
    state_dict = {key.replace("model.blocks", "model._orig_mod.blocks"): value for key, value in state_dict.items()}
    state_dict["criterion.weight"] = torch.ones(10)
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": state_dict, "epoch": 3, "hyper_parameters": {"lr": 0.1}}, path)
    assert_same_weights(tiny_vit(mlp_act="squared_relu", pretrained_path=str(path)), reference)


def test_pretrained_lightning_checkpoint_with_omegaconf_hyper_parameters(tmp_path, caplog):
    reference = small_resnet18()
    path = tmp_path / "last.ckpt"
    state_dict = {f"model.{key}": value for key, value in reference.state_dict().items()}
    torch.save({"state_dict": state_dict, "hyper_parameters": OmegaConf.create({"lr": 0.1})}, path)
    assert_same_weights(small_resnet18(pretrained_path=str(path)), reference)
    assert "weights_only=False" in caplog.text


def test_pretrained_whole_module_is_refused(tmp_path):
    path = tmp_path / "model.pt"
    torch.save(small_resnet18(), path)
    with pytest.raises(ValueError, match="holds a ResNet, not a state_dict; save model.state_dict"):
        small_resnet18(pretrained_path=str(path))


def test_pretrained_safetensors(tmp_path):
    reference = tiny_vit()
    path = tmp_path / "model.safetensors"
    safetensors.torch.save_file(reference.state_dict(), str(path))
    assert_same_weights(tiny_vit(pretrained_path=str(path)), reference)


def test_pretrained_mismatch_lists_keys(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save(small_resnet18().state_dict(), path)
    with pytest.raises(ValueError, match=r"wrong shape: fc.weight \(10, 512\) in file vs \(5, 512\) in model"):
        create_model("resnet18", num_classes=5, in_chans=1, small_input_stem=True, pretrained_path=str(path))
    with pytest.raises(ValueError, match=r"missing: .*unexpected: .*same name/num_classes"):
        tiny_vit(pretrained_path=str(path))


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_pretrained_truncated_file_names_the_fix(tmp_path, suffix):
    path = tmp_path / f"weights{suffix}"
    if suffix == ".pt":
        torch.save(small_resnet18().state_dict(), path)
    else:
        safetensors.torch.save_file(small_resnet18().state_dict(), str(path))
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match="corrupt or truncated.*save the weights again"):
        small_resnet18(pretrained_path=str(path))


def test_pretrained_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist.*nothing is downloaded"):
        small_resnet18(pretrained_path=str(tmp_path / "absent.pt"))


def test_default_yaml_instantiates_from_the_data_node():
    model_node = OmegaConf.load(CONF / "model" / "default.yaml")
    root = OmegaConf.create({"data": {"num_classes": 10, "channels": 1, "img_size": 28}, "model": model_node})
    model = instantiate(root.model)
    assert isinstance(model, torchvision.models.ResNet)
    assert model.conv1.in_channels == 1 and model.fc.out_features == 10
