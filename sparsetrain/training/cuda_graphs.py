"""The `cuda_graph:` option: every training forward + backward replays one captured CUDA graph.

Eager 2:4 training is host-bound: each sparse linear costs more Python and launch time per step than its GPU
time at ViT-L widths (`scripts/profile_host.py`). Replaying a graph costs one launch.
`torch.cuda.make_graphed_callables` captures the network's forward and backward; the loss, the optimizer,
the schedule and the logging stay eager around it, so Lightning drives training as before.

A graph replays the kernels that one forward chose, so it is only valid for the Python-side state that
chose them: the input's shape and dtype, autocast, and each sparse layer's flags (active, mask frozen,
level, fused GELU, weight-gradient mode). That state is the graph's key. A key is captured the second time a
step has it and replayed from then on; a step whose key is new runs eager. So a state that repeats (a phase,
mask-refresh steps vs frozen ones, the smaller last batch) costs one eager step and one capture, and one that
never repeats (a block level ramping at every step) costs nothing but eager speed, where capturing it would
cost several eager steps each time. Tensor contents the graph reads may change between replays, and so may a
block layer's mask (a schedule update, or learned scores in an earlier replay): each block layer rebuilds its
kernels' index in place before a replay that needs it (`sync_block_index`), so the graph never rebuilds it
itself. Eval forwards and forwards without grad run eager. All graphs share one memory pool: only one of them
runs per step, and nothing a graph returns outlives its step.
"""
from __future__ import annotations

import gc
import logging
from collections import OrderedDict
from typing import Callable

import lightning.pytorch as L
import torch
from torch import Tensor, nn

from sparsetrain.sparse.sparsify import sparse_modules

log = logging.getLogger("sparsetrain")

MAX_GRAPHS = 6  # keys alive at once (a run sees 2-4); the oldest is dropped beyond that
MAX_SEEN = 64  # keys remembered as seen once, awaiting a second step to be captured


def graph_key(layers: list, x: Tensor) -> tuple:
    """What a captured forward depends on besides tensor contents. `layers`: the model's sparse layers
    (found once: walking a ViT-L's modules every step would cost host time on the critical path)."""
    layers = tuple((layer._active, layer._frozen, layer.level, layer.fuse_gelu, layer.grad_mode) for layer in layers)
    autocast = torch.is_autocast_enabled(x.device.type)
    return (tuple(x.shape), x.dtype, x.device, autocast, torch.get_autocast_dtype(x.device.type) if autocast else None,
            layers)


class CudaGraphCapture:
    """capture(model, x): a callable that replays `model`'s forward (and, through autograd, its backward)
    captured for inputs like x. All its captures share one memory pool.

    One eager forward + backward runs first, with random output gradients: it does the first-use work
    (cuSPARSELt algorithm searches checked against masked dense, Triton tuning) on real operands, not on the
    uninitialised gradients that make_graphed_callables' own warm-up feeds. Side effects of the two warm-ups:
    BatchNorm running statistics move twice more on this batch, and dropout draws advance.
    """

    def __init__(self):
        self.pool = None

    def __call__(self, model: nn.Module, x: Tensor) -> Callable[[Tensor], Tensor]:
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        out = model(x)
        params = [p for p in model.parameters() if p.requires_grad]
        torch.autograd.grad(out, params, grad_outputs=torch.randn_like(out), allow_unused=True)
        # Drop the eager graph before capturing: while `out` lives, it keeps the parameters' AccumulateGrad
        # nodes alive, made on this (default) stream, and since torch 2.10 a node accumulates on the stream
        # it was made on, so the capture's backward would touch the legacy stream and the capture fails
        # (cudaErrorStreamCaptureImplicit, seen on the H100 with torch 2.11).
        del out
        # No garbage collection while capturing: a collection that frees an old graph (graphs sit in reference
        # cycles with their autograd functions) destroys it mid-capture, which a capture forbids, and the
        # capture fails (seen on the H100 after earlier graphs of the same process were dropped).
        gc.collect()
        collecting = gc.isenabled()
        gc.disable()
        try:
            # A clone: make_graphed_callables keeps its sample as the graph's input buffer, refilled at each replay.
            torch.cuda.make_graphed_callables(model, (x.detach().clone(),), num_warmup_iters=1,
                                              allow_unused_input=True, pool=self.pool)
        finally:
            if collecting:
                gc.enable()
        return model.__dict__.pop("forward")  # the replaying forward make_graphed_callables put on the module


class GraphedTraining:
    """Installs itself as `model.forward` (an instance attribute: parameters, buffers, state_dict keys and
    checkpoints are untouched) and routes each training forward to the graph of its key (`graph_key`)."""

    def __init__(self, model: nn.Module, capture: Callable[[nn.Module, Tensor], Callable] | None = None):
        self.model = model
        self.capture = capture or CudaGraphCapture()
        self.graphs: OrderedDict[tuple, Callable] = OrderedDict()
        self.seen: OrderedDict[tuple, None] = OrderedDict()  # keys of eager steps, most recent last
        self.captured = 0
        self.steps = 0  # training forwards routed here
        self.replayed = 0  # ... of which replayed a graph
        self.layers = [layer for _, layer in sparse_modules(model)]

    def install(self) -> None:
        self.model.forward = self

    def uninstall(self) -> None:
        self.model.__dict__.pop("forward", None)
        self.graphs.clear()

    def __call__(self, x: Tensor) -> Tensor:
        if not (self.model.training and torch.is_grad_enabled()):
            return type(self.model).forward(self.model, x)
        key = graph_key(self.layers, x)
        self.steps += 1
        graphed = self.graphs.get(key)
        if graphed is None and key not in self.seen:
            self.seen[key] = None
            if len(self.seen) > MAX_SEEN:
                self.seen.popitem(last=False)
            return type(self.model).forward(self.model, x)
        for layer in self.layers:
            layer.sync_block_index()
        if graphed is None:
            graphed = self._capture(x, key)
        else:
            self.graphs.move_to_end(key)
        self.replayed += 1
        return graphed(x)

    def _capture(self, x: Tensor, key: tuple) -> Callable:
        self.model.__dict__.pop("forward")  # capturing calls the module's own forward
        try:
            graphed = self.capture(self.model, x)
        finally:
            self.install()
        if len(self.graphs) >= MAX_GRAPHS:
            self.graphs.popitem(last=False)
        self.graphs[key] = graphed
        self.seen.pop(key, None)
        self.captured += 1
        log.info("cuda_graph: capture %d of the training forward+backward (input %s, %d sparse layers)",
                 self.captured, tuple(x.shape), len(key[-1]))
        return graphed


def config_conflict(cfg) -> str | None:
    """Why the composed config cannot train on captured graphs (naming the fix), or None when it can.
    `cuda_graph: true` refuses such a config at start; `auto` trains it eager instead (`graphs_wanted`)."""
    if cfg.get("cuda_graph") in (None, False):
        return None
    if cfg.get("compile") is not None:
        return (f"cuda_graph=true with compile={cfg.compile}: use one of them (compile=reduce-overhead captures "
                "CUDA graphs itself)")
    if int(cfg.trainer.get("accumulate_grad_batches") or 1) > 1:
        return ("cuda_graph=true with trainer.accumulate_grad_batches > 1: a replay overwrites the gradient buffers "
                "autograd handed to the parameters; set one of them back (cuda_graph=false or accumulate_grad_batches=1)")
    if cfg.sparsity.get("subnet_levels"):
        return ("cuda_graph=true with multi-subnet DRESS (sparsity.subnet_levels): several forwards share one "
                "backward; set cuda_graph=false")
    return None


def graphs_wanted(cfg) -> bool:
    """Whether the run installs CudaGraphSteps: `true` always (conflicts were refused at start); `auto` unless
    the config conflicts, which it logs (the run then trains eager)."""
    mode = cfg.get("cuda_graph")
    if mode != "auto":
        return bool(mode)
    conflict = config_conflict(cfg)
    if conflict is not None:
        log.info("cuda_graph=auto: eager steps, as graphs cannot serve this config (%s)", conflict)
    return conflict is None


class CudaGraphSteps(L.Callback):
    """The `cuda_graph: true` option: GraphedTraining on `pl_module.model` for the fit, where it can run.

    On the CPU it logs why and trains eager (like `compile:`); a multi-GPU run stops before the first step with
    the reason and the fix. Settings it cannot serve are refused with the config (`config_conflict`).
    """

    def __init__(self, required: bool = True):
        self.required = required  # cuda_graph=true; false for `auto`, which trains eager where graphs cannot run
        self.graphs: GraphedTraining | None = None

    def on_fit_start(self, trainer, pl_module):
        if pl_module.device.type != "cuda":
            log.info("cuda_graph skipped: training runs on %s; CUDA graphs need a CUDA GPU", pl_module.device.type)
            return
        if trainer.world_size > 1:
            if not self.required:
                log.info("cuda_graph=auto: eager steps on %d ranks (graphed steps under DDP are not tested yet)",
                         trainer.world_size)
                return
            raise ValueError(f"cuda_graph=true cannot run here: {trainer.world_size} ranks, and graphed steps under "
                             "DDP are not tested yet; set cuda_graph=false (or auto) for multi-GPU runs")
        self.graphs = GraphedTraining(pl_module.model)
        self.graphs.install()
        log.info("cuda_graph: each training forward+backward replays a captured graph (captured per phase)")

    def on_fit_end(self, trainer, pl_module):
        if self.graphs is not None:
            graphs = self.graphs
            log.info("cuda_graph: %d of %d training steps replayed one of %d captured graphs; the others ran eager, "
                     "as their key (phase, mask refresh, block level, batch shape) had not been seen before",
                     graphs.replayed, graphs.steps, graphs.captured)
            graphs.uninstall()
            self.graphs = None

    def on_exception(self, trainer, pl_module, exception):
        self.on_fit_end(trainer, pl_module)
