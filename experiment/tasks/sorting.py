"""The sorting task (experiments.md §c.2): long sequences cut into segments, memory carried between them.

Per batch (one optimizer step):
    reset memory
    for each chunk of `segment_size` tokens, in order:
        no target label in the chunk  -> forward under no_grad (only builds memory)
        else                          -> loss = Σ CE over its target positions / 20, mean over the batch; backward
    clip the gradient norm, optimizer step, scheduler step, zero the gradients (always)

Metrics: top-1 accuracy over the 20 target positions with teacher forcing. `train/acc` is per step;
`val/acc-final` and `test/acc-final` accumulate over the epoch (exact counts, summed across ranks).
`test/memoryless-acc` is the memory-less line of the same examples (`memoryless_correct`):
what a perfect counter scores when it sees only the segment a target sits in. Everything above it is what memory
contributed (experiments.md §e.2).
The checkpoint monitors `val/acc-final` (max); the run tests the last checkpoint.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchmetrics import Metric

from .base import MemoryTask

IGNORE_INDEX = -100


def memoryless_correct(input_ids: torch.Tensor, labels: torch.Tensor, segment_size: int,
                       num_symbols: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    """(correct, counted) of the memory-less line on a batch of sorting examples.

    The line is the best a model without memory can do: a perfect counter that, for each target position p, sees
    only the chunk that holds p (positions from the chunk's start up to p, as the model does with teacher forcing
    and without memory). It counts the sequence symbols it sees, leaves out the symbols already answered in that
    chunk, and predicts the most frequent remaining symbol (ties: first appearance in the chunk, as the target
    orders them), or, when it saw none of them, the smallest unanswered symbol (the target lists unseen symbols
    ascending).

    input_ids, labels: (B, L+20) as `SortingDataset` gives them (labels -100 before the separator).
    """
    batch_size, total = input_ids.shape
    correct = torch.zeros((), dtype=torch.long)
    counted = torch.zeros((), dtype=torch.long)
    ids = input_ids.detach().cpu()
    lab = labels.detach().cpu()
    positions = torch.arange(total)
    symbols = torch.arange(num_symbols)
    for row in range(batch_size):
        target_pos = (lab[row] != IGNORE_INDEX).nonzero().flatten()  # (20,) positions L .. L+19
        if target_pos.numel() == 0:
            continue
        sep = int(target_pos[0])  # L: the separator's position, which predicts target[0]
        seq = ids[row, :sep]  # (L,) the sequence symbols
        for p in target_pos.tolist():
            start = (p // segment_size) * segment_size  # the chunk holding p
            window = seq[start:]  # sequence symbols the chunk shows (empty when it starts after the separator)
            seen = window[:, None] == symbols  # (w, V)
            count = seen.sum(0)  # (V,)
            first = torch.where(seen, positions[:window.shape[0], None], total).min(0).values if window.numel() \
                else torch.full((num_symbols,), total)  # (V,) first appearance in the chunk, `total` if none
            answered = torch.zeros(num_symbols, dtype=torch.bool)  # answers visible in the chunk: inputs sep+1 .. p
            shown = ids[row, max(start, sep + 1):p + 1]
            answered[shown[shown < num_symbols]] = True
            # rank: most counted, then first seen, then smallest symbol; answered symbols never
            key = count * (total + 1) * num_symbols - first * num_symbols - symbols  # (V,) larger is better
            key = torch.where(answered, torch.iinfo(torch.long).min, key)
            correct += int(key.argmax() == lab[row, p])
            counted += 1
    return correct, counted


class TokenAccuracy(Metric):
    """Σ correct / Σ counted over the epoch; both sums are reduced across ranks before dividing."""

    full_state_update = False

    def __init__(self):
        super().__init__()
        self.add_state("correct", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, correct: torch.Tensor, total: torch.Tensor) -> None:
        self.correct += correct.long()
        self.total += total.long()

    def compute(self) -> torch.Tensor:
        return self.correct.float() / self.total.clamp(min=1).float()


class SortingTask(MemoryTask):
    """LightningModule for sorting. `segment_size` is checked against the model's positions at construction.

    num_targets: target tokens per example (20); the per-chunk loss divides by it so the example's loss is the
    mean CE over its targets however they are split across chunks.
    """

    monitor = "val/acc-final"
    monitor_mode = "max"

    def __init__(self, model: torch.nn.Module, segment_size: int = 256, num_targets: int = 20,
                 learning_rate: float = 2e-4, weight_decay: float = 0.0, schedule: str = "linear",
                 warmup_ratio: float = 0.06, max_grad_norm: float | None = 1.0, warmup_steps: int | None = None):
        super().__init__(model, learning_rate=learning_rate, weight_decay=weight_decay, schedule=schedule,
                         warmup_ratio=warmup_ratio, max_grad_norm=max_grad_norm, warmup_steps=warmup_steps)
        self.check_segment_length(segment_size)
        if num_targets < 1:
            raise ValueError(f"num_targets must be >= 1, got {num_targets}; the sorting task has 20 targets.")
        self.segment_size = segment_size
        self.num_targets = num_targets
        self.automatic_optimization = False  # one optimizer step spans several backward passes (one per chunk)
        self.save_hyperparameters(ignore=["model"])
        self.val_accuracy = TokenAccuracy()
        self.test_accuracy = TokenAccuracy()
        self.test_memoryless = TokenAccuracy()  # the memory-less line of the test examples (a property of the data)

    def _chunk_loss(
        self, logits: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss, correct, counted) of one chunk. logits (B, S, V), labels (B, S) with -100 off-target."""
        batch_size, seg_len, vocab = logits.shape
        token_ce = F.cross_entropy(logits.reshape(-1, vocab).float(), labels.reshape(-1),
                                   ignore_index=IGNORE_INDEX, reduction="none").view(batch_size, seg_len)  # (B, S)
        loss = (token_ce.sum(dim=1) / self.num_targets).mean()  # Σ over targets / 20, mean over the batch
        is_target = labels != IGNORE_INDEX  # (B, S)
        correct = ((logits.argmax(dim=-1) == labels) & is_target).sum()
        return loss, correct, is_target.sum()

    def _run_example_batch(self, batch: dict[str, torch.Tensor], train: bool):
        """All chunks of a batch in order; backward per target chunk when `train`. Returns (loss, correct, counted)."""
        input_ids, labels = batch["input_ids"], batch["labels"]  # (B, L+20), (B, L+20)
        self.model.reset_memory()  # every example starts from empty memory
        total_loss = torch.zeros((), device=input_ids.device)
        correct = torch.zeros((), dtype=torch.long, device=input_ids.device)
        counted = torch.zeros((), dtype=torch.long, device=input_ids.device)
        for start in range(0, input_ids.shape[1], self.segment_size):
            chunk_ids = input_ids[:, start:start + self.segment_size]  # (B, S)
            chunk_labels = labels[:, start:start + self.segment_size]  # (B, S)
            # Whether a chunk holds targets depends only on positions (same for every row), not on data values.
            has_targets = start + chunk_ids.shape[1] > input_ids.shape[1] - self.num_targets
            if not has_targets:
                with torch.no_grad():
                    self.model(chunk_ids)  # only builds memory
                continue
            with torch.set_grad_enabled(train):
                output = self.model(chunk_ids)
                loss, chunk_correct, chunk_counted = self._chunk_loss(output.logits, chunk_labels)
                if output.aux_loss is not None:
                    loss = loss + output.aux_loss
            if train:
                self.manual_backward(loss)
            total_loss += loss.detach()
            correct += chunk_correct
            counted += chunk_counted
        return total_loss, correct, counted

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, correct, counted = self._run_example_batch(batch, train=True)
        self.step_optimizer()
        self.model.reset_memory()  # nothing of this batch may leak into the next one
        batch_size = batch["input_ids"].shape[0]
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=batch_size)
        self.log("train/acc", correct.float() / counted.clamp(min=1).float(), on_step=True, on_epoch=False,
                 prog_bar=True, batch_size=batch_size)
        return loss

    def _eval_step(self, batch: dict[str, torch.Tensor], stage: str, accuracy: TokenAccuracy) -> torch.Tensor:
        loss, correct, counted = self._run_example_batch(batch, train=False)
        self.model.reset_memory()
        accuracy.update(correct, counted)
        batch_size = batch["input_ids"].shape[0]
        self.log(f"{stage}/loss", loss, on_step=False, on_epoch=True, sync_dist=True, batch_size=batch_size)
        self.log(f"{stage}/acc-final", accuracy, on_step=False, on_epoch=True, prog_bar=True, batch_size=batch_size)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._eval_step(batch, "val", self.val_accuracy)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        correct, counted = memoryless_correct(batch["input_ids"], batch["labels"], self.segment_size)
        self.test_memoryless.update(correct.to(self.device), counted.to(self.device))
        self.log("test/memoryless-acc", self.test_memoryless, on_step=False, on_epoch=True,
                 batch_size=batch["input_ids"].shape[0])
        return self._eval_step(batch, "test", self.test_accuracy)
