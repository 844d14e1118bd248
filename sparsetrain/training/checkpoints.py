"""Checkpoints that survive kills: atomic writes, validation before resuming, and fallback to the
newest good file when the last one is damaged."""
import logging
import os
from pathlib import Path
from typing import Optional

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

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


class LatestCheckpoint(ModelCheckpoint):
    """Writes checkpoints/last.ckpt, what resume=auto continues from: on its step/epoch schedule whatever the
    metrics, and after the last training step.

    Lightning's saver writes last.ckpt at the end only if it never wrote one in this process (so a run ending
    between two scheduled saves would leave an older one), and it writes it in on_train_end, where the
    unfinished epoch already counts as complete: a run resumed from there with a larger max_steps skips the
    rest of that epoch, or trains nothing at all. This one saves at the end of the final step instead.
    """

    def __init__(self, dirpath, every_n_train_steps=None, every_n_epochs=None):
        # No version counter: overwrite last.ckpt even when this saver did not write it (a resume from another
        # checkpoint, a moved run directory) instead of starting last-v1.ckpt beside it.
        super().__init__(dirpath=dirpath, save_last=True, save_top_k=0, monitor=None, enable_version_counter=False,
                         every_n_train_steps=every_n_train_steps, every_n_epochs=every_n_epochs)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if is_final_step(trainer) and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_end(self, trainer, pl_module):
        # Stopped some other way (early stopping, max_time): better an end state than none.
        if self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


class BestCheckpoint(ModelCheckpoint):
    """Keeps the `save_top_k` best checkpoints by `monitor` (checkpoints/step*.ckpt), ranked right after a validation.

    Lightning ranks at the end of every training epoch by the last value logged; an epoch that max_steps cuts
    short runs no validation, so that value would be an older model's, or missing (a warning) in a run that
    stops before its first validation. Such an epoch end is not ranked.
    """

    def __init__(self, dirpath, save_top_k: int, monitor: Optional[str], mode: str):
        super().__init__(dirpath=dirpath, filename="step{step:07d}", auto_insert_metric_name=False,
                         save_top_k=save_top_k, monitor=monitor, mode=mode)
        self.validated_at_step: Optional[int] = None

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.validated_at_step = trainer.global_step
        super().on_validation_end(trainer, pl_module)

    def on_train_epoch_end(self, trainer, pl_module):
        if self.monitor is None or self.validated_at_step == trainer.global_step:
            super().on_train_epoch_end(trainer, pl_module)


def is_final_step(trainer) -> bool:
    if trainer.max_steps not in (None, -1) and trainer.global_step >= trainer.max_steps:
        return True
    last_epoch = trainer.max_epochs not in (None, -1) and trainer.current_epoch + 1 >= trainer.max_epochs
    return last_epoch and trainer.fit_loop.epoch_loop.batch_progress.is_last_batch


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
    bad = nonfinite_tensors(ckpt["state_dict"])
    if bad:
        raise CheckpointError(
            f"checkpoint {path} holds non-finite weights ({', '.join(bad[:3])}); it was written when training "
            "diverged (nonfinite=stop): resume from an older checkpoint with a lower optim.lr")
    return ckpt


def nonfinite_tensors(state_dict: dict) -> list:
    """Names of floating-point tensors that hold NaN or inf."""
    return [k for k, v in state_dict.items()
            if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()]


def checkpoints_newest_first(run_dir: Path) -> list:
    """Every checkpoint of a run: checkpoints/*.ckpt and the hpc_ckpt_*.ckpt that Lightning's SLURM
    auto-requeue writes into the run directory."""
    run_dir = Path(run_dir)
    files = [p for p in (*run_dir.glob("checkpoints/*.ckpt"), *run_dir.glob("hpc_ckpt_*.ckpt")) if p.is_file()]
    # last.ckpt first among equals: it is the one written at the newest step
    return sorted(files, key=lambda p: (p.stat().st_mtime, p.name == "last.ckpt"), reverse=True)


def remove_partial_writes(run_dir: Path) -> list:
    """Delete the temporary files of checkpoint writes that a kill interrupted (AtomicCheckpointIO's
    .NAME.tmp-PID); the checkpoint they were replacing is intact. Returns the paths removed."""
    removed = []
    for tmp in Path(run_dir).glob("checkpoints/.*.tmp-*"):
        pid = tmp.name.rpartition("-")[2]
        if pid.isdigit() and _process_alive(int(pid)):
            continue  # a save in progress (another rank or process), not a leftover
        tmp.unlink(missing_ok=True)
        log.warning("removed %s, a checkpoint write that was interrupted (process killed while saving)", tmp)
        removed.append(tmp)
    return removed


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def load_resume_checkpoint(run_dir: Path, resume: Optional[str]) -> tuple:
    """(path, loaded checkpoint) that `resume` means, or (None, None) for a fresh run. None: a fresh
    run (refused where one would overwrite checkpoints). 'auto': the newest loadable checkpoint in
    run_dir, or a fresh start if none. The file is loaded once here, to validate it; callers reuse it."""
    remove_partial_writes(run_dir)
    existing = checkpoints_newest_first(run_dir)
    if resume in (None, "", "null"):
        if existing:
            raise CheckpointError(
                f"run directory {run_dir} already holds checkpoints ({existing[0].name}); "
                "pass resume=auto to continue it, or run_name=<new name> for a new run")
        return None, None
    if resume == "auto":
        skipped = []
        for path in existing:
            try:
                ckpt = load_checkpoint_file(path)
            except CheckpointError as e:
                log.warning("%s; trying an older one", e)
                skipped.append(path.name)
                continue
            if skipped:
                print(f"resume=auto: skipped unusable {', '.join(skipped)}; continuing from {path}")
            log.info("resume=auto: continuing from %s", path)
            return path, ckpt
        if skipped:
            # Starting over here would silently throw the run away; let a person decide.
            raise CheckpointError(
                f"resume=auto: every checkpoint in {run_dir} is unusable ({', '.join(skipped)}, see the warnings "
                "above); pass resume=PATH to an older copy, or run_name=<new name> to start a new run")
        log.info("resume=auto: no usable checkpoint in %s, starting fresh", run_dir)
        print(f"resume=auto: no checkpoint in {run_dir}, starting fresh")
        return None, None
    path = Path(resume).expanduser()
    return path, load_checkpoint_file(path)


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
