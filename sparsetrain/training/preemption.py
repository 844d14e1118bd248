"""Stopping early without losing work: preemption signals and the non-finite stop both end with a checkpoint.

SIGTERM (what schedulers send before killing a job) is Lightning's: its handler marks the trainer, the loop
finishes the current step and raises SIGTERMException, and `StopCheckpoint.on_exception` saves
checkpoints/last.ckpt from there, at a step boundary, so `resume=auto` continues exactly. SIGUSR1 is made to
act the same, unless Lightning has taken it for SLURM auto-requeue (`#SBATCH --signal=USR1@90` with
`--requeue`): then its handler saves hpc_ckpt_N.ckpt in the run directory and requeues the job, and
`resume=auto` finds whichever checkpoint is newer. Under DDP, Lightning passes the signal on to every rank.

The process then exits with PREEMPTED_EXIT_CODE, so that a wrapper script can tell "run me again" from
"done" (0) and "fix the input" (2).
"""
import signal
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import lightning.pytorch as L
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from sparsetrain.training.module import NonFiniteLossError

# EX_TEMPFAIL from sysexits.h: a temporary failure, the same command may be run again.
PREEMPTED_EXIT_CODE = 75


class StopCheckpoint(L.Callback):
    """Saves a checkpoint when fit stops early: checkpoints/last.ckpt on SIGTERM or SIGUSR1, and
    checkpoints/nonfinite-stepNNNNNNN.ckpt (the state before the failing step) when nonfinite=stop fires.

    A checkpoint whose weights are not finite is passed over by resume=auto (checkpoints.py)."""

    def __init__(self, checkpoint_dir: Path):
        self.checkpoint_dir = Path(checkpoint_dir)
        self.saved: Optional[Path] = None

    def on_train_start(self, trainer, pl_module):
        # Lightning has installed its handlers by now (and restores the old ones at teardown). SIGUSR1 still
        # at its default would kill the process on the spot; route it to the SIGTERM handler instead.
        if signal.getsignal(signal.SIGUSR1) in (signal.SIG_DFL, None):
            signal.signal(signal.SIGUSR1, _handle_as_sigterm)

    def on_exception(self, trainer, pl_module, exception):
        if trainer.state.fn != TrainerFn.FITTING:
            return
        if isinstance(exception, SIGTERMException):
            self.saved = self.checkpoint_dir / "last.ckpt"
            trainer.save_checkpoint(self.saved)
            if trainer.is_global_zero:
                print(f"sparsetrain: stopped by a signal after step {trainer.global_step}; saved {self.saved}. "
                      f"Run the same command with resume=auto to continue (exit code {PREEMPTED_EXIT_CODE}).",
                      flush=True)
        elif isinstance(exception, NonFiniteLossError):
            self.saved = self.checkpoint_dir / f"nonfinite-step{trainer.global_step:07d}.ckpt"
            trainer.save_checkpoint(self.saved)
            exception.args = (f"{exception.args[0]} The state before this step is saved in {self.saved}.",)


def _handle_as_sigterm(signum, frame):
    handler = signal.getsignal(signal.SIGTERM)
    if callable(handler):
        handler(signum, frame)


@contextmanager
def exit_on_preemption():
    """Turns Lightning's SIGTERMException (a SystemExit with status 0) into exit status PREEMPTED_EXIT_CODE."""
    try:
        yield
    except SIGTERMException as e:
        raise SystemExit(PREEMPTED_EXIT_CODE) from e
