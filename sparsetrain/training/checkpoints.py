"""Checkpoints that survive kills: atomic writes, validation before resuming, and fallback to the
newest good file when the last one is damaged."""
import logging
import os
from pathlib import Path
from typing import Optional

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

log = logging.getLogger("sparsetrain")


class CheckpointError(RuntimeError):
    pass


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save to a temporary file in the same folder, fsync, then rename over the target: a kill
    at any moment leaves either the old file or the new one, never half of one."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def load_checkpoint(self, path, map_location=None, weights_only=None):
        return load_checkpoint_file(Path(path), map_location or "cpu")


def load_checkpoint_file(path: Path, map_location="cpu") -> dict:
    """Load a Lightning checkpoint or raise CheckpointError naming the file and what to do."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist: check resume=PATH")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # truncated zip, pickle garbage, wrong file type: all mean "unusable"
        raise CheckpointError(
            f"checkpoint {path} is corrupt or truncated ({type(e).__name__}); delete it, or use "
            "resume=auto to fall back to the newest good checkpoint") from e
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"{path} is not a training checkpoint (no state_dict): pass a .ckpt written by train.py")
    return ckpt


def checkpoints_newest_first(run_dir: Path) -> list:
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    files = [p for p in folder.glob("*.ckpt") if p.is_file()]
    # last.ckpt first among equals: it is the one written at the newest step
    return sorted(files, key=lambda p: (p.stat().st_mtime, p.name == "last.ckpt"), reverse=True)


def find_resume_checkpoint(run_dir: Path, resume: Optional[str]) -> Optional[Path]:
    """Which checkpoint `resume` means. None: a fresh run (refused where one would overwrite
    checkpoints). 'auto': the newest loadable checkpoint in run_dir, or a fresh start if none."""
    existing = checkpoints_newest_first(run_dir)
    if resume in (None, "", "null"):
        if existing:
            raise CheckpointError(
                f"run directory {run_dir} already holds checkpoints ({existing[0].name}); "
                "pass resume=auto to continue it, or run_name=<new name> for a new run")
        return None
    if resume == "auto":
        for path in existing:
            try:
                load_checkpoint_file(path)
            except CheckpointError as e:
                log.warning("%s; trying an older one", e)
                continue
            log.info("resume=auto: continuing from %s", path)
            return path
        log.info("resume=auto: no usable checkpoint in %s, starting fresh", run_dir)
        print(f"resume=auto: no checkpoint in {run_dir}, starting fresh")
        return None
    path = Path(resume).expanduser()
    load_checkpoint_file(path)
    return path


def check_compatible(ckpt: dict, model_state: dict, identity: dict, force: bool, path: Path) -> None:
    """Refuse a checkpoint from another model or recipe before training starts."""
    saved = ckpt.get("sparsetrain", {})
    if not force:
        diffs = [f"{k}: checkpoint {saved.get(k)!r} vs now {v!r}" for k, v in identity.items()
                 if k in saved and saved[k] != v]
        if diffs:
            raise CheckpointError(
                f"{path} was written by a different run ({'; '.join(diffs)}); "
                "use the same recipe, or pass force_resume=true to resume anyway")
    state = ckpt["state_dict"]
    missing = [k for k in model_state if k not in state]
    unexpected = [k for k in state if k not in model_state]
    shape = [k for k in model_state if k in state and tuple(state[k].shape) != tuple(model_state[k].shape)]
    if missing or unexpected or shape:
        detail = "; ".join(f"{label}: {keys[:3]}" for label, keys in
                           (("missing", missing), ("unexpected", unexpected), ("shape differs", shape)) if keys)
        raise CheckpointError(
            f"{path} holds a different model ({detail}); check model.* and sparsity.* against the run that wrote it")
