"""Where the 2:4 GEMMs run: masked dense (`EmulatedBackend`) or cuSPARSELt (`CuSparseLtBackend`).

Both take the same dense tensors with zeros, so every fast path can be checked against
"mask, then run dense". `resolve_backend` picks one per layer and says why in one sentence.
"""
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from sparsetrain.sparse.layout_sm90 import compress_sm90

BACKENDS = ("auto", "emulated", "cusparselt")
COMPRESS_ROUTES = ("cslt", "direct")
HALF_DTYPES = (torch.float16, torch.bfloat16)
CUSPARSELT_DIM_MULTIPLE = 64
# Measured on an H100: 2:4 GEMMs gain little below this width (ViT-B MLP 0.96x-1.06x, ViT-L 1.2x).
NARROW_LAYER_FEATURES = 1024
ALGORITHM_MAX_REL_ERROR = 2e-2
_DENSE_ROW_MULTIPLE = 16  # token rows of a dense cuSPARSELt operand
_SPARSE_ROW_MULTIPLE = 64  # token rows of a sparse (compressed) operand: the sm90 tile size

# (sparse shape, dense shape, dense contiguous, transpose_result, dtype, device) -> algorithm id.
_ALGORITHMS: dict[tuple, int] = {}


class Backend(ABC):
    """Runs a layer's 2:4 GEMMs. One instance per layer."""

    name: str

    @abstractmethod
    def linear(self, x2d: Tensor, w_masked: Tensor, need_input_grad: bool) -> tuple[Tensor, Tensor | None]:
        """Y = X @ W_s^T, and what `input_grad` needs (None when no input grad is needed)."""

    @abstractmethod
    def input_grad(self, gy2d: Tensor, ctx: Tensor) -> Tensor:
        """dX = dY @ W_s, with `ctx` from `linear`."""

    @abstractmethod
    def sparse_input_linear(self, x_sparse2d: Tensor, weight: Tensor) -> Tensor:
        """Y = X_s @ W^T where X_s (tokens, in) is 2:4 along its rows (activation sparsity)."""

    @abstractmethod
    def sparse_input_weight_grad(self, gy2d: Tensor, x_sparse2d: Tensor, transposable: bool) -> Tensor:
        """dW = dY^T @ X_s; `transposable` says X_s^T is 2:4 too (2:4 along tokens)."""


class EmulatedBackend(Backend):
    """Masked dense matmuls: any device, any dtype. The reference for every fast path."""

    name = "emulated"

    def linear(self, x2d, w_masked, need_input_grad):
        return x2d @ w_masked.t(), (w_masked if need_input_grad else None)

    def input_grad(self, gy2d, ctx):
        return gy2d @ ctx

    def sparse_input_linear(self, x_sparse2d, weight):
        return x_sparse2d @ weight.t()

    def sparse_input_weight_grad(self, gy2d, x_sparse2d, transposable):
        return gy2d.t() @ x_sparse2d


def _pad_rows(t: Tensor, multiple: int) -> Tensor:
    """Contiguous `t` with zero rows appended up to a multiple of `multiple` (zeros change no product)."""
    extra = -t.shape[0] % multiple
    return F.pad(t, (0, 0, 0, extra)) if extra else t.contiguous()


def _relative_error(result: Tensor, reference: Tensor) -> float:
    reference = reference.float()
    return float((result.float() - reference).norm() / reference.norm().clamp_min(1e-30))


def _search_and_verify(compressed: Tensor, dense: Tensor, transpose_result: bool, key: tuple,
                       reference: Callable[[], Tensor]) -> int:
    algorithm = int(torch._cslt_sparse_mm_search(compressed, dense, transpose_result=transpose_result))
    result = torch._cslt_sparse_mm(compressed, dense, transpose_result=transpose_result, alg_id=algorithm)
    error = _relative_error(result, reference())
    if error < ALGORITHM_MAX_REL_ERROR:
        return algorithm
    warnings.warn(f"cuSPARSELt algorithm {algorithm} (searched) is off by {error:.3g} relative to masked "
                  f"dense for {key}; this shape uses algorithm 0. Report it with your torch and GPU versions.")
    return 0


def _algorithm_key(compressed: Tensor, dense: Tensor, transpose_result: bool) -> tuple:
    # cuSPARSELt reads a non-contiguous dense operand as the transpose of a row-major one.
    return (tuple(compressed.shape), tuple(dense.shape), dense.is_contiguous(), transpose_result,
            dense.dtype, dense.device)


def _sparse_mm(compressed: Tensor, dense: Tensor, transpose_result: bool,
               reference: Callable[[], Tensor] | None) -> Tensor:
    """`torch._cslt_sparse_mm` with the algorithm searched once per shape and layout.

    A newly searched algorithm is trusted only after it matches `reference()` (masked dense).
    Without a reference an unseen shape runs algorithm 0, cuSPARSELt's default.
    """
    key = _algorithm_key(compressed, dense, transpose_result)
    if key not in _ALGORITHMS and reference is not None:
        _ALGORITHMS[key] = _search_and_verify(compressed, dense, transpose_result, key, reference)
    return torch._cslt_sparse_mm(compressed, dense, transpose_result=transpose_result,
                                 alg_id=_ALGORITHMS.get(key, 0))


def _check_compress_route(compress: str) -> None:
    if compress not in COMPRESS_ROUTES:
        raise ValueError(f"compress={compress!r} is not one of {COMPRESS_ROUTES}; use 'cslt' unless on sm90")


class CuSparseLtBackend(Backend):
    """2:4 GEMMs through cuSPARSELt (fp16/bf16 CUDA tensors, both dims multiples of 64).

    sparse_input_grad: the mask is transposable, so dX = dY @ W_s runs sparse on W_s^T;
    otherwise dX runs masked dense. Nothing checks this per step (it would cost a sync): a
    row-wise mask with sparse_input_grad=True silently drops values of W_s^T.
    compress: "cslt" (`torch._cslt_compress`, any GPU) or "direct" (`compress_sm90`, the same
    bytes written by torch ops; sm90 only).
    """

    name = "cusparselt"

    def __init__(self, sparse_input_grad: bool, compress: str = "cslt"):
        _check_compress_route(compress)
        self.sparse_input_grad = sparse_input_grad
        self.compress_route = compress

    def _compress(self, matrix: Tensor) -> Tensor:
        if self.compress_route == "direct":
            return compress_sm90(matrix)
        return torch._cslt_compress(matrix)

    def linear(self, x2d, w_masked, need_input_grad):
        rows = x2d.shape[0]
        x_padded = _pad_rows(x2d, _DENSE_ROW_MULTIPLE)
        w_masked = w_masked.contiguous()
        y = _sparse_mm(self._compress(w_masked), x_padded.t(), True,
                       reference=lambda: x_padded @ w_masked.t())[:rows]
        if not need_input_grad:
            return y, None
        if not self.sparse_input_grad:
            return y, w_masked
        compressed_t = self._compress(w_masked.t().contiguous())
        self._prepare_input_grad(compressed_t, w_masked, x_padded.shape[0])
        return y, compressed_t

    @staticmethod
    def _prepare_input_grad(compressed_t: Tensor, w_masked: Tensor, padded_rows: int) -> None:
        """Search and verify the input-grad algorithm now, while W_s is at hand for the reference.

        The operand is random: the algorithm depends on shapes and layout, not on values. It is
        laid out as `input_grad` lays out dY, so both find the same cache entry.
        """
        probe_t = w_masked.new_empty(padded_rows, w_masked.shape[0]).t()
        if _algorithm_key(compressed_t, probe_t, True) in _ALGORITHMS:
            return
        probe_t.normal_()
        _sparse_mm(compressed_t, probe_t, True, reference=lambda: probe_t.t() @ w_masked)

    def input_grad(self, gy2d, ctx):
        if not self.sparse_input_grad:
            return gy2d @ ctx
        rows = gy2d.shape[0]
        gy_padded = _pad_rows(gy2d, _DENSE_ROW_MULTIPLE)
        return _sparse_mm(ctx, gy_padded.t(), True, reference=None)[:rows]

    def sparse_input_linear(self, x_sparse2d, weight):
        rows = x_sparse2d.shape[0]
        x_padded = _pad_rows(x_sparse2d, _SPARSE_ROW_MULTIPLE)
        weight_t = weight.contiguous().t()
        return _sparse_mm(self._compress(x_padded), weight_t, False,
                          reference=lambda: x_padded @ weight_t)[:rows]

    def sparse_input_weight_grad(self, gy2d, x_sparse2d, transposable):
        if not transposable:
            return gy2d.t() @ x_sparse2d
        # dW^T = X_s^T @ dY with X_s^T (in, tokens) as the sparse operand; transpose_result gives dW.
        x_t = _pad_rows(x_sparse2d, _SPARSE_ROW_MULTIPLE).t().contiguous()
        gy_padded = _pad_rows(gy2d, _SPARSE_ROW_MULTIPLE)
        return _sparse_mm(self._compress(x_t), gy_padded, True, reference=lambda: gy_padded.t() @ x_t.t())


def _cusparselt_blockers(out_features: int, in_features: int, device: torch.device, dtype: torch.dtype) -> list[str]:
    """Why cuSPARSELt cannot run this layer here, one short clause per reason (empty if it can)."""
    blockers = []
    if device.type != "cuda":
        blockers.append(f"runs on {device.type}, cuSPARSELt needs CUDA")
    elif not torch.cuda.is_available():
        blockers.append("CUDA is not available")
    elif not torch.backends.cusparselt.is_available():
        blockers.append("this torch build has no cuSPARSELt")
    if dtype not in HALF_DTYPES:
        blockers.append(f"compute dtype {str(dtype).removeprefix('torch.')} is not fp16/bf16")
    for name, size in (("out_features", out_features), ("in_features", in_features)):
        if size % CUSPARSELT_DIM_MULTIPLE:
            blockers.append(f"{name} {size} is not a multiple of {CUSPARSELT_DIM_MULTIPLE}")
    return blockers


def _compress_route(compress: str, device: torch.device) -> tuple[str, str]:
    """The compress route to use on `device`, and a clause for the reason."""
    if compress == "cslt":
        return "cslt", ""
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) != (9, 0):
        return "cslt", f"; compress: cslt (the direct layout is sm90's, this GPU is sm{major}{minor})"
    return "direct", "; compress: direct sm90 layout"


def _cusparselt_reason(out_features: int, in_features: int, sparse_input_grad: bool) -> str:
    if sparse_input_grad:
        reason = "cuSPARSELt: forward and input grad 2:4 (transposable mask), weight grad dense"
    else:
        reason = "cuSPARSELt: forward 2:4; input grad dense (mask not transposable), weight grad dense"
    if min(out_features, in_features) < NARROW_LAYER_FEATURES:
        reason += f"; little gain below {NARROW_LAYER_FEATURES} features (ViT-B MLP measured 0.96x-1.06x)"
    return reason


def resolve_backend(requested: str, out_features: int, in_features: int, device, dtype: torch.dtype,
                    transposable: bool, compress: str = "cslt") -> tuple[Backend, str]:
    """Pick the backend of one (out, in) layer: "auto", "emulated" or "cusparselt".

    Returns the backend and a short sentence for the layer table. `transposable` says whether the
    layer's mask is 2:4 along columns too (then the input grad can run sparse). `compress` picks
    how weights are compressed for cuSPARSELt ("cslt", or "direct" on sm90).
    """
    if requested not in BACKENDS:
        raise ValueError(f"sparsity.backend={requested!r} is not one of {BACKENDS}; use auto unless testing")
    _check_compress_route(compress)
    if requested == "emulated":
        return EmulatedBackend(), "emulated: requested (masked dense)"
    device = torch.device(device)
    blockers = _cusparselt_blockers(out_features, in_features, device, dtype)
    if blockers and requested == "cusparselt":
        raise ValueError(f"sparsity.backend=cusparselt cannot run the {out_features}x{in_features} layer: "
                         f"{'; '.join(blockers)}. Use sparsity.backend=auto or emulated, "
                         "or train in bf16-mixed on CUDA")
    if blockers:
        return EmulatedBackend(), "emulated: " + "; ".join(blockers)
    route, route_clause = _compress_route(compress, device)
    reason = _cusparselt_reason(out_features, in_features, transposable) + route_clause
    return CuSparseLtBackend(sparse_input_grad=transposable, compress=route), reason
