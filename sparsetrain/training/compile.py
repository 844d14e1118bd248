"""The `compile:` option: torch.compile the network in place when training starts on a GPU."""
import logging

import lightning.pytorch as L
import torch

from sparsetrain.sparse.sparsify import sparse_modules

log = logging.getLogger("sparsetrain")

# torch.compile's modes; "default" is its mode=None.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def compute_dtype_of(precision: str, parameter_dtype: torch.dtype) -> torch.dtype:
    """The dtype the layers compute in under a Lightning precision setting ("bf16-mixed", "16-true", ...)."""
    if precision.startswith("bf16"):
        return torch.bfloat16
    if precision.startswith("16"):
        return torch.float16
    return parameter_dtype


class CompileModel(L.Callback):
    """Compiles `pl_module.model` in place (`nn.Module.compile`) at fit start, where it runs on CUDA.

    In place, so state_dict keys keep their names (no `_orig_mod.`) and checkpoints move freely between
    compiled and eager runs. Sparse layers pick their backend for the run's device and compute dtype
    first, because that choice builds objects and cannot be traced. Phase changes, mask refresh on/off,
    train/eval and DRESS level switches flip Python flags the compiled code is guarded on: each variant
    compiles once, none runs stale code. On the CPU the model stays eager: inductor's CPU compile takes
    longer than these small runs and gains little (tests/training/test_compile.py checks the CPU path anyway).
    """

    def __init__(self, mode: str):
        if mode not in COMPILE_MODES:
            raise ValueError(f"compile={mode!r} is not one of {list(COMPILE_MODES)} (or null for eager)")
        self.mode = mode

    def on_fit_start(self, trainer, pl_module):
        device = pl_module.device
        if device.type != "cuda":
            log.info("compile=%s skipped: training runs on %s, compile applies to CUDA runs", self.mode, device.type)
            return
        model = pl_module.model
        compile_in_place(model, self.mode, device, compute_dtype_of(str(trainer.precision), next(model.parameters()).dtype))
        log.info("model compiled in place (torch.compile mode=%s); the first steps include compilation", self.mode)


def compile_in_place(model: torch.nn.Module, mode: str, device, dtype: torch.dtype) -> None:
    """`model.compile(mode)` for inputs on `device` computing in `dtype`, its sparse layers' backends
    chosen first (the choice builds objects, which torch.compile cannot trace)."""
    for _, layer in sparse_modules(model):
        layer.resolve_backend_for(device, dtype)
    model.compile(mode=None if mode == "default" else mode)

