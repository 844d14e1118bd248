"""The math of sparse training: configs, masks, schedules, the sparse layers and their autograd functions (no
Lightning, no Hydra), with the backends that run the layers' GEMMs (`sparsetrain.gpu`) exported beside them."""
import importlib

# Each public name and the module that defines it, imported on first use: the GPU package imports the masks
# from this package and this package's layers import the GPU package, so importing them all here would make
# importing either package first fail half-way.
_SOURCES = {
    "sparsetrain.gpu.backends": ("Backend", "CuSparseLtBackend", "EmulatedBackend", "resolve_backend"),
    "sparsetrain.gpu.layout_sm90": ("compress_sm90", "decompress_sm90"),
    "sparsetrain.sparse.block": ("BlockScoreSTE", "block_mask_from_scores", "block_norms", "expand_block_mask",
                                 "flip_rate", "set_block_level"),
    "sparsetrain.sparse.config": ("Act24Config", "BlockConfig", "Semi24Config", "config_from_dict"),
    "sparsetrain.sparse.functions": ("activation_sparse_linear", "weight_sparse_linear"),
    "sparsetrain.sparse.masks": ("is_24", "is_transposable_24", "mask_24", "mask_24_transposable"),
    "sparsetrain.sparse.layers": ("SparseConv1x1", "SparseGemmLayer", "SparseLinear"),
    "sparsetrain.sparse.schedules": ("Phase", "PruneSchedule"),
    "sparsetrain.sparse.sparsify": ("LayerRecord", "densify_", "layer_table", "mask_checksum", "sparse_modules",
                                    "sparsify_"),
}
_MODULE_OF = {name: module for module, names in _SOURCES.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_MODULE_OF[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
