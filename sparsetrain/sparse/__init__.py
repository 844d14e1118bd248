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
