"""Runs on a SLURM cluster through Hydra's submitit launcher (`hydra/launcher=slurm`): save and resume at the limit.

Before a job's time limit SLURM sends submitit's signal (USR2 unless $SUBMITIT_PREEMPT_SIGNAL says otherwise,
`hydra.launcher.signal_delay_s` seconds early). submitit's handler requeues the job, which reruns the same Hydra job
in the same run directory. `RequeueCheckpoint` runs first: at the next training batch every rank agrees that the
signal came, the run saves `checkpoints/requeue.ckpt`, and then submitit's handler requeues. The rerun finds that
file (`requeue_checkpoint`) and resumes from it: weights, optimizer, scheduler, step counters and the memory.
"""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import Callback

log = logging.getLogger(__name__)

REQUEUE_CHECKPOINT = "requeue.ckpt"


def requeue_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint a requeued job left in its run directory, if any."""
    path = Path(run_dir) / "checkpoints" / REQUEUE_CHECKPOINT
    return path if path.is_file() else None


def submitit_signal() -> signal.Signals | None:
    """The signal submitit's SLURM jobs get before their limit, or None when this process is not such a job."""
    if os.environ.get("SUBMITIT_EXECUTOR") != "slurm":
        return None
    return getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"), None)


class RequeueCheckpoint(Callback):
    """On submitit's pre-limit signal: save `path` at the next batch end (all ranks together), then hand the signal
    to the handler it replaced (submitit's: requeue the job).

    check_every: batches between the ranks' agreement (one all-reduce of a flag; only with several ranks).
    """

    def __init__(self, path: str | Path, signum: int | None = None, check_every: int = 10):
        self.path = Path(path)
        self.signum = signum
        self.check_every = check_every
        self.requested = False
        self._previous: Any = None
        self._frame: Any = None

    def _on_signal(self, signum, frame) -> None:
        log.warning("caught %s before the time limit: saving %s at the next batch", signal.Signals(signum).name,
                    self.path)
        self.requested = True
        self._frame = frame

    def on_fit_start(self, trainer, pl_module) -> None:
        if self.signum is None:
            return
        self._previous = signal.getsignal(self.signum)
        signal.signal(self.signum, self._on_signal)

    def on_fit_end(self, trainer, pl_module) -> None:
        if self.signum is not None and self._previous is not None:
            signal.signal(self.signum, self._previous)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.world_size > 1:
            if batch_idx % self.check_every:
                return
            save = trainer.strategy.reduce_boolean_decision(self.requested, all=False)  # any rank got it
        else:
            save = self.requested
        if not save:
            return
        trainer.save_checkpoint(str(self.path))  # every rank takes part; rank 0 writes
        self.requested = False
        log.warning("saved %s; handing the signal on (requeue)", self.path)
        if callable(self._previous):
            self._previous(self.signum, self._frame)
        trainer.should_stop = True  # where the previous handler returns (other ranks): stop cleanly
