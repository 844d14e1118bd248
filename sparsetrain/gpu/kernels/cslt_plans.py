"""`sparse_mm`: torch._cslt_sparse_mm's GEMM with its cuSPARSELt plan built once per shape.

torch._cslt_sparse_mm rebuilds descriptors and a plan at every call, which costs more CPU time than the GEMM
takes on the GPU at ViT sizes (`scripts/bench.py --only c` measures it). `cslt_plans.cpp` keeps one plan per
(shapes, layout, dtype, algorithm) and is called through ctypes. It is compiled on first use with
the system C++ compiler against the cusparseLt.h that ships in the nvidia-cusparselt wheel, and
links the libcusparseLt.so.0 that torch itself loads. No torch C++ headers, so no ABI coupling.

Only the layout our 2:4 linears use is offered: A compressed (m, k), B given as `x.t()` of a
contiguous (n, k) x or as a contiguous (k, n) matrix, result (n, m) when transpose_result.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import pathlib
import shutil
import subprocess
import threading

import torch

from sparsetrain.cache import cache_dir

_SOURCE = pathlib.Path(__file__).with_name("cslt_plans.cpp")
_lock = threading.Lock()
_lib = None
_plans: dict = {}  # key -> (plan pointer, workspace tensor or None)


def _site_dirs() -> list[pathlib.Path]:
    import nvidia  # namespace package of the CUDA wheels torch depends on
    return [pathlib.Path(p) for p in nvidia.__path__]


def _find(name: str, candidates: list[pathlib.Path]) -> pathlib.Path:
    for directory in candidates:
        if (directory / name).exists():
            return directory
    raise RuntimeError(f"cannot find {name} in {[str(c) for c in candidates]}; install the nvidia-cusparselt "
                       "and CUDA wheels torch uses, or set CUDA_HOME")


def _build() -> pathlib.Path:
    sites = _site_dirs()
    cuda_home = pathlib.Path(os.environ.get("CUDA_HOME", "/usr/local/cuda"))
    lt_include = _find("cusparseLt.h", [s / "cusparselt" / "include" for s in sites])
    lt_lib = _find("libcusparseLt.so.0", [s / "cusparselt" / "lib" for s in sites])
    # The toolkit's headers first (the wheels' copies lack crt/), then wherever cusparse.h lives.
    cuda_include = _find("driver_types.h", [cuda_home / "include"] + [s / sub / "include" for s in sites
                                                                         for sub in ("cu13", "cu12", "cuda_runtime")])
    cusparse_include = _find("cusparse.h", [cuda_home / "include"] + [s / sub / "include" for s in sites
                                                                        for sub in ("cu13", "cu12", "cusparse")])
    tag = hashlib.sha256(_SOURCE.read_bytes() + str(lt_lib).encode()).hexdigest()[:16]
    cache = cache_dir()
    target = cache / f"cslt_plans-{tag}.so"
    if target.exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        raise RuntimeError("no C++ compiler found to build the cuSPARSELt plan cache; set CXX or use "
                           "torch._cslt_sparse_mm")
    tmp = target.with_suffix(f".{os.getpid()}.tmp")
    cmd = [compiler, "-O2", "-std=c++17", "-shared", "-fPIC", str(_SOURCE), "-o", str(tmp), f"-I{lt_include}", f"-I{cuda_include}", f"-I{cusparse_include}",
           f"-L{lt_lib}", "-l:libcusparseLt.so.0", f"-Wl,-rpath,{lt_lib}"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        # The compiler's first lines name the cause; the command is last because it is long.
        raise RuntimeError(f"building the cuSPARSELt plan cache failed:\n{done.stderr[:1500]}\ncommand: {' '.join(cmd)}")
    tmp.replace(target)  # atomic: concurrent builders each write their own tmp
    return target


def _library():
    global _lib
    with _lock:
        if _lib is None:
            torch.cuda.init()  # torch loads libcusparseLt first, so ours resolves to the same copy
            lib = ctypes.CDLL(str(_build()))
            lib.st_plan_create.argtypes = [ctypes.c_int64] * 3 + [ctypes.c_int] * 4 + [
                ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_size_t)]
            lib.st_plan_create.restype = ctypes.c_int
            lib.st_matmul.argtypes = [ctypes.c_void_p] * 6
            lib.st_matmul.restype = ctypes.c_int
            lib.st_error_name.argtypes = [ctypes.c_int]
            lib.st_error_name.restype = ctypes.c_char_p
            _lib = lib
    return _lib


def load() -> None:
    """Build (first use) and load the shim now; raises with the compiler's or loader's reason if it cannot."""
    _library()


def _check(lib, status: int, what: str) -> None:
    if status != 0:
        raise RuntimeError(f"cuSPARSELt {what} failed: {lib.st_error_name(status).decode()} ({status})")


def _plan(lib, m, n, k, dense_row_major, transpose_result, dtype, alg_id, device, bias_ptr):
    key = (m, n, k, dense_row_major, transpose_result, dtype, alg_id, device, bias_ptr)
    entry = _plans.get(key)
    if entry is None:
        plan, workspace = ctypes.c_void_p(), ctypes.c_size_t()
        _check(lib, lib.st_plan_create(m, n, k, int(dense_row_major), int(transpose_result),
                                       int(dtype == torch.float16), alg_id, bias_ptr, ctypes.byref(plan),
                                       ctypes.byref(workspace)), "plan init")
        buffer = torch.empty(workspace.value, dtype=torch.uint8, device=device) if workspace.value else None
        entry = _plans[key] = (plan.value, buffer)
    return entry


def sparse_mm(compressed: torch.Tensor, dense: torch.Tensor, transpose_result: bool = True,
              alg_id: int = 0, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Same result as torch._cslt_sparse_mm(compressed, dense, bias, transpose_result=..., alg_id=...).

    compressed: (m, k/2 + k/16) from torch._cslt_compress or the prune_compress kernel.
    dense: (k, n), either contiguous or the transpose of a contiguous (n, k) tensor.
    bias: None or a contiguous (m,) vector of the same dtype; one plan is kept per bias storage,
    so pass long-lived tensors (a layer's bias parameter), not fresh temporaries.
    """
    if dense.dtype not in (torch.float16, torch.bfloat16) or compressed.dtype != dense.dtype:
        raise ValueError(f"sparse_mm takes fp16/bf16 operands of one dtype, got {compressed.dtype} and {dense.dtype}")
    lib = _library()
    k, n = dense.shape
    m = compressed.numel() * 16 // 9 // k
    row_major = dense.is_contiguous()
    if not (row_major or dense.t().is_contiguous()):
        raise ValueError("the dense operand must be contiguous or the transpose of a contiguous tensor")
    if bias is not None and (bias.dtype != dense.dtype or bias.shape != (m,) or not bias.is_contiguous()):
        raise ValueError(f"bias must be a contiguous ({m},) {dense.dtype} vector, got {bias.dtype} {tuple(bias.shape)}")
    bias_ptr = None if bias is None else bias.data_ptr()
    plan, workspace = _plan(lib, m, n, k, row_major, transpose_result, dense.dtype, alg_id, dense.device, bias_ptr)
    out = torch.empty((n, m) if transpose_result else (m, n), dtype=dense.dtype, device=dense.device)
    # The raw handle, as inductor's generated code reads it: torch.cuda.current_stream() builds a Stream
    # object on every call, host time this per-GEMM path is meant to save.
    stream = torch._C._cuda_getCurrentRawStream(dense.device.index)
    _check(lib, lib.st_matmul(plan, compressed.data_ptr(), dense.data_ptr(), out.data_ptr(),
                              None if workspace is None else workspace.data_ptr(), stream), "matmul")
    return out
