"""A run's `sparsity:` section applied to a model, as training built it and as export rebuilds it.

The section is a plain mapping: the composed config's, a run's config.yaml's or an export's metadata's. Beside the
fields of the pattern's config class it holds sparsify_'s include and exclude, and keys that only the training
around the layers reads (masked decay, score learning rate, subnets), which the layers do not need.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

from torch import nn

from sparsetrain.sparse.config import CONFIG_BY_PATTERN, SparsityConfig, config_from_dict
from sparsetrain.sparse.fused_mlp import fuse_block_mlps_
from sparsetrain.sparse.sparsify import LayerRecord, sparsify_

logger = logging.getLogger("sparsetrain")


def sparsify_arguments(section: Mapping[str, Any]) -> tuple[SparsityConfig | None, tuple[str, ...], tuple[str, ...]]:
    """The section as sparsify_'s config, include and exclude."""
    pattern = section.get("pattern")
    config_class = CONFIG_BY_PATTERN.get(pattern)
    fields = {f.name for f in dataclasses.fields(config_class)} if config_class else set()
    config = config_from_dict({"pattern": pattern, **{k: v for k, v in section.items() if k in fields}})
    return config, tuple(section.get("include", ["*"])), tuple(section.get("exclude", []))


def build_sparsity(model: nn.Module, section: Mapping[str, Any]) -> list[LayerRecord]:
    """Make `model` sparse as the section says; returns one record per linear/conv layer."""
    config, include, exclude = sparsify_arguments(section)
    records = sparsify_(model, config, include=include, exclude=exclude)
    # One autograd node per fc1 -> GELU -> fc2 of block layers where both run on the kernels: GELU's backward
    # moves into fc2's input-grad kernel. Same parameters and state-dict keys; elsewhere the layers run one by one.
    fused = fuse_block_mlps_(model)
    if fused:
        logger.info("block-sparse MLPs fused into one node where they run on the kernels: %d (%s, ...)",
                    len(fused), fused[0])
    return records
