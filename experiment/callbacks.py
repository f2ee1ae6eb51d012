"""Lightning callbacks the CLI adds to the Trainer on request."""

from __future__ import annotations

import logging

import torch
from lightning.pytorch.callbacks import Callback


class CudaGraphStepMarker(Callback):
    """Tells torch.compile's CUDA graphs (compile modes reduce-overhead and max-autotune) where each batch starts.

    Those modes replay every compiled block's forward and backward from CUDA graphs whose outputs live in memory
    that later replays reuse. Marking each training, validation and test batch as a new step lets a replay reuse
    what the previous batch produced, while nothing inside one batch (several segments of one example, then the
    backward) is overwritten. Outside those modes a mark costs nothing but a counter.
    """

    @staticmethod
    def _mark() -> None:
        torch.compiler.cudagraph_mark_step_begin()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._mark()

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._mark()

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._mark()


class RunInterrupted(Exception):
    """Training stopped on SIGINT / SIGTERM after saving a resumable checkpoint (`InterruptCheckpoint`)."""

    def __init__(self, signal_name: str, checkpoint: str):
        super().__init__(f"{signal_name}: saved {checkpoint}")
        self.signal_name = signal_name
        self.checkpoint = checkpoint


class InterruptCheckpoint(Callback):
    """Ctrl-C (SIGINT) or SIGTERM during training: finish the current batch, save `path` (the weights, optimizer,
    scheduler, loop counters, the data stream's position, the memory and the RNG states: a normal Lightning
    checkpoint), then stop with RunInterrupted. The run's progress since the last validation is kept. A second
    Ctrl-C aborts at once, without saving.

    A signal during validation is acted on at the next training batch; one after the last training batch lets
    `fit` end (its last checkpoint is then complete) and `requested` tells the caller.
    check_every: training batches between the ranks' agreement when there are several (one all-reduce of a flag).
    """

    SIGNALS = ("SIGINT", "SIGTERM")

    def __init__(self, path: str, check_every: int = 10):
        self.path = str(path)
        self.check_every = check_every
        self.requested: str | None = None  # the name of the signal received
        self._previous: dict = {}

    def _on_signal(self, signum, frame) -> None:
        import signal

        name = signal.Signals(signum).name
        if self.requested is not None and name == "SIGINT":  # pressed again: give up on saving
            raise KeyboardInterrupt
        self.requested = name
        logging.getLogger("memoria-exp").warning(
            "%s received: saving %s after this training batch, then stopping (Ctrl-C again aborts without saving)",
            name, self.path)

    def on_train_start(self, trainer, pl_module) -> None:
        # After Lightning's signal connector (it sets its SIGTERM handler when fit starts): this one wins.
        import signal
        import threading

        if threading.current_thread() is not threading.main_thread():
            return
        for name in self.SIGNALS:
            signum = getattr(signal, name)
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._on_signal)

    def _restore(self) -> None:
        import signal

        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def on_train_end(self, trainer, pl_module) -> None:
        self._restore()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._restore()  # before Lightning's teardown puts back the handlers from before fit

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._restore()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        requested = self.requested is not None
        if trainer.world_size > 1:
            if batch_idx % self.check_every:
                return
            requested = trainer.strategy.reduce_boolean_decision(requested, all=False)  # any rank got one
        if not requested:
            return
        # Saved where ModelCheckpoint(every_n_train_steps) saves: Lightning resumes such a checkpoint with the next
        # batch (its loops know the batch ended).
        trainer.save_checkpoint(self.path)  # every rank takes part; rank 0 writes
        raise RunInterrupted(self.requested or "signal", self.path)
