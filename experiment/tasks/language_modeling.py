"""Language modelling on WikiText-103, PG-19 and enwik8 (experiments.md §c.1, §f).

Each batch row is one lane, a contiguous stream of segments (experiment/data/lanes.py); the model carries its memory
from one step to the next. Per training step:

    the lane stream restarts (step 0 of an epoch)  -> reset all memory
    first micro-batch of optimizer step g, g % reset_period == 0 -> reset all memory (the paper: 500; enwik8 1500)
    reset_on_document_end and a row starts a new document -> reset that row's memory only
    loss = Σ NLL over the scored tokens / their count (+ the model's aux_loss)

Evaluation starts from empty memory (the base task snapshots the training memory before validation and restores it
afterwards, so validation neither corrupts nor drops it). Metrics over a whole split, sums reduced across ranks:

    {stage}/ppl              exp(Σ NLL / Σ scored tokens): the headline perplexity
    {stage}/bpc              (Σ NLL / Σ scored tokens) / ln 2 (enwik8, `bits_per_character=True`)
    {stage}/ppl_mean_of_batches   the reference's number: the mean over steps of exp(mean NLL of that step)
    {stage}/loss             Σ NLL / Σ scored tokens (nats)
    {stage}/scored_tokens    how many tokens were scored
Training logs train/loss, train/ppl (per step) and train/tokens_per_s (input tokens of all ranks per second).
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from .base import MemoryTask

IGNORE_INDEX = -100


class SplitNLL:
    """Σ NLL, Σ scored tokens, Σ per-step perplexities and the step count over an evaluation.

    Plain tensors (not module buffers: nothing may broadcast or checkpoint them); `compute(reduce_sum)` sums them
    across ranks first, so the ratio is taken over the whole split, never averaged per rank.
    """

    def __init__(self):
        self.sums: torch.Tensor | None = None  # (4,) float64: nll, tokens, per-step ppl, steps

    def update(self, nll_sum: torch.Tensor, tokens: torch.Tensor) -> None:
        nll_sum, tokens = nll_sum.detach().double(), tokens.double()
        # The reference logs exp(mean loss of the batch) per step and averages those (experiments.md §c.1).
        step_ppl = torch.exp(nll_sum / tokens.clamp(min=1))
        values = torch.stack([nll_sum, tokens, step_ppl, torch.ones_like(nll_sum)])
        self.sums = values if self.sums is None else self.sums + values

    def compute(self, reduce_sum=None) -> dict[str, torch.Tensor]:
        sums = self.sums if self.sums is not None else torch.zeros(4, dtype=torch.float64)
        if reduce_sum is not None:
            sums = reduce_sum(sums.clone())
        nll, tokens, step_ppl, steps = sums.unbind()
        mean_nll = nll / tokens.clamp(min=1)
        return {
            "loss": mean_nll,
            "ppl": torch.exp(mean_nll),
            "bpc": mean_nll / math.log(2.0),
            "ppl_mean_of_batches": step_ppl / steps.clamp(min=1),
            "scored_tokens": tokens,
        }

    def reset(self) -> None:
        self.sums = None


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ NLL in nats, number of scored tokens). logits (B, T, V), labels (B, T) aligned, -100 = not scored."""
    vocab = logits.shape[-1]
    nll_sum = F.cross_entropy(logits.reshape(-1, vocab).float(), labels.reshape(-1), ignore_index=IGNORE_INDEX,
                              reduction="sum")
    return nll_sum, (labels != IGNORE_INDEX).sum()


@functools.cache
def compiled_token_nll() -> Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """`token_nll` through torch.compile (default mode, static shapes; one per process). The logits are the
    largest tensor of a step (B x T x V floats: 241 MB at the WikiText-103 shape), and eagerly the loss passes over
    them several times (log-softmax written out, a zero-filled gradient scattered into, the softmax gradient);
    compiled it reads them once or twice forward and once backward, writing only the gradient. Not a CUDA graph:
    graphs would copy the logits into their inputs."""
    return torch.compile(token_nll, dynamic=False)


class LanguageModelingTask(MemoryTask):
    """LightningModule for streaming language modelling.

    Args:
        model: any model of the project (experiment/models/protocol.py).
        segment_length, eval_segment_length: the data's segment lengths, checked against the model's positions.
        reset_period: reset the memory every this many optimizer steps (None or 0: only at stage starts).
        reset_on_document_end: reset a row's memory when its lane starts a new document.
        bits_per_character: also log {stage}/bpc (enwik8).
        compile_loss: compute the loss through `compiled_token_nll` (the configs set it with compile=true).
        The optimizer settings go to MemoryTask.
    """

    monitor = "val/ppl"
    monitor_mode = "min"

    def __init__(self, model: torch.nn.Module, segment_length: int = 150, eval_segment_length: int | None = None,
                 reset_period: int | None = 500, reset_on_document_end: bool = False,
                 bits_per_character: bool = False, compile_loss: bool = False, learning_rate: float = 2e-4,
                 weight_decay: float = 0.0, schedule: str = "linear", warmup_ratio: float = 0.06,
                 max_grad_norm: float | None = 1.0, warmup_steps: int | None = None):
        super().__init__(model, learning_rate=learning_rate, weight_decay=weight_decay, schedule=schedule,
                         warmup_ratio=warmup_ratio, max_grad_norm=max_grad_norm, warmup_steps=warmup_steps)
        self.check_segment_length(segment_length, "task.data.segment_length")
        if eval_segment_length is not None:
            self.check_segment_length(eval_segment_length, "task.data.eval_segment_length")
        if reset_period is not None and reset_period < 0:
            raise ValueError(f"reset_period must be >= 1 (or 0/null for no periodic reset), got {reset_period}; "
                             "set memory.reset_period.")
        self.segment_length = segment_length
        self.eval_segment_length = eval_segment_length or segment_length
        self.reset_period = reset_period or None
        self.reset_on_document_end = reset_on_document_end
        self.bits_per_character = bits_per_character
        self.compile_loss = compile_loss
        self.save_hyperparameters(ignore=["model"])
        self.val_nll = SplitNLL()
        self.test_nll = SplitNLL()
        self._memory_restored = False
        self._last_batch_start: float | None = None
        self._last_batch_tokens = 0

    # ----------------------------------------------------------------------------------------------------------
    # memory
    def on_train_start(self) -> None:
        # A run resumed from a checkpoint continues with the memory it saved; a fresh run starts empty.
        if not self._memory_restored:
            super().on_train_start()
        self._memory_restored = False

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # ModelCheckpoint saves in on_validation_end *before* this module's on_validation_end restores the training
        # memory: a checkpoint written then must hold the training memory (the snapshot), not validation's.
        snapshot = self._train_memory_snapshot
        if snapshot is None:
            super().on_save_checkpoint(checkpoint)
            return
        during_validation = self.model.get_memory_state()
        self.model.set_memory_state(snapshot)
        try:
            super().on_save_checkpoint(checkpoint)
        finally:
            self.model.set_memory_state(during_validation)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self._memory_restored = self._trainer is not None and self.trainer.state.fn == "fit"

    def _reset_before_step(self, batch: dict[str, Any], batch_idx: int, training: bool) -> None:
        if batch["step"] == 0:  # the lane stream starts over (every epoch, every evaluation)
            self.model.reset_memory()
            return
        if training and self.reset_period:
            first_micro_batch = batch_idx % self.trainer.accumulate_grad_batches == 0
            if first_micro_batch and self.global_step % self.reset_period == 0:  # counted in optimizer steps
                self.model.reset_memory()
                return
        if self.reset_on_document_end and batch.get("any_doc_start", True):
            self.model.reset_memory(rows=batch["doc_start"])

    def token_nll(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`token_nll`, compiled with `compile_loss` (built on first use: the task itself stays picklable)."""
        return (compiled_token_nll() if self.compile_loss else token_nll)(logits, labels)

    def _forward(self, batch: dict[str, Any]):
        mask = batch["attention_mask"] if batch.get("has_padding", True) else None
        return self.model(batch["input_ids"], attention_mask=mask)

    # ----------------------------------------------------------------------------------------------------------
    # steps
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        now = time.perf_counter()
        if self._last_batch_start is not None and self._last_batch_tokens:
            rate = self._last_batch_tokens / max(now - self._last_batch_start, 1e-9)
            self.log("train/tokens_per_s", rate, on_step=True, on_epoch=False, prog_bar=True)
        self._last_batch_start = now
        # All ranks step in lockstep on equal shapes: the global rate is the local one times the world size.
        self._last_batch_tokens = batch["input_ids"].numel() * self.trainer.world_size

    def on_train_epoch_end(self) -> None:
        self._last_batch_start = None  # an epoch boundary is no training step

    def on_validation_start(self) -> None:
        super().on_validation_start()
        self._last_batch_start = None  # do not count validation time as a training step

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        self._reset_before_step(batch, batch_idx, training=True)
        output = self._forward(batch)
        nll_sum, tokens = self.token_nll(output.logits, batch["labels"])
        lm_loss = nll_sum / tokens.clamp(min=1)
        loss = lm_loss + output.aux_loss if output.aux_loss is not None else lm_loss
        batch_size = batch["input_ids"].shape[0]
        self.log("train/loss", lm_loss.detach(), on_step=True, on_epoch=True, prog_bar=True, batch_size=batch_size)
        self.log("train/ppl", torch.exp(lm_loss.detach()), on_step=True, on_epoch=False, batch_size=batch_size)
        if output.aux_loss is not None and output.aux_loss.requires_grad:
            self.log("train/aux_loss", output.aux_loss.detach(), on_step=True, on_epoch=False, batch_size=batch_size)
        if self.trainer.log_every_n_steps and batch_idx % self.trainer.log_every_n_steps == 0:
            for name, value in self.model.memory_stats().items():
                name = name if name.startswith("memory/") else f"memory/{name}"
                self.log(name, float(value), on_step=True, on_epoch=False, batch_size=batch_size)
        return loss

    def _eval_step(self, batch: dict[str, Any], batch_idx: int, metric: SplitNLL) -> None:
        self._reset_before_step(batch, batch_idx, training=False)
        output = self._forward(batch)
        nll_sum, tokens = self.token_nll(output.logits, batch["labels"])
        metric.update(nll_sum, tokens)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, self.val_nll)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, self.test_nll)

    def _log_split(self, stage: str, metric: SplitNLL) -> None:
        strategy = self.trainer.strategy
        if metric.sums is None:  # a rank without evaluation steps still joins the reduction
            metric.sums = torch.zeros(4, dtype=torch.float64, device=self.device)
        values = metric.compute(lambda sums: strategy.reduce(sums, reduce_op="sum"))  # Σ across ranks, then ÷
        names = ["loss", "ppl", "ppl_mean_of_batches", "scored_tokens"] + (["bpc"] if self.bits_per_character else [])
        for name in names:
            # Every rank holds the same reduced value: the sync (a mean) changes nothing but keeps Lightning quiet.
            self.log(f"{stage}/{name}", values[name].float(), prog_bar=name in ("ppl", "bpc"), sync_dist=True)
        metric.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_split("val", self.val_nll)

    def on_test_epoch_end(self) -> None:
        self._log_split("test", self.test_nll)
