"""Which layer class runs a config on a dense module, and whether it can.

Each pattern's layer classes register for their config type with `@register_layer(ConfigType)`, as torchao's
`sparsify_` finds the handler of a config by its type; `sparsify_` and `from_dense` look the class up with
`layer_class(config, dense_module)`. A config type has one class per dense module class it serves: one that
subclasses nn.Linear and one that subclasses nn.Conv2d (1x1).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from torch import nn

from sparsetrain.sparse.config import SparsityConfig
from sparsetrain.sparse.layers.base import SparseGemmLayer, gemm_shape

LayerClass = TypeVar("LayerClass", bound=type[SparseGemmLayer])

_LAYER_CLASSES: dict[tuple[type, type[nn.Module]], type[SparseGemmLayer]] = {}


def _dense_class(module_or_class: nn.Module | type) -> type[nn.Module]:
    """nn.Conv2d or nn.Linear: the dense module class a module (or a layer class) is or stands in for."""
    cls = module_or_class if isinstance(module_or_class, type) else type(module_or_class)
    return nn.Conv2d if issubclass(cls, nn.Conv2d) else nn.Linear


def register_layer(config_type: type) -> Callable[[LayerClass], LayerClass]:
    """Class decorator: configs of type `config_type` on the dense module the class subclasses become this class."""
    def register(cls: LayerClass) -> LayerClass:
        _LAYER_CLASSES[config_type, _dense_class(cls)] = cls
        return cls
    return register


def layer_class(config: SparsityConfig, dense: nn.Module) -> type[SparseGemmLayer]:
    """The sparse layer class that runs `config` on `dense` (an nn.Linear or nn.Conv2d)."""
    try:
        return _LAYER_CLASSES[type(config), _dense_class(dense)]
    except KeyError:
        raise TypeError(f"no sparse layer runs {type(config).__name__} on {_dense_class(dense).__name__}; "
                        "register one with @register_layer") from None


def not_a_gemm_reason(module: nn.Linear | nn.Conv2d, config: SparsityConfig) -> str | None:
    """Why `module` is a conv that is not a plain GEMM (a kxk kernel, stride, padding, dilation, groups), or None."""
    if not isinstance(module, nn.Conv2d):
        return None
    kh, kw = module.kernel_size
    if (kh, kw) != (1, 1):
        return f"{kh}x{kw} conv, not a GEMM {layer_class(config, module).pattern_label} can serve"
    if module.stride != (1, 1) or module.dilation != (1, 1) or module.groups != 1 or any(
        p != 0 for p in _padding_amounts(module)
    ):
        return (
            f"1x1 conv with stride={module.stride}, padding={module.padding}, dilation={module.dilation}, "
            f"groups={module.groups} is not a plain GEMM (only stride 1, no padding/dilation/groups is)"
        )
    return None


def _padding_amounts(conv: nn.Conv2d) -> tuple[int, ...]:
    # "valid" pads nothing; "same" with a 1x1 kernel pads nothing either.
    return (0,) if isinstance(conv.padding, str) else tuple(conv.padding)


def unsupported_reason(module: nn.Linear | nn.Conv2d, config: SparsityConfig) -> str | None:
    """Why `config` cannot run on `module` (a short sentence), or None when it can."""
    not_a_gemm = not_a_gemm_reason(module, config)
    if not_a_gemm is not None:
        return not_a_gemm
    return layer_class(config, module).shape_problem(*gemm_shape(module), config)


def require_supported(module: nn.Linear | nn.Conv2d, config: SparsityConfig, name: str) -> None:
    reason = unsupported_reason(module, config)
    if reason is not None:
        raise ValueError(f"cannot make {name or 'this layer'} sparse: {reason}; leave it dense (sparsify_ does)")
