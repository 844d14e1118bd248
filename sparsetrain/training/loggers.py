"""Loggers from the `logger` config group. wandb runs offline unless credentials exist, and keeps one
run id per run directory so that a resumed run continues the same wandb run."""
import netrc
import os
import uuid
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf


def device_scalar(value: float, device: torch.device) -> torch.Tensor:
    """A Python number as a 0-d tensor made on `device` by a fill kernel, for `LightningModule.log`.

    Logging a plain float makes Lightning copy it to the GPU with a blocking copy, which waits for every
    kernel queued so far: per-step floats (lr, phase, level) would sync the host with the GPU each step.
    """
    return torch.full((), float(value), device=device)


def log_measured(trainer, metrics: dict) -> None:
    """Hands metrics measured at the last finished training step to every logger, at that step only. Call it
    from on_train_batch_end, or from the next on_train_batch_start.

    `LightningModule.log` keeps a step value and hands it to the loggers again at every later logging step of the
    epoch, so a metric measured every k steps would fill the rows in between with stale copies.
    """
    # The step Lightning logs this batch's own values at: global_step already counts the batch here.
    step = trainer.global_step - 1
    for logger in trainer.loggers:
        logger.log_metrics({**metrics, "epoch": trainer.current_epoch}, step=step)
        logger.save()


def wandb_credentials_present() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def wandb_run_id(run_dir: Path) -> str:
    """The run id stored in the run directory (created once)."""
    path = Path(run_dir) / "wandb_id.txt"
    if path.is_file():
        return path.read_text().strip()
    run_id = uuid.uuid4().hex[:8]  # wandb ids are short lowercase alphanumerics
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(run_id + "\n")
    return run_id


def build_loggers(logger_cfg: DictConfig, run_dir: Path, run_label: str) -> list:
    loggers = []
    for key, cfg in (logger_cfg or {}).items():
        if key == "wandb":
            loggers.append(_build_wandb(cfg, run_dir, run_label))
        else:
            loggers.append(instantiate(cfg))
    return loggers


def _build_wandb(cfg: DictConfig, run_dir: Path, run_label: str):
    try:
        import wandb  # noqa: F401
    except ImportError as e:
        raise ImportError("logger=wandb needs wandb: pip install -e '.[wandb]', or use logger=csv") from e
    cfg = OmegaConf.to_container(cfg, resolve=True)
    offline = cfg.pop("offline", None)
    if offline is None:
        offline = os.environ.get("WANDB_MODE") == "offline" or not wandb_credentials_present()
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    cfg.update(offline=offline, id=wandb_run_id(run_dir), name=run_label, resume="allow")
    return instantiate(cfg)


def wandb_sync_hint(run_dir: Path) -> str:
    runs = sorted((Path(run_dir) / "wandb").glob("offline-run-*"))
    if not runs:
        return ""
    return f"wandb sync {' '.join(str(r) for r in runs)}"
