"""`CuSparseLtBackend`: the 2:4 GEMMs of a layer through cuSPARSELt."""
from torch import Tensor

from sparsetrain.gpu.backends.base import Backend, PreparedWeight
from sparsetrain.gpu.backends.cslt_gemm import plans_requested
from sparsetrain.gpu.backends.cslt_ops import (cslt_compress, cslt_input_grad, cslt_linear, cslt_sparse_input_linear,
                                               cslt_sparse_input_weight_grad, fused_compress_masked,
                                               fused_compress_masked_both, fused_prune_activations,
                                               fused_prune_compress, fused_prune_compress_into)
from sparsetrain.sparse.masks import mask_24_transposable

COMPRESS_ROUTES = ("kernel", "cslt", "direct")  # what a CuSparseLtBackend runs; resolve_backend also takes "auto"


def check_compress_route(compress: str, allowed: tuple[str, ...] = COMPRESS_ROUTES) -> None:
    if compress not in allowed:
        raise ValueError(f"compress={compress!r} is not one of {allowed}; use 'cslt' unless on sm90")


class CuSparseLtBackend(Backend):
    """2:4 GEMMs through cuSPARSELt (fp16/bf16 CUDA tensors, both dims multiples of 64).

    sparse_input_grad: the mask is transposable, so dX = dY @ W_s runs sparse on W_s^T;
    otherwise dX runs masked dense. A given mask is not checked per step (it would cost a sync):
    a row-wise mask with sparse_input_grad=True silently drops values of W_s^T.
    compress: how W_s (and W_s^T) are compressed:
      "kernel" - one Triton launch on sm90 (`sparsetrain.gpu.kernels`): prunes |W| and writes the mask,
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
        check_compress_route(compress)
        self.sparse_input_grad = sparse_input_grad
        self.compress_route = compress
        self.plans = plans_requested(plans)

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

    # -- GEMMs (each one custom op, so torch.compile traces around it: see cslt_ops.py) --

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

