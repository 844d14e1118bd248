"""Where the 2:4 GEMMs run: masked dense (`EmulatedBackend`) or cuSPARSELt (`CuSparseLtBackend`).

A weight-sparse layer's step goes through three calls: `prepare_weight` (the mask, pruned now or
given, and the weight's GEMM operands for this step), `linear` (Y = X W_s^T + b) and `input_grad`
(dX = dY W_s). Both backends take the same dense tensors with zeros, so every fast path can be
checked against "mask, then run dense" (the emulated backend, the reference).
`resolve_backend` picks one per layer and says why in one sentence.
"""
import functools
import logging
import os
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from sparsetrain.choice_cache import ChoiceFile, device_label
from sparsetrain.sparse.layout_sm90 import compress_sm90
from sparsetrain.sparse.masks import mask_24_activations, mask_24_transposable
from sparsetrain.sparse.ops import opaque_op

logger = logging.getLogger("sparsetrain")

BACKENDS = ("auto", "emulated", "cusparselt")
COMPRESS_ROUTES = ("kernel", "cslt", "direct")  # what a CuSparseLtBackend runs; resolve_backend also takes "auto"
HALF_DTYPES = (torch.float16, torch.bfloat16)
CUSPARSELT_DIM_MULTIPLE = 64
# 2:4 GEMMs gain little below this width on an H100 (`scripts/bench.py --only a`: ViT-B against ViT-L MLP shapes).
NARROW_LAYER_FEATURES = 1024
ALGORITHM_MAX_REL_ERROR = 2e-2
PLANS_ENV = "SPARSETRAIN_CSLT_PLANS"  # "1": plan cache, "0": torch._cslt_sparse_mm, unset: plan cache where it builds
_DENSE_ROW_MULTIPLE = 16  # token rows of a dense cuSPARSELt operand
_SPARSE_ROW_MULTIPLE = 64  # token rows of a sparse (compressed) operand: the sm90 tile size

# (sparse shape, dense shape, dense contiguous, transpose_result, dtype, device) -> algorithm id, as this
# process verified it. The file keeps the choices across processes (see _choose_algorithm).
_ALGORITHMS: dict[tuple, int] = {}
ALGORITHM_FILE = ChoiceFile("cslt-algorithms.json", "cuSPARSELt algorithm choices")


@dataclass(frozen=True)
class PreparedWeight:
    """A layer's 2:4 weight for one step, in the form its backend's GEMMs take.

    forward: W_s for Y = X W_s^T, masked dense (emulated) or compressed (cuSPARSELt).
    input_grad: the operand of dX = dY W_s (W_s dense, or W_s^T compressed); None when no dX is wanted.
    weight, mask: what it was made from; cuSPARSELt checks a newly searched algorithm against them.
    """

    forward: Tensor
    input_grad: Tensor | None
    weight: Tensor
    mask: Tensor

    def masked(self) -> Tensor:
        """W_s as masked dense (made on demand: only a first call per shape needs it)."""
        return self.weight.masked_fill(~self.mask, 0)


class Backend(ABC):
    """Runs a layer's 2:4 GEMMs. One instance per layer."""

    name: str

    @abstractmethod
    def prepare_weight(self, weight: Tensor, mask: Tensor | None = None,
                       need_input_grad: bool = True) -> tuple[Tensor, PreparedWeight]:
        """The mask and this step's GEMM operands of `weight` (out, in) in the compute dtype.

        mask None: prune now to the transposable 2:4 mask of |weight| (== mask_24_transposable);
        else the given bool mask (weight's shape; row-wise masks come this way). No autograd.
        """

    def refresh_weight(self, weight: Tensor, mask: Tensor, flips: Tensor, need_input_grad: bool = True) -> PreparedWeight:
        """A training step's mask refresh: prune `weight` to its transposable 2:4 mask, written over `mask`
        (the layer's buffer) in place, add the number of entries that changed to `flips` (int64 scalar),
        and return the GEMM operands. No autograd, no sync."""
        new_mask, prepared = self.prepare_weight(weight, None, need_input_grad)
        flips.add_(torch.count_nonzero(mask ^ new_mask))
        mask.copy_(new_mask)
        return prepared

    @abstractmethod
    def linear(self, x2d: Tensor, prepared: PreparedWeight, bias: Tensor | None) -> Tensor:
        """Y = X @ W_s^T + b; `bias` (out,) is in the output dtype."""

    @abstractmethod
    def input_grad(self, gy2d: Tensor, operand: Tensor) -> Tensor:
        """dX = dY @ W_s, with `operand` = `PreparedWeight.input_grad`."""

    def prune_activations(self, x2d: Tensor, transposable: bool) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """Activation 2:4 of x2d (tokens, in) by |x| (masks.mask_24_activations): (X_s, mask, compressed,
        compressed_t). The compressed forms are the sparse GEMMs' operands where this backend makes them in
        the same pass (None: the GEMM compresses X_s itself). No autograd."""
        mask = mask_24_activations(x2d, transposable)
        return x2d.masked_fill(~mask, 0), mask, None, None

    @abstractmethod
    def sparse_input_linear(self, x_sparse2d: Tensor, weight: Tensor, compressed: Tensor | None = None) -> Tensor:
        """Y = X_s @ W^T where X_s (tokens, in) is 2:4 along its rows (activation sparsity);
        `compressed`: X_s as `prune_activations` compressed it, if it did."""

    @abstractmethod
    def sparse_input_weight_grad(self, gy2d: Tensor, x_sparse2d: Tensor, transposable: bool,
                                 compressed_t: Tensor | None = None) -> Tensor:
        """dW = dY^T @ X_s; `transposable` says X_s^T is 2:4 too (2:4 along tokens); `compressed_t`: X_s^T
        as `prune_activations` compressed it, if it did."""


class EmulatedBackend(Backend):
    """Masked dense matmuls: any device, any dtype. The reference for every fast path."""

    name = "emulated"

    def prepare_weight(self, weight, mask=None, need_input_grad=True):
        if mask is None:
            mask = mask_24_transposable(weight.abs())
        w_masked = weight.masked_fill(~mask, 0)
        return mask, PreparedWeight(w_masked, w_masked if need_input_grad else None, weight, mask)

    def linear(self, x2d, prepared, bias):
        y = x2d @ prepared.forward.t()
        return y if bias is None else y + bias

    def input_grad(self, gy2d, operand):
        return gy2d @ operand

    def sparse_input_linear(self, x_sparse2d, weight, compressed=None):
        return x_sparse2d @ weight.t()

    def sparse_input_weight_grad(self, gy2d, x_sparse2d, transposable, compressed_t=None):
        return gy2d.t() @ x_sparse2d


def _pad_rows(t: Tensor, multiple: int) -> Tensor:
    """Contiguous `t` with zero rows appended up to a multiple of `multiple` (zeros change no product)."""
    extra = -t.shape[0] % multiple
    return F.pad(t, (0, 0, 0, extra)) if extra else t.contiguous()


def _relative_error(result: Tensor, reference: Tensor) -> float:
    reference = reference.float()
    return float((result.float() - reference).norm() / reference.norm().clamp_min(1e-30))


# ---- the GEMM itself: torch's op, or the same GEMM with its cuSPARSELt plan kept per shape ----

def _torch_mm(compressed: Tensor, dense: Tensor, transpose_result: bool, alg_id: int,
              bias: Tensor | None = None) -> Tensor:
    return torch._cslt_sparse_mm(compressed, dense, bias=bias, transpose_result=transpose_result, alg_id=alg_id)


def _plans_mm(compressed: Tensor, dense: Tensor, transpose_result: bool, alg_id: int,
              bias: Tensor | None = None) -> Tensor:
    from sparsetrain.kernels import cslt_plans
    return cslt_plans.sparse_mm(compressed, dense, transpose_result, alg_id, bias=bias)


MatMul = Callable[..., Tensor]


def _plans_requested(plans: bool | None) -> bool | None:
    """True/False when forced (by the argument, else by $SPARSETRAIN_CSLT_PLANS), None: where it builds."""
    if plans is not None:
        return bool(plans)
    value = os.environ.get(PLANS_ENV, "").strip().lower()
    if value in ("", "auto"):
        return None
    if value in ("0", "1"):
        return value == "1"
    raise ValueError(f"{PLANS_ENV}={value!r}: use 1 (cuSPARSELt plan cache), 0 (torch._cslt_sparse_mm) "
                     "or leave it unset (plan cache where it builds)")


@functools.cache
def _plan_cache_error() -> str | None:
    """Why the plan cache cannot run in this process (None when it can). Tried, and logged, once."""
    try:
        from sparsetrain.kernels import cslt_plans
        cslt_plans.load()
    except Exception as error:  # noqa: BLE001 - any build or load failure means: use torch's op
        reason = f"{type(error).__name__}: {error}"
        logger.warning("cuSPARSELt plan cache unavailable, eager sparse GEMMs use torch._cslt_sparse_mm "
                       "(several times the host time per call): %s", reason)
        return reason
    return None


# The algorithm search is only run where it has been seen to work. On the H100 (torch 2.11, cuSPARSELt
# 0.8) an fp16 search at 2048x1024 @ 1024x4096 failed inside cusparseLtMatmulSearch and left the CUDA
# context broken for the rest of the process (docs/design.md); fp16 therefore
# runs algorithm 0. bf16 searches were verified at every ViT shape in the same run.
SEARCHABLE_DTYPES = (torch.bfloat16,)


def _algorithm_key(compressed: Tensor, dense_shape, dense_contiguous: bool, transpose_result: bool) -> tuple:
    # cuSPARSELt reads a non-contiguous dense operand as the transpose of a row-major one.
    return (tuple(compressed.shape), tuple(dense_shape), dense_contiguous, transpose_result,
            compressed.dtype, compressed.device)


def _algorithm_text(key: tuple) -> str:
    """`key` as the algorithm file spells it, with the GPU and the versions the choice holds for."""
    sparse, dense, dense_contiguous, transpose_result, dtype, device = key
    return (f"{sparse[0]}x{sparse[1]}|{dense[0]}x{dense[1]}|{'contiguous' if dense_contiguous else 'transposed'}|"
            f"{'transpose_result' if transpose_result else 'result'}|{str(dtype).removeprefix('torch.')}|"
            f"{device_label(device)}|torch{torch.__version__}|cusparselt{torch.backends.cusparselt.version()}")


def _algorithm_error(algorithm: int, compressed: Tensor, dense: Tensor, transpose_result: bool, mm: MatMul,
                     reference: Callable[[], Tensor]) -> float:
    return _relative_error(mm(compressed, dense, transpose_result, algorithm), reference())


def _choose_algorithm(compressed: Tensor, dense: Tensor, transpose_result: bool, key: tuple, mm: MatMul,
                      reference: Callable[[], Tensor]) -> int:
    """The algorithm for `key`: the one stored for this GPU and these versions if it still matches the
    reference (checked once per process: it is one GEMM), else searched, checked and stored now."""
    text = _algorithm_text(key)
    stored = ALGORITHM_FILE.read().get(text)
    if isinstance(stored, int):
        error = _algorithm_error(stored, compressed, dense, transpose_result, mm, reference)
        if error < ALGORITHM_MAX_REL_ERROR:
            return stored
        warnings.warn(f"cuSPARSELt algorithm {stored}, stored in {ALGORITHM_FILE.path} for {text}, is off by "
                      f"{error:.3g} relative to masked dense now; searching again")
    algorithm = int(torch._cslt_sparse_mm_search(compressed, dense, transpose_result=transpose_result))
    error = _algorithm_error(algorithm, compressed, dense, transpose_result, mm, reference)
    if error >= ALGORITHM_MAX_REL_ERROR:
        warnings.warn(f"cuSPARSELt algorithm {algorithm} (searched) is off by {error:.3g} relative to masked "
                      f"dense for {text}; this shape uses algorithm 0. Report it with your torch and GPU versions.")
        algorithm = 0
    ALGORITHM_FILE.persist(text, algorithm)
    return algorithm


def _sparse_mm(compressed: Tensor, dense: Tensor, transpose_result: bool, mm: MatMul,
               reference: Callable[[], Tensor] | None, bias: Tensor | None = None) -> Tensor:
    """`mm` with the algorithm chosen once per shape and layout (searched once per machine: see
    `_choose_algorithm`).

    An algorithm is trusted only after it matches `reference()` (masked dense, no bias), run through
    `mm` itself. Without a reference an unseen shape runs algorithm 0, cuSPARSELt's default.
    """
    key = _algorithm_key(compressed, dense.shape, dense.is_contiguous(), transpose_result)
    if key not in _ALGORITHMS and reference is not None and compressed.dtype in SEARCHABLE_DTYPES:
        _ALGORITHMS[key] = _choose_algorithm(compressed, dense, transpose_result, key, mm, reference)
    return mm(compressed, dense, transpose_result, _ALGORITHMS.get(key, 0), bias)


def _check_compress_route(compress: str, allowed: tuple[str, ...] = COMPRESS_ROUTES) -> None:
    if compress not in allowed:
        raise ValueError(f"compress={compress!r} is not one of {allowed}; use 'cslt' unless on sm90")


class CuSparseLtBackend(Backend):
    """2:4 GEMMs through cuSPARSELt (fp16/bf16 CUDA tensors, both dims multiples of 64).

    sparse_input_grad: the mask is transposable, so dX = dY @ W_s runs sparse on W_s^T;
    otherwise dX runs masked dense. A given mask is not checked per step (it would cost a sync):
    a row-wise mask with sparse_input_grad=True silently drops values of W_s^T.
    compress: how W_s (and W_s^T) are compressed:
      "kernel" - one Triton launch on sm90 (`sparsetrain.kernels`): prunes |W| and writes the mask,
                 W_s and W_s^T; or, for a given mask, W_s and W_s^T. Transposable masks only.
      "cslt"   - the mask by masks.py, then `torch._cslt_compress` once or twice (any GPU).
      "direct" - as "cslt" with `compress_sm90` (the same bytes by torch ops; sm90 only).
    plans: weight GEMMs through `kernels.cslt_plans` (one cuSPARSELt plan kept per shape, a fraction of the
    op's host time per call: bench.py c; same bits): True, False, or None for
    $SPARSETRAIN_CSLT_PLANS ("1" / "0"; unset: where the plan cache builds, else torch's op).
    Activation-sparse GEMMs always run `torch._cslt_sparse_mm`.
    """

    name = "cusparselt"

    def __init__(self, sparse_input_grad: bool, compress: str = "cslt", plans: bool | None = None):
        _check_compress_route(compress)
        self.sparse_input_grad = sparse_input_grad
        self.compress_route = compress
        self.plans = _plans_requested(plans)

    # -- the weight's operands --

    def _compress(self, matrix: Tensor) -> Tensor:
        return cslt_compress(matrix, self.compress_route)

    def prepare_weight(self, weight, mask=None, need_input_grad=True):
        if self.compress_route == "kernel":
            if not self.sparse_input_grad:
                # Row-wise weight masks: the kernel's activation mode is for activations, not weights.
                raise ValueError("compress='kernel' prunes and compresses transposable weight masks only; use "
                                 "compress='cslt' for a row-wise weight mask (sparse_input_grad=False)")
            return self._prepare_with_kernel(weight, mask, need_input_grad)
        if mask is None:
            mask = mask_24_transposable(weight.abs())
        w_masked = weight.masked_fill(~mask, 0)
        if not need_input_grad:
            operand = None
        elif self.sparse_input_grad:
            operand = self._compress(w_masked.t().contiguous())
        else:
            operand = w_masked
        return mask, PreparedWeight(self._compress(w_masked), operand, weight, mask)

    def refresh_weight(self, weight, mask, flips, need_input_grad=True):
        if self.compress_route != "kernel":
            return super().refresh_weight(weight, mask, flips, need_input_grad)
        # The kernel writes the mask and counts the flips itself: no xor, count, add and copy launches.
        compressed, compressed_t = fused_prune_compress_into(weight, mask, flips)
        return PreparedWeight(compressed, compressed_t if need_input_grad else None, weight, mask)

    @staticmethod
    def _prepare_with_kernel(weight: Tensor, mask: Tensor | None,
                             need_input_grad: bool) -> tuple[Tensor, PreparedWeight]:
        """One launch instead of the mask's torch ops and two `_cslt_compress` (`scripts/bench.py --only b`
        times both); same mask and same bytes."""
        if mask is None:
            compressed, compressed_t, mask = fused_prune_compress(weight)
        elif need_input_grad:
            compressed, compressed_t = fused_compress_masked_both(weight, mask)
        else:
            compressed = fused_compress_masked(weight, mask)
        return mask, PreparedWeight(compressed, compressed_t if need_input_grad else None, weight, mask)

    # -- GEMMs (each one custom op, so torch.compile traces around it: see sparse/ops.py) --

    def linear(self, x2d, prepared, bias):
        compressed_t = prepared.input_grad if self.sparse_input_grad else None
        return cslt_linear(x2d, prepared.forward, prepared.weight, prepared.mask, bias, compressed_t, self.plans)

    def input_grad(self, gy2d, operand):
        if not self.sparse_input_grad:
            return gy2d @ operand
        return cslt_input_grad(gy2d, operand, self.plans)

    def prune_activations(self, x2d, transposable):
        if self.compress_route != "kernel":
            return super().prune_activations(x2d, transposable)
        x_sparse, mask, compressed, compressed_t = fused_prune_activations(x2d, transposable)
        return x_sparse, mask, compressed, compressed_t if transposable else None

    def sparse_input_linear(self, x_sparse2d, weight, compressed=None):
        return cslt_sparse_input_linear(x_sparse2d, weight, self.compress_route, compressed)

    def sparse_input_weight_grad(self, gy2d, x_sparse2d, transposable, compressed_t=None):
        if not transposable:
            return gy2d.t() @ x_sparse2d
        return cslt_sparse_input_weight_grad(gy2d, x_sparse2d, self.compress_route, compressed_t)


# ---- the cuSPARSELt calls of CuSparseLtBackend, each registered as a custom op (sparse/ops.py) ----

def _pick_matmul(plans: bool | None) -> MatMul:
    """The plan cache or torch's op, for a backend's `plans` choice (see CuSparseLtBackend)."""
    if plans is False:
        return _torch_mm
    error = _plan_cache_error()
    if error is None:
        return _plans_mm
    if plans:
        raise RuntimeError(f"the cuSPARSELt plan cache was asked for (plans=True or {PLANS_ENV}=1) but cannot "
                           f"run here: {error}. Fix the build (C++ compiler, nvidia-cusparselt wheel headers) "
                           f"or set {PLANS_ENV}=0")
    return _torch_mm


# A cached plan holds the bias address, so on the plan path the bias goes through a buffer kept per
# (shape, dtype, device): under autocast the cast bias is a new tensor every step. Layers of one shape
# share it safely, since each copies its bias in right before its own GEMM on the same stream.
_BIAS_BUFFERS: dict[tuple, Tensor] = {}


def _epilogue_bias(bias: Tensor | None, mm: MatMul) -> Tensor | None:
    """The bias as the GEMM's epilogue reads it."""
    if bias is None or mm is not _plans_mm:
        return bias
    key = (tuple(bias.shape), bias.dtype, bias.device)
    buffer = _BIAS_BUFFERS.get(key)
    if buffer is None:
        buffer = _BIAS_BUFFERS[key] = torch.empty(bias.shape, dtype=bias.dtype, device=bias.device)
    return buffer.copy_(bias)


def _compress_with(matrix: Tensor, route: str) -> Tensor:
    """cuSPARSELt's compressed form of a 2:4 matrix, by torch's op or by `compress_sm90` ("direct")."""
    if route == "direct":
        return compress_sm90(matrix)
    return torch._cslt_compress(matrix).view(matrix.shape[0], -1)


def _compressed_like(matrix: Tensor) -> Tensor:
    m, k = matrix.shape
    return matrix.new_empty(m, k // 2 + k // 16)  # values, then 4 bits of metadata per group of 4


def _prepare_input_grad(compressed_t: Tensor, masked: Callable[[], Tensor], padded_rows: int, mm: MatMul) -> None:
    """Search and verify the input-grad algorithm now, while W_s is at hand for the reference.

    The operand is random: the algorithm depends on shapes and layout, not on values. It is
    laid out as `cslt_input_grad` lays out dY (the transpose of a contiguous (rows, out) matrix), so
    both find the same cache entry; once the shape is known nothing is allocated.
    """
    out_features = compressed_t.shape[1] * 16 // 9
    if _algorithm_key(compressed_t, (out_features, padded_rows), False, True) in _ALGORITHMS:
        return
    probe_t = compressed_t.new_empty(padded_rows, out_features).normal_().t()
    _sparse_mm(compressed_t, probe_t, True, mm, reference=lambda: probe_t.t() @ masked())


@opaque_op("cslt_prune_compress", lambda w: (_compressed_like(w), _compressed_like(w.t()),
                                             torch.empty_like(w, dtype=torch.bool)))
def fused_prune_compress(w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The fused kernel's prune mode: W_s and W_s^T compressed, and the mask of |w|."""
    from sparsetrain.kernels import prune_compress_transposable
    return prune_compress_transposable(w, want_mask=True)


@opaque_op("cslt_prune_compress_into", lambda w, mask, flips: (_compressed_like(w), _compressed_like(w.t())),
           mutates=("mask", "flips"))
def fused_prune_compress_into(w: Tensor, mask: Tensor, flips: Tensor) -> tuple[Tensor, Tensor]:
    """The fused kernel's prune mode writing the layer's mask in place and counting its flips."""
    from sparsetrain.kernels import prune_compress_into
    return prune_compress_into(w, mask, flips)


def _activations_fake(x2d: Tensor, transposable: bool):
    padded = x2d.new_empty(x2d.shape[0] + -x2d.shape[0] % _SPARSE_ROW_MULTIPLE, x2d.shape[1])
    return (torch.empty_like(x2d), torch.empty_like(x2d, dtype=torch.bool), _compressed_like(padded),
            _compressed_like(padded.t()) if transposable else x2d.new_empty(0))


@opaque_op("cslt_prune_activations", _activations_fake)
def fused_prune_activations(x2d: Tensor, transposable: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The fused kernel's activation mode: (X_s, mask, X_s compressed, X_s^T compressed or an empty tensor),
    the compressed forms with the tokens padded to the sparse operand's 64 rows."""
    from sparsetrain.kernels import prune_activations
    rows = x2d.shape[0]
    c, c_t, mask, x_sparse = prune_activations(_pad_rows(x2d, _SPARSE_ROW_MULTIPLE), transposable)
    return x_sparse[:rows], mask[:rows], c, c_t if transposable else c.new_empty(0)


@opaque_op("cslt_compress_masked", lambda w, mask: _compressed_like(w))
def fused_compress_masked(w: Tensor, mask: Tensor) -> Tensor:
    """The fused kernel's given-mask mode, W_s only."""
    from sparsetrain.kernels import compress_masked
    return compress_masked(w, mask, transposed=False)[0]


@opaque_op("cslt_compress_masked_both", lambda w, mask: (_compressed_like(w), _compressed_like(w.t())))
def fused_compress_masked_both(w: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """The fused kernel's given-mask mode, W_s and W_s^T."""
    from sparsetrain.kernels import compress_masked
    return compress_masked(w, mask, transposed=True)


@opaque_op("cslt_compress", lambda matrix, route: _compressed_like(matrix))
def cslt_compress(matrix: Tensor, route: str) -> Tensor:
    """`_compress_with` as an op (torch._cslt_compress has no fake implementation to trace)."""
    return _compress_with(matrix, route)


@opaque_op("cslt_linear", lambda x2d, compressed, *_: x2d.new_empty(x2d.shape[0], compressed.shape[0]))
def cslt_linear(x2d: Tensor, compressed: Tensor, weight: Tensor, mask: Tensor, bias: Optional[Tensor],
                compressed_t: Optional[Tensor], plans: Optional[bool]) -> Tensor:
    """Y = X W_s^T + b, the bias in the GEMM's epilogue; `weight` and `mask` give the reference that a
    newly searched algorithm is checked against. With `compressed_t`, dX's algorithm is searched too."""
    rows = x2d.shape[0]
    x_padded = _pad_rows(x2d, _DENSE_ROW_MULTIPLE)
    mm = _pick_matmul(plans)
    masked = lambda: weight.masked_fill(~mask, 0)  # noqa: E731 - made only for a search
    y = _sparse_mm(compressed, x_padded.t(), True, mm, bias=_epilogue_bias(bias, mm),
                   reference=lambda: x_padded @ masked().t())[:rows]
    if compressed_t is not None:
        _prepare_input_grad(compressed_t, masked, x_padded.shape[0], mm)
    return y


@opaque_op("cslt_input_grad", lambda gy2d, compressed_t, plans: gy2d.new_empty(gy2d.shape[0], compressed_t.shape[0]))
def cslt_input_grad(gy2d: Tensor, compressed_t: Tensor, plans: Optional[bool]) -> Tensor:
    """dX = dY W_s with W_s^T compressed (its algorithm was searched by `cslt_linear`)."""
    rows = gy2d.shape[0]
    gy_padded = _pad_rows(gy2d, _DENSE_ROW_MULTIPLE)
    return _sparse_mm(compressed_t, gy_padded.t(), True, _pick_matmul(plans), reference=None)[:rows]


@opaque_op("cslt_sparse_input_linear", lambda x_sparse2d, weight, route, compressed:
           x_sparse2d.new_empty(x_sparse2d.shape[0], weight.shape[0]))
def cslt_sparse_input_linear(x_sparse2d: Tensor, weight: Tensor, route: str, compressed: Optional[Tensor]) -> Tensor:
    """Y = X_s W^T with the 2:4 activations X_s compressed as the sparse operand (`compressed`, made by
    the prune pass with the tokens padded to 64 rows, or compressed here)."""
    rows = x_sparse2d.shape[0]
    x_padded = _pad_rows(x_sparse2d, _SPARSE_ROW_MULTIPLE)
    weight_t = weight.contiguous().t()
    operand = _compress_with(x_padded, route) if compressed is None else compressed
    return _sparse_mm(operand, weight_t, False, _torch_mm, reference=lambda: x_padded @ weight_t)[:rows]


@opaque_op("cslt_sparse_input_weight_grad", lambda gy2d, x_sparse2d, route, compressed_t:
           gy2d.new_empty(gy2d.shape[1], x_sparse2d.shape[1]))
def cslt_sparse_input_weight_grad(gy2d: Tensor, x_sparse2d: Tensor, route: str,
                                  compressed_t: Optional[Tensor]) -> Tensor:
    """dW = dY^T X_s with X_s^T (in, tokens), 2:4 along tokens, as the sparse operand (`compressed_t`, made
    by the prune pass, or compressed here)."""
    x_t = _pad_rows(x_sparse2d, _SPARSE_ROW_MULTIPLE).t().contiguous()
    gy_padded = _pad_rows(gy2d, _SPARSE_ROW_MULTIPLE)
    operand = _compress_with(x_t, route) if compressed_t is None else compressed_t
    # transpose_result gives dW directly from dW^T = X_s^T @ dY.
    return _sparse_mm(operand, gy_padded, True, _torch_mm, reference=lambda: gy_padded.t() @ x_t.t())


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
    return blockers + cusparselt_shape_blockers(out_features, in_features)


def cusparselt_shape_blockers(out_features: int, in_features: int) -> list[str]:
    """The clauses of _cusparselt_blockers that the layer's shape alone decides (known before it runs)."""
    return [f"{name} {size} is not a multiple of {CUSPARSELT_DIM_MULTIPLE}"
            for name, size in (("out_features", out_features), ("in_features", in_features))
            if size % CUSPARSELT_DIM_MULTIPLE]


def _compress_route(compress: str, device: torch.device, transposable: bool, activations: bool) -> tuple[str, str]:
    """The compress route to use on `device`, and a clause for the reason.

    "auto" is the fused kernel where it runs (sm90, Triton; for weights a transposable mask, for
    activations either mask), else "cslt".
    """
    if compress == "cslt":
        return "cslt", ""
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) != (9, 0):
        why = "" if compress == "auto" else f" (the {compress} route writes sm90's layout, this GPU is sm{major}{minor})"
        return "cslt", f"; compress: cslt{why}"
    if compress == "direct":
        return "direct", "; compress: direct sm90 layout"
    if not (transposable or activations):
        return "cslt", "; compress: cslt (the fused kernel prunes transposable weight masks)"
    from sparsetrain import kernels
    if not kernels.available(device):
        return "cslt", "; compress: cslt (Triton is missing, so no fused prune+compress kernel)"
    return "kernel", "; compress: fused prune+compress kernel"


def _cusparselt_reason(sparse_input_grad: bool, activations: bool) -> str:
    if activations:
        weight_grad = "2:4 too (transposable mask)" if sparse_input_grad else "dense"
        return f"cuSPARSELt: forward 2:4 on the pruned input activations, weight grad {weight_grad}"
    if sparse_input_grad:
        reason = "cuSPARSELt: forward and input grad 2:4 (transposable mask), weight grad dense"
    else:
        reason = "cuSPARSELt: forward 2:4; input grad dense (mask not transposable), weight grad dense"
    return reason


def resolve_backend(requested: str, out_features: int, in_features: int, device, dtype: torch.dtype,
                    transposable: bool, compress: str = "auto", plans: bool | None = None,
                    activations: bool = False) -> tuple[Backend, str]:
    """Pick the backend of one (out, in) layer: "auto", "emulated" or "cusparselt".

    Returns the backend and a short sentence for the layer table. `transposable` says whether the
    layer's mask is 2:4 along columns too (then the input grad can run sparse). `compress` picks
    how weights are compressed for cuSPARSELt: "auto" (the fused kernel on sm90 for transposable
    masks, else "cslt"), "kernel", "cslt", or "direct"; a route this GPU cannot run falls back to
    "cslt" and the reason says so. `plans`: see CuSparseLtBackend. `activations`: the layer prunes its
    input activations (act24), whose masks the fused kernel serves row-wise too.
    """
    if requested == "triton_bsr":
        raise ValueError("sparsity.backend=triton_bsr runs block sparsity (sparsity.pattern=block); for 2:4 "
                         f"use one of {BACKENDS}")
    if requested not in BACKENDS:
        raise ValueError(f"sparsity.backend={requested!r} is not one of {BACKENDS}; use auto unless testing")
    _check_compress_route(compress, ("auto",) + COMPRESS_ROUTES)
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
    narrowest = min(out_features, in_features)
    if requested == "auto" and narrowest < NARROW_LAYER_FEATURES:
        return EmulatedBackend(), (
            f"emulated (masked dense): {narrowest} features is below {NARROW_LAYER_FEATURES}, where cuSPARSELt "
            "measured no gain on an H100 (ViT-B MLP shapes, scripts/bench.py --only a); sparsity.backend=cusparselt "
            "forces it")
    route, route_clause = _compress_route(compress, device, transposable, activations)
    reason = _cusparselt_reason(transposable, activations) + route_clause
    return CuSparseLtBackend(sparse_input_grad=transposable, compress=route, plans=plans), reason
