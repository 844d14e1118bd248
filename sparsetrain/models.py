"""create_model: timm models by name and torchvision ResNets, sized for small images when asked.

Nothing is ever downloaded: timm and torchvision build untrained networks, and `pretrained_path` reads a
local file. Every model carries `sparsetrain_dense_by_default`, the fully-qualified names of its first layer
and classifier, which the sparsifier leaves dense.
"""

from __future__ import annotations

import difflib
import logging
import pickle
import re
from pathlib import Path

import safetensors.torch
import timm
import torch
import torchvision
from timm.layers import Mlp
from torch import nn

log = logging.getLogger(__name__)

MODEL_SOURCES = ("auto", "timm", "torchvision")
MLP_ACTIVATIONS = ("squared_relu",)
TORCHVISION_RESNETS = tuple(
    sorted(
        name
        for name in torchvision.models.list_models(module=torchvision.models)
        if name.startswith(("resnet", "resnext", "wide_resnet"))
    )
)
TORCHVISION_RESNET_DENSE_BY_DEFAULT = ("conv1", "fc")
# A Lightning checkpoint stores the network under the LightningModule's `model` attribute.
LIGHTNING_MODEL_PREFIX = "model."
# torch.compile wraps a module and puts its parameters under `_orig_mod.`.
COMPILE_WRAPPER_PREFIX = "_orig_mod."


class SquaredReLU(nn.Module):
    """relu(x)^2 (Primer, So et al. 2021): as accurate as GELU in transformer MLPs, and exactly zero for
    every negative input, so the MLP's second linear layer sees the sparse input activation-sparse 2:4 needs.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.square(torch.relu(x))


def create_model(
    name: str,
    num_classes: int,
    in_chans: int = 3,
    img_size: int | None = None,
    patch_size: int | None = None,
    source: str = "auto",
    small_input_stem: bool = False,
    pretrained_path: str | None = None,
    drop_path_rate: float = 0.0,
    mlp_act: str | None = None,
    **kwargs,
) -> nn.Module:
    """Build an untrained model by name, optionally loading local weights.

    source: "torchvision" builds a torchvision ResNet; "timm" any timm model; "auto" takes torchvision for
        the torchvision ResNet names (resnet18, wide_resnet50_2, ...) and timm for everything else.
    img_size, patch_size: passed to timm only when given; they are how a ViT runs on 28-32 px images.
        ResNets pool globally and take any size, so torchvision ignores img_size.
    small_input_stem: torchvision ResNets only: 3x3 stride-1 first conv and no max-pool (CIFAR-style).
    mlp_act: "squared_relu" swaps the activation inside every timm `Mlp` (the ViT blocks' MLPs).
    pretrained_path: a local state_dict (.pt/.pth), Lightning checkpoint (.ckpt) or .safetensors file.
    kwargs: passed on to `timm.create_model` or `torchvision.models.get_model`.
    """
    if source not in MODEL_SOURCES:
        raise ValueError(f"model.source={source!r} is not supported; use one of {list(MODEL_SOURCES)}")
    if mlp_act is not None and mlp_act not in MLP_ACTIVATIONS:
        raise ValueError(f"model.mlp_act={mlp_act!r} is not supported; use null or one of {list(MLP_ACTIVATIONS)}")
    try:
        model = _create_untrained(name, num_classes, in_chans, img_size, patch_size, source, small_input_stem,
                                  drop_path_rate, mlp_act, **kwargs)
    except TypeError as e:
        # The keyword arguments beyond this function's go to the timm / torchvision constructor, which names one it
        # does not take only in a TypeError.
        unexpected = re.search(r"unexpected keyword argument '(\w+)'", str(e))
        if unexpected is None or unexpected.group(1) not in kwargs:
            raise
        key = unexpected.group(1)
        raise ValueError(f"model.{key}={kwargs[key]} is not an argument of {name} ({str(e).split('(')[0]}); remove "
                         "it or check its spelling") from None
    if pretrained_path is not None:
        load_pretrained(model, pretrained_path)
    return model


def _create_untrained(name: str, num_classes: int, in_chans: int, img_size: int | None, patch_size: int | None,
                      source: str, small_input_stem: bool, drop_path_rate: float, mlp_act: str | None,
                      **kwargs) -> nn.Module:
    if source == "torchvision" or (source == "auto" and name in TORCHVISION_RESNETS):
        if patch_size is not None or drop_path_rate or mlp_act is not None:
            raise ValueError(
                f"torchvision {name} has no patch_size, drop_path_rate or mlp_act; leave them at null/0.0, "
                f"or use timm's version with model.source=timm"
            )
        model = _create_torchvision_resnet(name, num_classes, in_chans, small_input_stem, source, **kwargs)
    else:
        if small_input_stem:
            raise ValueError(
                f"model.small_input_stem applies to torchvision ResNets, not timm's {name}; "
                f"for a timm ViT on small images set model.img_size and model.patch_size instead"
            )
        model = _create_timm_model(name, num_classes, in_chans, img_size, patch_size, drop_path_rate, source, **kwargs)
        if mlp_act == "squared_relu":
            _use_squared_relu_in_mlps(model, name)
    return model


def _unknown_model_error(name: str, source: str, candidates: list[str]) -> ValueError:
    close = difflib.get_close_matches(name, candidates, n=5, cutoff=0.6)
    suggestion = f"close matches: {', '.join(close)}" if close else "no close match"
    return ValueError(
        f"unknown model {name!r} for model.source={source} ({suggestion}); set model.name to one of those, "
        f"or list names with timm.list_models('*pattern*') / sparsetrain.models.TORCHVISION_RESNETS"
    )


def _create_torchvision_resnet(
    name: str, num_classes: int, in_chans: int, small_input_stem: bool, source: str, **kwargs
) -> nn.Module:
    if name not in TORCHVISION_RESNETS:
        raise _unknown_model_error(name, source, list(TORCHVISION_RESNETS))
    model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    if small_input_stem or in_chans != 3:
        _replace_resnet_stem(model, in_chans, small_input_stem)
    model.sparsetrain_dense_by_default = TORCHVISION_RESNET_DENSE_BY_DEFAULT
    return model


def _replace_resnet_stem(model: nn.Module, in_chans: int, small_input_stem: bool) -> None:
    stem_channels = model.conv1.out_channels
    if small_input_stem:
        # The 7x7/2 conv and the 3x3/2 max-pool would shrink a 32 px image to 8 px before the first block.
        model.conv1 = nn.Conv2d(in_chans, stem_channels, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    else:
        model.conv1 = nn.Conv2d(in_chans, stem_channels, kernel_size=7, stride=2, padding=3, bias=False)
    # The initialisation torchvision's ResNet gives its convolutions.
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")


def _create_timm_model(
    name: str,
    num_classes: int,
    in_chans: int,
    img_size: int | None,
    patch_size: int | None,
    drop_path_rate: float,
    source: str,
    **kwargs,
) -> nn.Module:
    if not timm.is_model(name):
        candidates = timm.list_models() + (list(TORCHVISION_RESNETS) if source == "auto" else [])
        raise _unknown_model_error(name, source, candidates)
    # Given only when set: most timm CNNs accept neither img_size nor patch_size, and some lack drop_path_rate.
    optional = {"img_size": img_size, "patch_size": patch_size, "drop_path_rate": drop_path_rate or None}
    kwargs.update({key: value for key, value in optional.items() if value is not None})
    model = timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans, **kwargs)
    model.sparsetrain_dense_by_default = _timm_first_and_classifier(model)
    return model


def _timm_first_and_classifier(model: nn.Module) -> tuple[str, ...]:
    """timm's `pretrained_cfg` names the first conv and the classifier(s), each a name or a tuple of names
    (a distilled DeiT has two heads)."""
    names: list[str] = []
    for key in ("first_conv", "classifier"):
        value = model.pretrained_cfg.get(key) or ()
        names += [value] if isinstance(value, str) else list(value)
    return tuple(names)


def _use_squared_relu_in_mlps(model: nn.Module, name: str) -> None:
    mlps = [module for module in model.modules() if isinstance(module, Mlp)]
    if not mlps:
        raise ValueError(
            f"model.mlp_act=squared_relu found no timm Mlp block in {name}; use a ViT "
            f"(e.g. vit_small_patch16_224) or set model.mlp_act=null"
        )
    for mlp in mlps:
        mlp.act = SquaredReLU()


# ----------------------------------------------------------------------------------------------------------
# Local weights
# ----------------------------------------------------------------------------------------------------------


def load_pretrained(model: nn.Module, path: str | Path) -> None:
    """Load a local checkpoint into `model`, requiring every key and shape to match."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"model.pretrained_path={path} does not exist; point it at a local state_dict, Lightning .ckpt "
            f"or .safetensors file (nothing is downloaded)"
        )
    try:
        state_dict = read_state_dict(path)
    except ValueError:
        raise  # already names the problem (e.g. a pickled module instead of a state_dict)
    except Exception as e:  # torch.load and safetensors raise several types for a damaged file
        raise ValueError(f"model.pretrained_path={path} is corrupt or truncated ({type(e).__name__}: "
                         f"{str(e)[:200]}); save the weights again or point at another file") from e
    _check_state_dict_fits(model, state_dict, path)
    model.load_state_dict(state_dict)
    log.info("model.pretrained_path: loaded %d tensors from %s", len(state_dict), path)


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The network's tensors from a plain state_dict, a Lightning checkpoint or a safetensors file."""
    if path.suffix == ".safetensors":
        state_dict = safetensors.torch.load_file(str(path))
    else:
        checkpoint = _torch_load(path)
        if not isinstance(checkpoint, dict):
            raise ValueError(
                f"{path} holds a {type(checkpoint).__name__}, not a state_dict; save model.state_dict() instead"
            )
        if isinstance(checkpoint.get("state_dict"), dict):
            state_dict = {
                key.removeprefix(LIGHTNING_MODEL_PREFIX): value
                for key, value in checkpoint["state_dict"].items()
                if key.startswith(LIGHTNING_MODEL_PREFIX)
            }
        else:
            state_dict = checkpoint
    return {key.replace(COMPILE_WRAPPER_PREFIX, ""): value for key, value in state_dict.items()}


def _torch_load(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # Lightning checkpoints whose saved hyper-parameters are OmegaConf objects hold pickled classes.
        # Lightning itself resumes from such local files with weights_only=False; this is the same trust.
        log.warning("%s holds pickled objects beyond tensors; loading it with weights_only=False", path)
        return torch.load(path, map_location="cpu", weights_only=False)


def _check_state_dict_fits(model: nn.Module, state_dict: dict[str, torch.Tensor], path: Path) -> None:
    expected = model.state_dict()
    problems = {
        "missing": [key for key in expected if key not in state_dict],
        "unexpected": [key for key in state_dict if key not in expected],
        "wrong shape": [
            f"{key} {tuple(state_dict[key].shape)} in file vs {tuple(tensor.shape)} in model"
            for key, tensor in expected.items()
            if key in state_dict and state_dict[key].shape != tensor.shape
        ],
    }
    found = [f"{kind}: {_first_few(items)}" for kind, items in problems.items() if items]
    if found:
        raise ValueError(
            f"{path} does not fit this model ({'; '.join(found)}); build the model with the same "
            f"name/num_classes/in_chans/img_size/patch_size/small_input_stem as the run that saved it"
        )


def _first_few(items: list[str], count: int = 4) -> str:
    more = f" (+{len(items) - count} more)" if len(items) > count else ""
    return ", ".join(items[:count]) + more
