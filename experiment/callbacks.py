"""Lightning callbacks the CLI adds to the Trainer on request."""

from __future__ import annotations

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
