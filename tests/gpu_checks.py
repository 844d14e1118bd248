"""What the `gpu`-marked tests share: inputs drawn on the CPU from a seed (the same numbers on every machine),
relative-error and bitwise comparisons, and skips for what a test needs beyond CUDA (cuSPARSELt, sm90, the fused
kernel, the plan cache). Without CUDA, conftest.py skips every `gpu`-marked test."""
import pytest
import torch

from sparsetrain.gpu import kernels
from sparsetrain.gpu.backends import cslt_gemm

MAX_REL_ERROR = 1e-2  # bf16 GEMMs of a few thousand terms stay well inside it

needs_cusparselt = pytest.mark.skipif(not torch.backends.cusparselt.is_available(),
                                      reason="this torch build has no cuSPARSELt")


def require_sm90() -> None:
    capability = torch.cuda.get_device_capability()
    if capability != (9, 0):
        pytest.skip(f"the direct sm90 layout applies to sm90 only, this GPU is sm{capability[0]}{capability[1]}")


def require_route(compress: str, plans: bool) -> None:
    """Skip unless this GPU runs the cuSPARSELt compress route `compress` and, with `plans`, the plan cache."""
    if compress == "kernel":
        capability = torch.cuda.get_device_capability()
        if capability != (9, 0) or not kernels.available():
            pytest.skip(f"the fused kernel writes sm90's layout and needs Triton; this GPU is sm{capability[0]}"
                        f"{capability[1]}, Triton available: {kernels.available()}")
    if plans:
        error = cslt_gemm._plan_cache_error()
        if error is not None:
            pytest.skip(f"the cuSPARSELt plan cache does not build here: {error}")


def cpu_randn(*shape, seed, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def cuda_randn(*shape, seed, scale=1.0):
    """bf16 on the GPU."""
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=generator) * scale).to(torch.bfloat16).cuda()


def relative_error(got, reference):
    got, reference = got.detach().float(), reference.detach().float()
    return float((got - reference).norm() / reference.norm())


def assert_close_rel(what, got, reference, limit=MAX_REL_ERROR):
    assert got.shape == reference.shape, f"{what}: shape {tuple(got.shape)} != reference {tuple(reference.shape)}"
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    error = relative_error(got, reference)
    assert error < limit, f"{what}: relative error {error:.3g} (limit {limit})"


def describe_mismatch(got, expected):
    different = got != expected
    return f"{int(different.sum())} of {got.numel()} differ, first at {different.nonzero()[:5].tolist()}"


def assert_same_bits(what, got, expected):
    got, expected = got.reshape(-1).view(torch.int16), expected.reshape(-1).view(torch.int16)
    different = got != expected
    assert not different.any(), (f"{what}: {int(different.sum())} of {got.numel()} 16-bit words differ, first at "
                                 f"{different.nonzero()[:5].flatten().tolist()}")
