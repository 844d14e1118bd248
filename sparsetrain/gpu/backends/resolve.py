"""`resolve_backend`: which backend runs a 2:4 layer where it runs, and why, in one sentence for the layer table."""
import torch

from sparsetrain.gpu.backends.base import Backend, EmulatedBackend
from sparsetrain.gpu.backends.cusparselt import COMPRESS_ROUTES, CuSparseLtBackend, check_compress_route

BACKENDS = ("auto", "emulated", "cusparselt")
HALF_DTYPES = (torch.float16, torch.bfloat16)
CUSPARSELT_DIM_MULTIPLE = 64
# 2:4 GEMMs gain little below this width on an H100 (`scripts/bench.py --only a`: ViT-B against ViT-L MLP shapes).
NARROW_LAYER_FEATURES = 1024


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
    from sparsetrain.gpu import kernels
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
    check_compress_route(compress, ("auto",) + COMPRESS_ROUTES)
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
