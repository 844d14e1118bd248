"""Kernel configurations of the block-sparse matmuls, tuned per shape on the machine that runs them.

A configuration is (BLOCK_M, num_warps, num_stages) and the kernel: pointer loads, or TMA tensor
descriptors (sm90; where they cannot compile or address the operands, those candidates drop out). Its
key is the operation, the weight's shape, the block size, the dtype, the fused epilogue, the rows rounded
up to a power of two, the kept fraction of blocks rounded to a bucket, the GPU, the Triton version and
the candidate set. The first call with a new
key times every candidate on its real operands (`triton.testing.do_bench`, median) and keeps the
fastest. Choices are kept in memory and in bsr-autotune.json of the cache directory (`sparsetrain.gpu.choice_cache`:
$SPARSETRAIN_CACHE, default ~/.cache/sparsetrain), so a new process starts tuned.

Timing cannot happen inside CUDA graph capture: there an untuned key runs DEFAULT (and says so
once). Run one eager step before capturing.
"""
from __future__ import annotations

import functools
import logging
import pathlib
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import triton
from triton.compiler.errors import CompilationError
from triton.runtime.errors import OutOfResources

from sparsetrain.gpu.choice_cache import ChoiceFile, device_label

logger = logging.getLogger("sparsetrain")

CACHE_FILE = "bsr-autotune.json"
# Kept fractions of blocks the tuning is bucketed by: 90% sparse -> 0.1, 80% -> 0.2, ...
DENSITY_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0)
_TIMING_WARMUP_MS, _TIMING_REP_MS = 5, 25


@dataclass(frozen=True)
class KernelConfig:
    block_m: int  # rows of the output tile; its columns are one weight block
    num_warps: int
    num_stages: int  # software-pipelining depth of the loop over kept blocks
    tma: bool = False  # tiles moved by tensor descriptors instead of pointer loads
    split_k: int = 1  # weight grad only: slices of the rows reduced by separate programs, added up in fp32


class ConfigUnsupported(RuntimeError):
    """This configuration cannot serve these operands (e.g. TMA with unaligned ones); the tuner skips it."""


DEFAULT = KernelConfig(128, 4, 3)
# sm90: one warpgroup per 64 rows of the tile (wgmma's M), 2-4 stages fit 228 KB of shared memory
# at every block size; 256 rows need two warpgroups.
# Stages 2 (no prefetch, more programs per SM) suit the short loops of 90% sparse rows.
CANDIDATES = (
    KernelConfig(64, 4, 2), KernelConfig(64, 4, 3), KernelConfig(64, 4, 4),
    KernelConfig(128, 4, 2), KernelConfig(128, 4, 3), KernelConfig(128, 4, 4),
    KernelConfig(128, 8, 2), KernelConfig(128, 8, 3),
    KernelConfig(256, 8, 2), KernelConfig(256, 8, 3), KernelConfig(256, 8, 4),
    # TMA: the winners of a sweep at the ViT-L MLP shapes on an H100 (64/32 blocks, 80-90% sparse); deeper
    # pipelines pay here because the copy engine, not the warps, issues the loads.
    KernelConfig(64, 4, 3, tma=True), KernelConfig(128, 4, 2, tma=True), KernelConfig(128, 4, 3, tma=True),
    KernelConfig(128, 4, 5, tma=True), KernelConfig(128, 4, 6, tma=True), KernelConfig(128, 4, 7, tma=True),
    KernelConfig(128, 8, 5, tma=True),
    KernelConfig(256, 8, 2, tma=True), KernelConfig(256, 8, 5, tma=True),
)
# The weight grad's tile is one b x b block; block_m is the rows it reads per iteration. At 90% sparsity a layer
# has too few kept blocks to fill the GPU, so the rows are split among programs (split_k).
WEIGHT_GRAD_DEFAULT = KernelConfig(64, 4, 3, split_k=2)
WEIGHT_GRAD_CANDIDATES = tuple(KernelConfig(rows, warps, stages, split_k=split)
                               for rows in (64, 128) for warps in (4, 8) for stages in (3, 4)
                               for split in (1, 2, 4, 8, 16))
# Part of every key: a new candidate set re-tunes instead of reusing choices made without it.
CANDIDATE_SET = "c3"


def density_bucket(density: float) -> float:
    return min(DENSITY_BUCKETS, key=lambda bucket: abs(bucket - density))


@dataclass(frozen=True)
class TuningKey:
    text: str

    @classmethod
    @functools.lru_cache(maxsize=4096)  # called at every launch: the string is built once per shape
    def of(cls, operation: str, rows: int, weight_shape, block_size: int, density: float, dtype: torch.dtype,
           bias: bool, gelu: bool, device: torch.device) -> TuningKey:
        rows_bucket = 1 << max(6, (rows - 1).bit_length())
        epilogue = "+".join(["bias"] * bias + ["gelu"] * gelu) or "none"
        return cls(f"{operation}|{weight_shape[0]}x{weight_shape[1]}|b{block_size}|"
                   f"density{density_bucket(density)}|rows{rows_bucket}|{str(dtype).removeprefix('torch.')}|"
                   f"{epilogue}|{device_label(device)}|triton{triton.__version__}|{CANDIDATE_SET}")


_lock = threading.Lock()
_entries: dict[str, KernelConfig] | None = None
_warned_capture: set[str] = set()


_FILE = ChoiceFile(CACHE_FILE, "block-sparse tuning")


def cache_path() -> pathlib.Path:
    return _FILE.path


def _read_file() -> dict[str, KernelConfig]:
    try:
        return {key: KernelConfig(**value) for key, value in _FILE.read().items()}
    except TypeError as error:  # entries of another shape: re-tune rather than fail
        logger.warning("ignoring %s (%s); block-sparse kernels will be re-tuned", cache_path(), error)
        return {}


def _memory() -> dict[str, KernelConfig]:
    global _entries
    if _entries is None:
        _entries = _read_file()
    return _entries


def _persist(key: str, config: KernelConfig) -> None:
    _FILE.persist(key, asdict(config))


def tune(run: Callable[[KernelConfig], None],
         candidates: tuple[KernelConfig, ...] = CANDIDATES) -> tuple[KernelConfig, dict[KernelConfig, float]]:
    """Time `run(config)` for every candidate (median ms); the fastest, and every timing."""
    timings = {}
    for config in candidates:
        try:
            timings[config] = triton.testing.do_bench(lambda: run(config), warmup=_TIMING_WARMUP_MS,
                                                      rep=_TIMING_REP_MS, return_mode="median")
        except (OutOfResources, ConfigUnsupported):  # too much shared memory for this block size; unaligned for TMA
            continue
        except CompilationError:
            if not config.tma:
                raise
            continue  # a Triton or GPU without tensor descriptors
    if not timings:
        raise RuntimeError("no block-sparse kernel configuration fits this GPU; use the emulated route")
    return min(timings, key=timings.get), timings


def pick(key: TuningKey, run: Callable[[KernelConfig], None], candidates: tuple[KernelConfig, ...] = CANDIDATES,
         default: KernelConfig = DEFAULT) -> KernelConfig:
    """The configuration for `key`: remembered, or tuned now with `run` among `candidates` (outside CUDA graph
    capture, where an untuned key runs `default`)."""
    with _lock:
        config = _memory().get(key.text)
        if config is not None:
            return config
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            if key.text not in _warned_capture:
                _warned_capture.add(key.text)
                logger.warning("block-sparse kernel %s is untuned inside CUDA graph capture; it runs %s. Run one "
                               "step before capturing to tune it", key.text, default)
            return default
        config, timings = tune(run, candidates)
        _memory()[key.text] = config
        _persist(key.text, config)
        logger.info("tuned block-sparse kernel %s: %s (%.4f ms; slowest candidate %.4f ms)", key.text, config,
                    timings[config], max(timings.values()))
        return config


def entries() -> dict[str, KernelConfig]:
    """Every configuration this process knows (tuned here or read from the cache file)."""
    with _lock:
        return dict(_memory())
