"""The math of sparse training: masks, backends and autograd functions (no Lightning, no Hydra)."""
from sparsetrain.sparse.backends import Backend, CuSparseLtBackend, EmulatedBackend, resolve_backend
from sparsetrain.sparse.functions import activation_sparse_linear, weight_sparse_linear
from sparsetrain.sparse.layout_sm90 import compress_sm90, decompress_sm90
from sparsetrain.sparse.masks import is_24, is_transposable_24, mask_24, mask_24_transposable

__all__ = [
    "Backend",
    "CuSparseLtBackend",
    "EmulatedBackend",
    "activation_sparse_linear",
    "compress_sm90",
    "decompress_sm90",
    "is_24",
    "is_transposable_24",
    "mask_24",
    "mask_24_transposable",
    "resolve_backend",
    "weight_sparse_linear",
]

# Sparsity transforms, block masks, schedules and the module swap.
from sparsetrain.sparse.block import (BlockScoreSTE, block_mask_from_scores, block_norms, expand_block_mask, flip_rate,
                                      set_block_level)
from sparsetrain.sparse.config import Act24Config, BlockConfig, Semi24Config, config_from_dict
from sparsetrain.sparse.modules import SparseConv1x1, SparseGemmLayer, SparseLinear
from sparsetrain.sparse.schedules import Phase, PruneSchedule
from sparsetrain.sparse.sparsify import (LayerRecord, densify_, layer_table, mask_checksum, sparse_modules,
                                         sparsify_)

__all__ += [
    "Act24Config",
    "BlockConfig",
    "BlockScoreSTE",
    "LayerRecord",
    "Phase",
    "PruneSchedule",
    "Semi24Config",
    "SparseConv1x1",
    "SparseGemmLayer",
    "SparseLinear",
    "block_mask_from_scores",
    "block_norms",
    "config_from_dict",
    "densify_",
    "expand_block_mask",
    "flip_rate",
    "layer_table",
    "mask_checksum",
    "set_block_level",
    "sparse_modules",
    "sparsify_",
]
