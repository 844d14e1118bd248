"""How much faster a layer's 2:4 GEMMs run than its dense ones on this GPU, measured once per shape.

`sparsity.backend=auto` uses it to keep a layer on masked dense where 2:4 would slow the step down: narrow
layers, attention projections on some GPUs. What is timed is what the sparse path adds to and removes from a
training step, on `GAIN_ROWS` rows (batch x tokens): 2:4 runs the weight's prune-and-compress, the forward GEMM
and the input-gradient GEMM; dense runs the two GEMMs. The weight gradient is a dense GEMM on both paths, so it
does not enter the ratio. Both sides are captured in a CUDA graph and replayed (the recipes train on graphs), and
the ratio is kept in the choice cache per GPU, library versions, dtype and shape, so each shape is timed once per
machine.
"""
from __future__ import annotations

import logging
import statistics

import torch

from sparsetrain.gpu.backends.base import Backend
from sparsetrain.gpu.choice_cache import ChoiceFile, device_label

logger = logging.getLogger("sparsetrain")

GAIN_ROWS = 8192  # rows of the timed GEMMs: a ViT batch's tokens are of this order, where the ratio has settled
GAIN_FILE = ChoiceFile("semi24-gains.json", "2:4 speed-ups over dense")
_CALLS_PER_REPLAY, _REPLAYS = 10, 5


def gain_key(out_features: int, in_features: int, device: torch.device, dtype: torch.dtype, route: str) -> str:
    return (f"{out_features}x{in_features}|{str(dtype).removeprefix('torch.')}|rows{GAIN_ROWS}|{route}|"
            f"{device_label(device)}|torch{torch.__version__}|cusparselt{torch.backends.cusparselt.version()}")


_GAINS: dict[str, float] = {}  # this process's gains by gain_key, read from the file or measured


def semi24_gain(backend: Backend, out_features: int, in_features: int, device: torch.device,
                dtype: torch.dtype) -> float | None:
    """Dense time / 2:4 time of one training step's weight-side GEMMs at this shape (> 1: 2:4 is faster).

    Read from the choice cache, or measured now and stored there; None when it is neither stored nor measurable
    now (inside a CUDA graph capture nothing can be timed)."""
    key = gain_key(out_features, in_features, device, dtype, getattr(backend, "compress_route", backend.name))
    if key not in _GAINS:
        stored = GAIN_FILE.read().get(key)
        if isinstance(stored, (int, float)) and stored > 0:
            _GAINS[key] = float(stored)
        elif torch.cuda.is_current_stream_capturing():
            return None
        else:
            _GAINS[key] = _measure(backend, out_features, in_features, device, dtype)
            GAIN_FILE.persist(key, _GAINS[key])
            logger.debug("2:4 at %dx%d measured %.3fx of dense (%s)", out_features, in_features, _GAINS[key], key)
    return _GAINS[key]


def _measure(backend: Backend, out_features: int, in_features: int, device: torch.device,
             dtype: torch.dtype) -> float:
    generator = torch.Generator(device=device).manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, device=device, dtype=dtype, generator=generator)

    weight, x, grad_y = randn(out_features, in_features), randn(GAIN_ROWS, in_features), randn(GAIN_ROWS, out_features)

    def dense_step():
        x @ weight.t()
        grad_y @ weight

    def sparse_step():
        _, prepared = backend.prepare_weight(weight)
        backend.linear(x, prepared, None)
        backend.input_grad(grad_y, prepared.input_grad)

    with torch.no_grad():
        dense_ms, sparse_ms = _graph_ms(dense_step), _graph_ms(sparse_step)
    return dense_ms / sparse_ms


def _graph_ms(step) -> float:
    """Median GPU time of one `step`, replayed from a CUDA graph of several calls (host launch cost excluded, as
    in a captured training step). The first calls run eagerly: they pick algorithms and build plans."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(_CALLS_PER_REPLAY):
            step()
    graph.replay()  # the first replay uploads the graph
    times = []
    for _ in range(_REPLAYS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / _CALLS_PER_REPLAY)
    return statistics.median(times)
