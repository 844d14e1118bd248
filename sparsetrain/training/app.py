"""train(cfg): build everything from the composed Hydra config, fit, and write summary.json."""
import json
import logging
import math
import time
from pathlib import Path
from typing import Optional

import lightning.pytorch as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.callbacks import RichProgressBar
from omegaconf import DictConfig, OmegaConf

from sparsetrain.gpu import kernels
from sparsetrain.gpu.backends.block_routes import KERNEL_BLOCK_SIZES
from sparsetrain.sparse.schedules import PruneSchedule
from sparsetrain.sparse.section import build_sparsity, sparsify_arguments
from sparsetrain.sparse.sparsify import layer_table, plan_sparsify
from sparsetrain.training.bn_recalibration import BatchNormRecalibration
from sparsetrain.training.callbacks import (LayerReport, MaskedDecay, MaskSnapshots, SparsityScheduler, WandbRunInfo,
                                            merge_records)
from sparsetrain.training.checkpoints import (AtomicCheckpointIO, BestCheckpoint, LatestCheckpoint, check_compatible,
                                              load_resume_checkpoint)
from sparsetrain.training.compile import CompileModel
from sparsetrain.training.config_schema import check_config
from sparsetrain.training.console import ProgressLines, checkpoint_files, hide_lightning_notices, run_end_block
from sparsetrain.training.consistency import MaskAgreement
from sparsetrain.training.cuda_graphs import CudaGraphSteps, config_conflict, graphs_wanted
from sparsetrain.training.errors import ConfigError
from sparsetrain.training.loggers import build_loggers, wandb_sync_hint
from sparsetrain.training.module import SparseClassifier
from sparsetrain.training.preemption import StopCheckpoint, exit_on_preemption
# Importing it registers the resolvers the configs use (${if_cuda:...}, ${job_dirname:...}).
from sparsetrain.training.resolvers import trains_on_cuda
from sparsetrain.training.resumable import ResumeState
from sparsetrain.training.sparse_coverage import check_coverage
from sparsetrain.training.throughput import Throughput

log = logging.getLogger("sparsetrain")


def build(node: DictConfig, **kwargs):
    """hydra.utils.instantiate, but a constructor's own error (unknown model, missing data folder)
    reaches the user as itself, not wrapped in Hydra's InstantiationException."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as e:
        if e.__cause__ is not None:
            raise e.__cause__ from None
        raise


def validate_config(cfg: DictConfig) -> None:
    """Catch impossible values before anything is built, one clear line each: the schema's keys, types and
    ranges (config_schema), then what only several values together or the machine can say."""
    missing = unset_keys(OmegaConf.to_container(cfg, resolve=False))
    if missing:
        raise ConfigError(f"{', '.join(missing)} must be set on the command line (`???` in the config), "
                          "e.g. data.root=/path/to/imagenet for an ImageFolder recipe")
    check_config(cfg)
    check_device(cfg)
    check_model(cfg)
    lr = cfg.optim.get("lr")
    decay = cfg.sparsity.get("masked_decay") or 0.0
    if lr is not None and decay * lr >= 1:
        raise ConfigError(f"sparsity.masked_decay={decay} must be below 1/optim.lr ({1 / lr:g}): pruned weights "
                          "shrink by masked_decay x lr per step; e.g. sparsity.masked_decay=0.5")
    kind = cfg.prune_schedule.kind
    if cfg.sparsity.get("criterion") == "scores" and kind in ("one_shot", "iterative"):
        # Scores train only at steps that update the mask, and these schedules update it once (per cycle).
        raise ConfigError(f"DRESS scores (sparsity.criterion=scores) learn only at mask-update steps, which "
                          f"prune_schedule={kind} makes one per prune, so the scores would never train; use "
                          "prune_schedule=constant or gradual (with dense_warmup_steps for a dense start)")
    if cfg.sparsity.get("subnet_levels") and kind == "gradual":
        raise ConfigError("multi-subnet DRESS (sparsity.subnet_levels) trains fixed levels and would override "
                          "the gradual ramp; use prune_schedule=constant (with dense_warmup_steps for a dense start)")
    check_objective(cfg)
    if (str(cfg.trainer.precision).startswith("16") and cfg.trainer.get("gradient_clip_val")
            and cfg.optim.get("fused")):
        # GradScaler leaves fp16 gradients scaled until a fused optimizer unscales them inside its step.
        raise ConfigError("trainer.precision=16-mixed with trainer.gradient_clip_val clips scaled gradients under a "
                          "fused optimizer: set optim.fused=false, or use trainer.precision=bf16-mixed")
    if cfg.trainer.max_steps in (None, -1) and cfg.trainer.max_epochs in (None, -1):
        raise ConfigError("set trainer.max_steps or trainer.max_epochs, or training never ends")
    if cfg.sparsity.get("backend") in ("cusparselt", "triton_bsr"):
        check_gpu_backend_possible(cfg.sparsity.backend, cfg.trainer, cfg.sparsity.get("block_size"))
    if cfg.get("cuda_graph") not in (None, True, False, "auto"):
        raise ConfigError(f"cuda_graph={cfg.cuda_graph} must be true, false or auto")
    if cfg.get("cuda_graph") is True and (conflict := config_conflict(cfg)) is not None:
        raise ConfigError(conflict)  # `auto` trains eager instead (graphs_wanted)


def unset_keys(container, prefix: str = "") -> list[str]:
    """Dotted keys whose value is still `???` (OmegaConf's missing marker). Read without resolving, so an
    interpolation's resolver (hydra:, if_cuda:) is never called here."""
    items = container.items() if isinstance(container, dict) else enumerate(container)
    keys = []
    for key, value in items:
        if value == "???":
            keys.append(f"{prefix}{key}")
        elif isinstance(value, (dict, list)):
            keys += unset_keys(value, f"{prefix}{key}.")
    return keys


def check_device(cfg: DictConfig) -> None:
    """A recipe meant for a GPU (`requires_gpu: true`) would take hours where a GPU takes seconds, and may not fit
    in the host's memory: on the CPU it runs only when asked to (allow_cpu=true, or debug=smoke)."""
    accelerator = cfg.trainer.get("accelerator", "auto")
    if cfg.get("requires_gpu") and not cfg.get("allow_cpu") and not trains_on_cuda(accelerator):
        where = "trainer.accelerator=cpu" if accelerator == "cpu" else "no CUDA GPU is visible"
        raise ConfigError(f"recipe {cfg.get('recipe_name')} is meant for a GPU ({where}): add debug=smoke for a short "
                          "CPU run of it, or allow_cpu=true to train it on the CPU anyway")


def check_model(cfg: DictConfig) -> None:
    """The network built on the meta device (no memory, no weights, no time): a wrong model name or argument, or
    a sparse recipe that would leave every layer dense, stops here rather than after the real build."""
    # Weights are read at the real build; a meta model has nowhere to put them.
    no_weights = {"pretrained_path": None} if "pretrained_path" in cfg.model else {}
    with torch.device("meta"):
        model = build(cfg.model, **no_weights)
    if cfg.sparsity.pattern != "dense":
        config, include, exclude = sparsify_arguments(OmegaConf.to_container(cfg.sparsity, resolve=True))
        check_coverage(plan_sparsify(model, config, include=include, exclude=exclude), cfg.sparsity)


def check_objective(cfg: DictConfig) -> None:
    """The objective is what checkpointing keeps the best of (mode: max) and sweepers maximise, so it
    must be an accuracy this run logs; anything else fails only after the first validation, or keeps the worst."""
    other_subnets = list(cfg.sparsity.get("subnet_levels") or ())[1:]  # the first is the main one: val/acc
    logged = ["val/acc", *(f"val/acc@{float(level):g}" for level in other_subnets)]
    if cfg.objective not in logged:
        raise ConfigError(f"objective={cfg.objective} is not an accuracy this run logs (checkpoints keep its "
                          f"maximum); use one of {logged}")


def check_gpu_backend_possible(backend: str, trainer_cfg: DictConfig, block_size: Optional[int] = None) -> None:
    """A forced GPU backend (cusparselt, triton_bsr) would otherwise fail at the first forward, after start-up."""
    if backend == "triton_bsr" and block_size not in KERNEL_BLOCK_SIZES:
        raise ConfigError(f"sparsity.backend=triton_bsr runs blocks of {list(KERNEL_BLOCK_SIZES)}, not "
                          f"sparsity.block_size={block_size}: pick one of those, or sparsity.backend=auto (masked "
                          "dense for other sizes)")
    if not str(trainer_cfg.precision).startswith(("16", "bf16")):
        raise ConfigError(f"sparsity.backend={backend} needs fp16/bf16 compute but trainer.precision="
                          f"{trainer_cfg.precision} keeps fp32 weights: set trainer.precision=bf16-mixed, "
                          "or sparsity.backend=auto")
    if trainer_cfg.accelerator == "cpu" or not torch.cuda.is_available():
        where = "trainer.accelerator=cpu" if trainer_cfg.accelerator == "cpu" else "no CUDA GPU is visible"
        raise ConfigError(f"sparsity.backend={backend} needs a CUDA GPU ({where}): use sparsity.backend=auto, "
                          "which falls back to masked dense")
    if backend == "triton_bsr" and not kernels.available():
        raise ConfigError("sparsity.backend=triton_bsr needs Triton and an sm80+ GPU (Ampere or newer): use "
                          "sparsity.backend=auto, which falls back to masked dense")


def total_steps(trainer_cfg: DictConfig, steps_per_epoch: int) -> int:
    if trainer_cfg.max_steps not in (None, -1):
        return int(trainer_cfg.max_steps)
    return int(trainer_cfg.max_epochs) * steps_per_epoch


def build_schedule(schedule_cfg: DictConfig, sparsity_cfg: DictConfig, steps: int,
                   steps_per_epoch: Optional[int] = None) -> Optional[PruneSchedule]:
    """The recipe's prune_schedule for its sparsity pattern; None for a dense run."""
    pattern = sparsity_cfg.pattern
    if pattern == "dense":
        return None
    opts = OmegaConf.to_container(schedule_cfg, resolve=True)
    opts["pattern"] = pattern
    finetune = finetune_length(opts.pop("finetune_steps", None), opts.pop("finetune_epochs", None), steps_per_epoch)
    if finetune is not None:
        if finetune > steps:
            raise ConfigError(f"a {finetune}-step sparse fine-tune does not fit in a {steps}-step run; shorten it "
                              "or train longer (trainer.max_steps / max_epochs)")
        opts["dense_warmup_steps"] = steps - finetune
    if opts.get("total_steps") is None:
        opts["total_steps"] = steps
    if pattern == "block" and opts.get("target") is None:
        opts["target"] = sparsity_cfg.sparsity
    schedule = PruneSchedule(**opts)
    warn_if_run_ends_early(schedule, steps)
    return schedule


def warn_if_run_ends_early(schedule: PruneSchedule, steps: int) -> None:
    """Short runs (smoke tests, a trainer.max_steps override) legitimately stop before the schedule
    is done, so this warns instead of refusing; the layer table would otherwise claim sparse layers
    that never ran sparse."""
    if schedule.sparse_start >= steps:
        log.warning("prune_schedule: sparsity starts at step %d but the run ends after %d steps, so it trains "
                    "dense throughout; train longer or move the prune earlier", schedule.sparse_start, steps)
    elif schedule.kind == "gradual" and schedule.end_step >= steps:
        log.warning("prune_schedule: the gradual ramp reaches %g only at step %d but the run ends after %d steps; "
                    "lower prune_schedule.end_step or train longer", schedule.target, schedule.end_step, steps)


def finetune_length(finetune_steps, finetune_epochs, steps_per_epoch: Optional[int]) -> Optional[int]:
    """The sparse fine-tune's length in steps from prune_schedule.finetune_steps or finetune_epochs (None: unset)."""
    if finetune_steps is not None and finetune_epochs is not None:
        raise ConfigError("set prune_schedule.finetune_steps or prune_schedule.finetune_epochs, not both")
    if finetune_epochs is not None:
        if steps_per_epoch is None:
            raise ConfigError("prune_schedule.finetune_epochs needs the epoch length; use finetune_steps here")
        finetune_steps = round(finetune_epochs * steps_per_epoch)
    if finetune_steps is not None and (isinstance(finetune_steps, bool) or not isinstance(finetune_steps, int)
                                       or finetune_steps < 1):
        raise ConfigError(f"the sparse fine-tune must be at least one step, got {finetune_steps}")
    return finetune_steps


def run_identity(cfg: DictConfig) -> dict:
    return {"recipe": cfg.get("recipe_name"), "model": cfg.model.name, "pattern": cfg.sparsity.pattern}


def train(cfg: DictConfig) -> dict:
    hide_lightning_notices()
    validate_config(cfg)
    run_dir = Path(cfg.paths.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path, ckpt = load_resume_checkpoint(run_dir, cfg.resume)
    L.seed_everything(cfg.seed, workers=True)

    datamodule = build(cfg.data)
    model = build(cfg.model)
    records = build_sparsity(model, OmegaConf.to_container(cfg.sparsity, resolve=True))
    module = SparseClassifier(
        model, num_classes=cfg.data.num_classes, optimizer=build(cfg.optim),
        sched=OmegaConf.to_container(cfg.sched, resolve=True), nonfinite=cfg.nonfinite,
        label_smoothing=cfg.get("label_smoothing", 0.0),
        subnet_levels=cfg.sparsity.get("subnet_levels"), subnet_weights=cfg.sparsity.get("subnet_weights"),
        score_lr_scale=cfg.sparsity.get("score_lr_scale", 1.0))
    identity = run_identity(cfg)
    if ckpt_path is not None:
        check_compatible(ckpt, module.state_dict(), identity, cfg.force_resume, ckpt_path)
    del ckpt  # Lightning loads it again into the trainer; do not hold a second copy through training

    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    throughput = Throughput(csv_path=run_dir / "step_times.csv")
    callbacks = build_callbacks(cfg, run_dir, records, throughput, datamodule)
    loggers = build_loggers(cfg.logger, run_dir, run_label=f"{cfg.get('recipe_name')}/{run_dir.name}")
    # Without a terminal ProgressLines stands in for the bar, and Lightning would add its own bar otherwise.
    trainer = build(cfg.trainer, callbacks=callbacks, logger=loggers or False, plugins=[AtomicCheckpointIO()],
                    enable_progress_bar=cfg.trainer.enable_progress_bar and _is_terminal())
    module.checkpoint_identity = identity
    started = time.time()
    with exit_on_preemption():
        trainer.fit(module, datamodule=datamodule, ckpt_path=str(ckpt_path) if ckpt_path else None)
        if module.validated_at_step != trainer.global_step:
            # max_steps ended mid-epoch: summary.json must report the model as it ends, not an older one
            trainer.validate(module, datamodule=datamodule, verbose=False)
    summary = write_summary(cfg, run_dir, trainer, module, records, throughput, time.time() - started)
    if trainer.is_global_zero:
        print(run_end_block(summary, checkpoint_files(run_dir), cfg.objective), flush=True)
    hint = wandb_sync_hint(run_dir) if "wandb" in (cfg.logger or {}) else ""
    if hint and trainer.is_global_zero:
        print(f"wandb ran offline; to upload: {hint}")
    return summary


def build_callbacks(cfg, run_dir, records, throughput, datamodule) -> list:
    steps_per_epoch = estimate_steps_per_epoch(cfg, datamodule)
    schedule = build_schedule(cfg.prune_schedule, cfg.sparsity, total_steps(cfg.trainer, steps_per_epoch),
                              steps_per_epoch)
    ccfg = cfg.callbacks
    # Two savers: the best ones by the monitored metric after each validation, and last.ckpt (what resume=auto
    # continues from) on schedule whatever the metrics. One saver doing both would write nothing until the
    # first validation: Lightning defers a save whose monitored metric does not exist yet.
    best = BestCheckpoint(run_dir / "checkpoints", save_top_k=ccfg.checkpoint.save_top_k,
                          monitor=ccfg.checkpoint.monitor, mode=ccfg.checkpoint.mode)
    latest = LatestCheckpoint(run_dir / "checkpoints", every_n_train_steps=ccfg.checkpoint.every_n_train_steps,
                              every_n_epochs=ccfg.checkpoint.every_n_epochs)
    # Lightning's own switch: trainer.enable_checkpointing=false (debug=smoke sets it) writes no checkpoint on
    # schedule; a stop by a signal or a non-finite loss still saves one, which its message points to.
    savers = [best, latest] if cfg.trainer.get("enable_checkpointing", True) is not False else []
    callbacks = [throughput, LayerReport(run_dir, records), MaskSnapshots(run_dir), *savers,
                 WandbRunInfo(OmegaConf.to_container(cfg, resolve=True), records),
                 ResumeState(), StopCheckpoint(run_dir / "checkpoints"), MaskAgreement(every=ccfg.sparsity_log_every)]
    if schedule is not None:
        callbacks.insert(0, SparsityScheduler(schedule, log_every=ccfg.sparsity_log_every))
    if cfg.get("compile") is not None:
        callbacks.append(CompileModel(cfg.compile))
    if graphs_wanted(cfg):
        callbacks.append(CudaGraphSteps(required=cfg.cuda_graph is True))
    if cfg.sparsity.get("masked_decay"):
        callbacks.append(MaskedDecay(cfg.sparsity.masked_decay))
    if ccfg.bn_recalibration_batches:
        callbacks.append(BatchNormRecalibration(ccfg.bn_recalibration_batches))
    if cfg.trainer.enable_progress_bar and _is_terminal():
        callbacks.append(RichProgressBar())
    elif cfg.trainer.enable_progress_bar:
        callbacks.append(ProgressLines(ccfg.progress_every_n_steps, throughput))
    return callbacks


def estimate_steps_per_epoch(cfg, datamodule) -> int:
    """Optimizer steps per epoch as Lightning counts them: each data-parallel rank sees 1/world of the
    batches, `limit_train_batches` caps them per rank, and gradient accumulation groups them."""
    datamodule.setup("fit")
    n = math.ceil(len(datamodule.train_dataloader()) / data_parallel_size(cfg.trainer))
    limit = cfg.trainer.get("limit_train_batches")
    if isinstance(limit, int) and not isinstance(limit, bool):
        n = min(n, limit)
    elif isinstance(limit, float):
        n = max(1, int(n * limit))
    return max(1, math.ceil(n / int(cfg.trainer.get("accumulate_grad_batches") or 1)))


def data_parallel_size(trainer_cfg) -> int:
    """How many ranks split each epoch's data: devices x num_nodes (Lightning runs DDP whenever there
    are several). `devices` may be an int, a list of ids, a digit string, or 'auto' / -1 (all visible GPUs)."""
    devices = trainer_cfg.get("devices", 1)
    if isinstance(devices, str) and devices.strip().lstrip("-").isdigit():
        devices = int(devices)
    if OmegaConf.is_list(devices) or isinstance(devices, (list, tuple)):
        count = len(devices)
    elif isinstance(devices, int) and devices > 0:
        count = devices
    else:
        count = torch.cuda.device_count() if trains_on_cuda(trainer_cfg.get("accelerator", "auto")) else 1
    return max(1, count) * max(1, int(trainer_cfg.get("num_nodes") or 1))


def _is_terminal() -> bool:
    import sys

    return sys.stdout.isatty()


def write_summary(cfg, run_dir: Path, trainer, module, records, throughput, seconds) -> dict:
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    layers = merge_records(records, layer_table(module.model))
    summary = {
        "recipe": cfg.get("recipe_name"),
        "run_dir": str(run_dir),
        "metrics": metrics,
        "objective": metrics.get(cfg.objective),
        "global_step": int(trainer.global_step),
        "epoch": int(trainer.current_epoch),
        **throughput.summary(),
        "wall_seconds": round(seconds, 1),
        "skipped_steps": module.skipped_steps,
        "layers": [{k: r.get(k) for k in ("name", "shape", "pattern", "backend", "measured_sparsity", "reason")}
                   for r in layers],
        "config": str(run_dir / "config.yaml"),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
    }
    if trainer.is_global_zero:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=_jsonable))
    return summary


def _jsonable(x):
    if isinstance(x, float) and math.isnan(x):
        return None
    return str(x)
