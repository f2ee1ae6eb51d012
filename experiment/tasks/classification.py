"""Long-document classification (Hyperpartisan; experiments.md §c.3).

Per batch (one optimizer step), documents padded to the batch's longest:
    reset memory
    for each `segment_size`-token segment, in order (positions restart at 0; only segment 0 starts with [CLS]/<s>):
        logits = model(segment)          (B, C) from the segment's token 0; the memory carries to the next segment
        loss   = Σ_rows CE · [segment not all padding] / (non-empty segments of the row) / B    ; backward
    optimizer step (no clipping by default: the reference clips nothing), zero the gradients; reset memory

So each document's loss is the mean CE over its own segments; an all-padding segment (a short document in a batch
of long ones) is out of the loss, and the model does not write it to memory (`memoria_write_empty_segments`).
`mask_empty_segments=false` restores the reference: every segment's CE ÷ the batch's segment count.
Training metrics read the mean of the softmax over the row's non-empty segments.

Evaluation reads the **last non-empty segment** of each document (its logits after the whole document went
through memory); loss = CE summed over rows ÷ B. Accuracy and macro-F1 over the epoch (torchmetrics, reduced across
ranks) are logged as `{val,test}/acc-final` and `{val,test}/macro-f1-final`; the checkpoint monitors
`val/macro-f1-final` and the run tests the last checkpoint.

Models reading the document whole (Longformer, BigBird: a `document_tokens` attribute) get each document in one
call, cut to that many tokens, instead of segments.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from .base import MemoryTask


class ClassificationTask(MemoryTask):
    """LightningModule for document classification with segment-wise memory."""

    monitor = "val/macro-f1-final"
    monitor_mode = "max"

    def __init__(self, model: torch.nn.Module, segment_size: int = 512, num_labels: int = 2,
                 mask_empty_segments: bool = True, learning_rate: float = 3e-5, weight_decay: float = 0.0,
                 schedule: str = "constant", warmup_ratio: float = 0.0, max_grad_norm: float | None = None,
                 warmup_steps: int | None = None):
        super().__init__(model, learning_rate=learning_rate, weight_decay=weight_decay, schedule=schedule,
                         warmup_ratio=warmup_ratio, max_grad_norm=max_grad_norm, warmup_steps=warmup_steps)
        self.document_tokens = getattr(model, "document_tokens", None)  # whole-document models
        if self.document_tokens is None:
            self.check_segment_length(segment_size)
        if num_labels < 2:
            raise ValueError(f"num_labels must be >= 2, got {num_labels}; set task.module.num_labels.")
        model_labels = getattr(getattr(model, "config", None), "num_labels", num_labels)
        if model_labels != num_labels:
            raise ValueError(f"the model has {model_labels} labels but task.module.num_labels={num_labels}; set "
                             f"model.config.num_labels={num_labels}.")
        self.segment_size = int(self.document_tokens or segment_size)
        self.num_labels = num_labels
        self.mask_empty_segments = mask_empty_segments
        self.automatic_optimization = False  # one optimizer step spans one backward per segment
        self.save_hyperparameters(ignore=["model"])
        self.metrics = torch.nn.ModuleDict({
            f"{stage}_{name}": metric(num_classes=num_labels, average=average)
            for stage in ("train", "val", "test")
            for name, metric, average in (("acc", MulticlassAccuracy, "micro"), ("f1", MulticlassF1Score, "macro"))
        })

    def setup(self, stage: str) -> None:
        super().setup(stage)
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        data_pad = getattr(datamodule, "pad_token_id", None)
        model_pad = getattr(getattr(self.model, "config", None), "pad_token_id", None)
        if data_pad is not None and model_pad is not None and data_pad != model_pad:
            raise ValueError(f"the tokenizer pads with id {data_pad} but the model's pad_token_id is {model_pad}; "
                             "use the model's tokenizer (task.data.tokenizer) or set "
                             f"model.config.pad_token_id={data_pad}.")

    # ------------------------------------------------------------------------------------------------ segments
    def segments(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        """(ids, mask) chunks (B, S) in order; a whole-document model gets one, the first `document_tokens`."""
        if self.document_tokens is not None:
            yield input_ids[:, :self.document_tokens], attention_mask[:, :self.document_tokens]
            return
        for start in range(0, input_ids.shape[1], self.segment_size):
            yield input_ids[:, start:start + self.segment_size], attention_mask[:, start:start + self.segment_size]

    def num_segments(self, attention_mask: torch.Tensor) -> torch.Tensor:
        """Non-empty segments per row (B,), at least 1."""
        if self.document_tokens is not None:
            return torch.ones(attention_mask.shape[0], dtype=torch.long, device=attention_mask.device)
        lengths = attention_mask.sum(dim=1)  # (B,) documents are left-aligned
        return ((lengths + self.segment_size - 1) // self.segment_size).clamp(min=1)

    # ------------------------------------------------------------------------------------------------ training
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        input_ids, attention_mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        batch_size = labels.shape[0]
        self.model.reset_memory()  # every batch of documents starts from empty memory
        row_segments = self.num_segments(attention_mask).float()  # (B,)
        all_segments = -(-input_ids.shape[1] // self.segment_size) if self.document_tokens is None else 1
        total_loss = torch.zeros((), device=input_ids.device)
        prob_sum = torch.zeros(batch_size, self.num_labels, device=input_ids.device)  # (B, C)
        for ids, mask in self.segments(input_ids, attention_mask):
            nonempty = mask.bool().any(dim=1)  # (B,)
            output = self.model(ids, attention_mask=mask)
            ce = F.cross_entropy(output.logits.float(), labels, reduction="none")  # (B,)
            if self.mask_empty_segments:
                loss = torch.where(nonempty, ce / row_segments, 0.0).sum() / batch_size
            else:  # the reference: every segment of the padded batch, padding ones included
                loss = ce.mean() / all_segments
            if output.aux_loss is not None:
                loss = loss + output.aux_loss
            self.manual_backward(loss)
            total_loss += loss.detach()
            prob_sum += output.logits.detach().float().softmax(-1) * nonempty[:, None]
        self.step_optimizer()
        self.model.reset_memory()
        accuracy, f1 = self.metrics["train_acc"], self.metrics["train_f1"]
        predictions = (prob_sum / row_segments[:, None]).argmax(-1)
        accuracy.update(predictions, labels)
        f1.update(predictions, labels)
        self.log("train/loss", total_loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=batch_size)
        self.log("train/acc", accuracy, on_step=False, on_epoch=True, batch_size=batch_size)
        self.log("train/macro-f1", f1, on_step=False, on_epoch=True, batch_size=batch_size)
        return total_loss

    # ---------------------------------------------------------------------------------------------- evaluation
    @torch.no_grad()
    def last_segment_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Run every segment in order (memory carried) and return the logits of each row's last non-empty one,
        (B, C)."""
        self.model.reset_memory()
        last = None
        for ids, mask in self.segments(input_ids, attention_mask):
            logits = self.model(ids, attention_mask=mask).logits.float()  # (B, C)
            nonempty = mask.bool().any(dim=1)  # (B,)
            last = logits if last is None else torch.where(nonempty[:, None], logits, last)
        self.model.reset_memory()
        return last

    def _eval_step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        labels = batch["labels"]
        logits = self.last_segment_logits(batch["input_ids"], batch["attention_mask"])
        loss = F.cross_entropy(logits, labels, reduction="sum") / labels.shape[0]
        predictions = logits.argmax(-1)
        accuracy, f1 = self.metrics[f"{stage}_acc"], self.metrics[f"{stage}_f1"]
        accuracy.update(predictions, labels)
        f1.update(predictions, labels)
        batch_size = labels.shape[0]
        self.log(f"{stage}/loss", loss, on_step=False, on_epoch=True, sync_dist=True, batch_size=batch_size)
        self.log(f"{stage}/acc-final", accuracy, on_step=False, on_epoch=True, batch_size=batch_size)
        self.log(f"{stage}/macro-f1-final", f1, on_step=False, on_epoch=True, prog_bar=True, batch_size=batch_size)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._eval_step(batch, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._eval_step(batch, "test")
