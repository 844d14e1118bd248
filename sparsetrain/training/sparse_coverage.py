"""A sparse recipe must make some layer sparse: one that would train a dense model stops before anything is
built, naming why and what would fit; one whose selected layers are only partly sparse says so in one warning."""
import logging
import math
from collections import Counter

from omegaconf import DictConfig

from sparsetrain.gpu.backends.block_routes import KERNEL_BLOCK_SIZES
from sparsetrain.sparse.sparsify import LayerPlan, layer_kind
from sparsetrain.training.errors import ConfigError

log = logging.getLogger("sparsetrain")


def check_coverage(plans: list[LayerPlan], sparsity_cfg: DictConfig) -> None:
    """`plans`: plan_sparsify's, for the recipe's `sparsity` section (pattern not dense)."""
    if all(plan.dense_reason is not None for plan in plans):
        raise ConfigError(f"sparsity={sparsity_cfg.pattern} would train a dense model: "
                          f"{why_no_layer_is_sparse(plans, sparsity_cfg)}")
    left_dense = [plan for plan in plans if plan.selected and plan.dense_reason is not None]
    if left_dense:
        first = left_dense[0]
        log.warning("%d of the %d selected layers stay dense, %s %s among them (%s); the layer table lists each",
                    len(left_dense), sum(plan.selected for plan in plans), first.name, _shape(first),
                    first.dense_reason)


def why_no_layer_is_sparse(plans: list[LayerPlan], sparsity_cfg: DictConfig) -> str:
    selected = [plan for plan in plans if plan.selected]
    if not selected:
        gemms = [plan.name for plan in plans if layer_kind(plan.module) in ("linear", "conv1x1")]
        return (f"sparsity.include={list(sparsity_cfg.include)} with sparsity.exclude={list(sparsity_cfg.exclude)} "
                f"selects none of the model's {len(gemms)} linear/1x1-conv layers (the first and last stay dense), "
                f"such as {', '.join(gemms[:3])}; widen sparsity.include")
    block_size = sparsity_cfg.get("block_size")
    dims = sorted({d for plan in selected for d in plan.module.weight.shape[:2]})
    if block_size and any(d % block_size for d in dims):
        fits = fitting_block_sizes(dims)
        fix = f"use {_either(fits)}" if fits else "none divides them all: select other layers with sparsity.include"
        return f"block_size {block_size} divides none of the {'/'.join(map(str, dims))}-wide weights; {fix}"
    reasons = Counter((layer_kind(plan.module), plan.dense_reason) for plan in selected)
    each = "; ".join(f"{count} {kind} layer{'s' if count > 1 else ''}: {reason}"
                     for (kind, reason), count in reasons.items())
    return f"{each}; change those layers' widths (model.*) or select others with sparsity.include"


def fitting_block_sizes(dims: list[int]) -> list[int]:
    """Block sizes that tile every dim: the block-sparse kernels' sizes among them, else every divisor above 1."""
    common = math.gcd(*dims)
    kernel_sizes = [size for size in KERNEL_BLOCK_SIZES if common % size == 0]
    return kernel_sizes or [size for size in range(2, common + 1) if common % size == 0]


def _either(values: list[int]) -> str:
    return " or ".join(", ".join(map(str, values)).rsplit(", ", 1))


def _shape(plan: LayerPlan) -> str:
    return "x".join(map(str, plan.module.weight.shape))
