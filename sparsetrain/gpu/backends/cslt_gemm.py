"""The cuSPARSELt GEMM of the 2:4 backend: torch's op, or the same GEMM with its plan kept per shape
(`kernels.cslt_plans`), with the algorithm of each shape searched once per machine and checked against masked dense.
"""
import functools
import logging
import os
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from sparsetrain.gpu.choice_cache import ChoiceFile, device_label

logger = logging.getLogger("sparsetrain")

ALGORITHM_MAX_REL_ERROR = 2e-2
PLANS_ENV = "SPARSETRAIN_CSLT_PLANS"  # "1": plan cache, "0": torch._cslt_sparse_mm, unset: plan cache where it builds

# (sparse shape, dense shape, dense contiguous, transpose_result, dtype, device) -> algorithm id, as this
# process verified it. The file keeps the choices across processes (see _choose_algorithm).
_ALGORITHMS: dict[tuple, int] = {}
ALGORITHM_FILE = ChoiceFile("cslt-algorithms.json", "cuSPARSELt algorithm choices")


def pad_rows(t: Tensor, multiple: int) -> Tensor:
    """Contiguous `t` with zero rows appended up to a multiple of `multiple` (zeros change no product)."""
    extra = -t.shape[0] % multiple
    return F.pad(t, (0, 0, 0, extra)) if extra else t.contiguous()


def _relative_error(result: Tensor, reference: Tensor) -> float:
    reference = reference.float()
    return float((result.float() - reference).norm() / reference.norm().clamp_min(1e-30))


def torch_mm(compressed: Tensor, dense: Tensor, transpose_result: bool, alg_id: int,
              bias: Tensor | None = None) -> Tensor:
    return torch._cslt_sparse_mm(compressed, dense, bias=bias, transpose_result=transpose_result, alg_id=alg_id)


def _plans_mm(compressed: Tensor, dense: Tensor, transpose_result: bool, alg_id: int,
              bias: Tensor | None = None) -> Tensor:
    from sparsetrain.gpu.kernels import cslt_plans
    return cslt_plans.sparse_mm(compressed, dense, transpose_result, alg_id, bias=bias)


MatMul = Callable[..., Tensor]


def plans_requested(plans: bool | None) -> bool | None:
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
        from sparsetrain.gpu.kernels import cslt_plans
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


def sparse_mm(compressed: Tensor, dense: Tensor, transpose_result: bool, mm: MatMul,
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


def pick_matmul(plans: bool | None) -> MatMul:
    """The plan cache or torch's op, for a backend's `plans` choice (see CuSparseLtBackend)."""
    if plans is False:
        return torch_mm
    error = _plan_cache_error()
    if error is None:
        return _plans_mm
    if plans:
        raise RuntimeError(f"the cuSPARSELt plan cache was asked for (plans=True or {PLANS_ENV}=1) but cannot "
                           f"run here: {error}. Fix the build (C++ compiler, nvidia-cusparselt wheel headers) "
                           f"or set {PLANS_ENV}=0")
    return torch_mm


# A cached plan holds the bias address, so on the plan path the bias goes through a buffer kept per
# (shape, dtype, device): under autocast the cast bias is a new tensor every step. Layers of one shape
# share it safely, since each copies its bias in right before its own GEMM on the same stream.
_BIAS_BUFFERS: dict[tuple, Tensor] = {}


def epilogue_bias(bias: Tensor | None, mm: MatMul) -> Tensor | None:
    """The bias as the GEMM's epilogue reads it."""
    if bias is None or mm is not _plans_mm:
        return bias
    key = (tuple(bias.shape), bias.dtype, bias.device)
    buffer = _BIAS_BUFFERS.get(key)
    if buffer is None:
        buffer = _BIAS_BUFFERS[key] = torch.empty(bias.shape, dtype=bias.dtype, device=bias.device)
    return buffer.copy_(bias)


def prepare_input_grad(compressed_t: Tensor, masked: Callable[[], Tensor], padded_rows: int, mm: MatMul) -> None:
    """Search and verify the input-grad algorithm of W_s^T compressed (`compressed_t`) now, while W_s
    (`masked()`) is at hand for the reference.

    The operand is random: the algorithm depends on shapes and layout, not on values. It is
    laid out as `cslt_ops.cslt_input_grad` lays out dY (the transpose of a contiguous (rows, out) matrix), so
    both find the same cache entry; once the shape is known nothing is allocated.
    """
    out_features = compressed_t.shape[1] * 16 // 9
    if _algorithm_key(compressed_t, (out_features, padded_rows), False, True) in _ALGORITHMS:
        return
    probe_t = compressed_t.new_empty(padded_rows, out_features).normal_().t()
    sparse_mm(compressed_t, probe_t, True, mm, reference=lambda: probe_t.t() @ masked())

