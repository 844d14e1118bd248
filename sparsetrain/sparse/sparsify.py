"""sparsify_(model, config): swap linears and 1x1 convs for sparse ones in place; densify_ undoes it.

Every nn.Linear / nn.Conv2d gets a LayerRecord saying what happened to it and why, and every
decision is logged on the "sparsetrain" logger. A layer that cannot be served is left dense with
a reason; it never fails the run.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import NamedTuple, TypedDict

import torch
from torch import nn

from sparsetrain.sparse.config import Act24Config, SparsityConfig
from sparsetrain.sparse.layers import (SparseConv1x1, SparseGemmLayer, layer_class, not_a_gemm_reason,
                                      unsupported_reason)

logger = logging.getLogger("sparsetrain")

FilterFn = Callable[[nn.Module, str], bool]
# Set on a layer left dense, so layer_table can say why later.
DENSE_REASON_ATTR = "sparsetrain_dense_reason"
_CHECKSUM_PRIME = 1_000_003
_PRIME_A, _PRIME_B = 2_147_483_629, 2_147_483_587  # < 2**31, so products stay inside int64
_CHECKSUM_MODULUS = (1 << 61) - 1


class LayerRecord(TypedDict):
    """What sparsify_ did with one nn.Linear / nn.Conv2d (a plain dict, so it goes to JSON as is)."""

    name: str
    kind: str  # "linear", "conv1x1", "conv3x3", ...
    shape: tuple[int, ...]  # the weight's shape
    pattern: str  # "semi24" | "act24" | "block" | "dense"
    backend: str  # "emulated" | "cusparselt" | "triton_bsr" | "dense"
    reason: str


def layer_kind(module: nn.Module) -> str:
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return f"conv{kh}x{kw}"
    return "linear"


def default_dense_names(model: nn.Module) -> set[str]:
    """Fully qualified names of the layers a model asks to keep dense (first conv, classifier).

    Looked up on every submodule, so a model wrapped in another module is still found:
    `sparsetrain_dense_by_default` (set by our model factory), else timm's
    `pretrained_cfg["first_conv"]` / `["classifier"]`, else torchvision ResNet's conv1 / fc.
    """
    from torchvision.models import ResNet

    names: set[str] = set()
    for prefix, module in model.named_modules():
        declared = getattr(module, "sparsetrain_dense_by_default", None)
        pretrained_cfg = getattr(module, "pretrained_cfg", None)
        if declared is not None:
            local = list(declared)
        elif isinstance(pretrained_cfg, Mapping):
            local = [n for key in ("first_conv", "classifier") for n in _as_names(pretrained_cfg.get(key))]
        elif isinstance(module, ResNet):
            local = ["conv1", "fc"]
        else:
            continue
        names.update(f"{prefix}.{n}" if prefix else n for n in local)
    return names


def _as_names(value: str | Iterable[str] | None) -> list[str]:
    # timm gives one name, or a tuple of them for models with two heads.
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def _is_under(name: str, prefixes: Iterable[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _unselected_reason(
    name: str,
    module: nn.Module,
    parent: nn.Module | None,
    config: SparsityConfig | None,
    filter_fn: FilterFn | None,
    include: tuple[str, ...],
    exclude: tuple[str, ...],
    dense_by_default: set[str],
) -> str | None:
    """Why `module` is not one to make sparse, or None when it is (whether `config` can serve it is decided
    next, by unsupported_reason)."""
    if config is None:
        return "sparsity pattern is dense"
    if type(module) not in (nn.Linear, nn.Conv2d):
        base = "nn.Linear" if isinstance(module, nn.Linear) else "nn.Conv2d"
        return (
            f"{type(module).__name__} is a subclass of {base} and may run its own "
            "forward (nn.MultiheadAttention reads out_proj.weight directly); only plain nn.Linear/nn.Conv2d are swapped"
        )
    if parent is None:
        return "the model itself is the layer; wrap it in a module to sparsify it"
    if (not_a_gemm := not_a_gemm_reason(module, config)) is not None:
        return not_a_gemm
    matched_exclude = next((g for g in exclude if fnmatch.fnmatchcase(name, g)), None)
    if matched_exclude is not None:
        return f"matched exclude glob {matched_exclude!r}"
    if not any(fnmatch.fnmatchcase(name, g) for g in include):
        return f"not matched by include globs {list(include)}"
    if filter_fn is not None and not filter_fn(module, name):
        return "filter_fn returned False"
    if _is_under(name, dense_by_default):
        return "first/last layer kept dense by default (pass skip_dense_by_default=False to sparsify it)"
    if isinstance(config, Act24Config) and not any(fnmatch.fnmatchcase(name, g) for g in config.layer_globs):
        return f"act24 prunes only the inputs of layers matching {list(config.layer_globs)} (Act24Config.layer_globs)"
    return None


def _check_globs(name: str, globs: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    if isinstance(globs, str):
        raise ValueError(f"{name}={globs!r} must be a list of globs, e.g. [{globs!r}]")
    return tuple(globs)


class LayerPlan(NamedTuple):
    """What sparsify_ does with one nn.Linear / nn.Conv2d."""

    name: str
    module: nn.Module
    # Chosen to be sparse: a GEMM layer that the include/exclude globs, filter_fn and the default-dense rule
    # let through. A selected layer that stays dense is one the pattern cannot serve at its shape.
    selected: bool
    dense_reason: str | None  # None: it becomes sparse


def plan_sparsify(model: nn.Module, config: SparsityConfig | None, filter_fn: FilterFn | None = None,
                  include: Iterable[str] = ("*",), exclude: Iterable[str] = (),
                  skip_dense_by_default: bool = True) -> list[LayerPlan]:
    """What sparsify_ (same arguments) would do with each nn.Linear / nn.Conv2d, in module order, without doing it.

    Decided from the model's structure and shapes alone, so a model built on the meta device will do.
    """
    include, exclude = _check_globs("include", include), _check_globs("exclude", exclude)
    dense_by_default = default_dense_names(model) if skip_dense_by_default else set()
    plans = []
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        parent = _parent_of(model, name)
        reason = _unselected_reason(name, module, parent, config, filter_fn, include, exclude, dense_by_default)
        selected = reason is None
        plans.append(LayerPlan(name, module, selected, unsupported_reason(module, config) if selected else reason))
    return plans


def sparsify_(
    model: nn.Module,
    config: SparsityConfig | None,
    filter_fn: FilterFn | None = None,
    include: tuple[str, ...] | list[str] = ("*",),
    exclude: tuple[str, ...] | list[str] = (),
    skip_dense_by_default: bool = True,
) -> list[LayerRecord]:
    """Swap nn.Linear -> SparseLinear and 1x1 nn.Conv2d -> SparseConv1x1 in place, of the pattern's class
    (`layer_class`: e.g. Semi24Linear for a Semi24Config).

    config: Semi24Config / Act24Config / BlockConfig, or None (everything stays dense; the
        records still list every layer).
    filter_fn(module, fqn) -> bool: extra per-layer veto, as in torchao.
    include / exclude: fnmatch globs on fully qualified module names; exclude wins.
    skip_dense_by_default: keep the layers named by `default_dense_names` dense.

    Call it before loading a checkpoint of a sparse model: the masks and scores come back from
    the state_dict. Returns one LayerRecord per nn.Linear / nn.Conv2d, in module order.
    """
    already = sparse_modules(model)
    if already:
        raise ValueError(f"the model is already sparse ({already[0][0]}, ...); call densify_(model) first")
    records = []
    for name, module, _, reason in plan_sparsify(model, config, filter_fn, include, exclude,
                                                        skip_dense_by_default):
        if reason is not None:
            setattr(module, DENSE_REASON_ATTR, f"dense: {reason}")
            record = LayerRecord(name=name, kind=layer_kind(module), shape=tuple(module.weight.shape),
                                 pattern="dense", backend="dense", reason=f"dense: {reason}")
        else:
            sparse = layer_class(config, module).from_dense(module, config, name)
            setattr(_parent_of(model, name), name.rpartition(".")[2], sparse)
            record = LayerRecord(name=name, kind=sparse.kind, shape=tuple(sparse.weight.shape), pattern=sparse.pattern,
                                 backend=sparse.backend_name, reason=sparse.backend_reason)
        # Debug level: the layer table printed after the first step says the same once, with measured sparsity.
        logger.debug("sparsify %s %s %s -> %s [%s] %s", name, record["kind"], "x".join(map(str, record["shape"])),
                     record["pattern"], record["backend"], record["reason"])
        records.append(record)
    return records


def _parent_of(model: nn.Module, name: str) -> nn.Module | None:
    if not name:
        return None
    parent_name = name.rpartition(".")[0]
    return model.get_submodule(parent_name) if parent_name else model


def sparse_modules(model: nn.Module) -> list[tuple[str, SparseGemmLayer]]:
    """(name, layer) of every sparse layer, in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, SparseGemmLayer)]


def densify_(model: nn.Module) -> list[str]:
    """Swap every sparse layer back to a plain nn.Linear / nn.Conv2d holding its effective
    (masked) weight; the bias Parameter is shared. Returns the names swapped.

    An act24 layer has no weight mask: it comes back dense and its outputs change, because the
    activation pruning is dropped.
    """
    swapped = []
    for name, module in sparse_modules(model):
        if isinstance(module.sparse_config, Act24Config):
            logger.warning("densify %s: activation 2:4 pruning is dropped; the dense layer's outputs differ", name)
        dense = _dense_twin(module)
        parent = _parent_of(model, name)
        if parent is None:
            raise ValueError("densify_ needs a model that contains the sparse layers, not a sparse layer itself")
        setattr(parent, name.rpartition(".")[2], dense)
        swapped.append(name)
        logger.info("densify %s -> %s", name, type(dense).__name__)
    return swapped


def _dense_twin(layer: SparseGemmLayer) -> nn.Linear | nn.Conv2d:
    has_bias = layer.bias is not None
    if isinstance(layer, SparseConv1x1):
        dense = nn.Conv2d(layer.in_channels, layer.out_channels, kernel_size=1, bias=has_bias, device="meta")
    else:
        dense = nn.Linear(layer.in_features, layer.out_features, bias=has_bias, device="meta")
    dense.weight = nn.Parameter(layer.effective_weight(), requires_grad=layer.weight.requires_grad)
    dense.bias = layer.bias
    dense.train(layer.training)
    return dense


@torch.no_grad()
def layer_table(model: nn.Module) -> list[dict]:
    """One row per nn.Linear / nn.Conv2d: describe() of sparse layers, the same keys for dense
    ones. Names are relative to `model`; measured_sparsity is the fraction of exact zeros in the
    weight the forward uses."""
    rows = []
    for name, module in model.named_modules():
        if isinstance(module, SparseGemmLayer):
            rows.append({**module.describe(), "name": name})
        elif isinstance(module, (nn.Linear, nn.Conv2d)):
            rows.append({
                "name": name,
                "kind": layer_kind(module),
                "shape": tuple(module.weight.shape),
                "pattern": "dense",
                "backend": "dense",
                "reason": getattr(module, DENSE_REASON_ATTR, "dense: not sparsified"),
                "active": False,
                "level": 0.0,
                "measured_sparsity": (module.weight == 0).float().mean().item(),
            })
    return rows


@torch.no_grad()
def mask_checksum(model: nn.Module) -> int:
    """An integer that changes when any mask entry of any sparse layer changes, in module order: equal
    on all DDP ranks exactly when their masks agree (up to an unlikely collision).

    Each kept position adds a pseudo-random weight ((i * A mod P)^2 mod A), so two masks with the
    same count per row and column (every transposable 2:4 mask) still differ; a position-linear sum
    would give them all the same value."""
    checksum = 0
    for _, module in sparse_modules(model):
        flat = module.mask.flatten()
        weights = torch.arange(flat.numel(), device=flat.device, dtype=torch.int64) * _PRIME_A % _PRIME_B
        weights = weights * weights % _PRIME_A
        checksum = (checksum * _CHECKSUM_PRIME + int(weights[flat].sum().item()) + flat.numel()) % _CHECKSUM_MODULUS
    return checksum
