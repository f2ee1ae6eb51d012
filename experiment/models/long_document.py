"""The Hyperpartisan baselines, transformers' own classifiers behind the memory protocol (nothing re-written).

- `BertSegmentClassifier`, `RobertaSegmentClassifier`: BertForSequenceClassification /
  RobertaForSequenceClassification reading one 512-token segment per call with nothing carried between calls;
  the classification task cuts each document into segments and aggregates them as it does for Memoria.
- `LongformerDocumentClassifier` (4,096 tokens, sliding-window attention, global attention on token 0) and
  `BigBirdDocumentClassifier` (4,096 tokens, block-sparse attention): read the document whole up to their limit.
  They announce `document_tokens`; the task then gives them each document in one call, cut to that length
  (experiments.md §b.1: the paper compared them so; where its numbers came from is unknown).

Every class returns `MemoryModelOutput` (logits (B, num_labels)) and implements the protocol as no-ops.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import (
    BertForSequenceClassification,
    BigBirdForSequenceClassification,
    LongformerForSequenceClassification,
    RobertaForSequenceClassification,
)

from .protocol import MemoryModelOutput, MemoryProtocol, no_memory_state


class StatelessClassifier(MemoryProtocol):
    """Protocol no-ops, and a forward returning `MemoryModelOutput` around the transformers class's own."""

    memory_kind = "none"

    def reset_memory(self, rows: torch.Tensor | None = None) -> None:
        pass

    def get_memory_state(self) -> dict[str, Any]:
        return no_memory_state(self.memory_kind)

    def set_memory_state(self, state: dict[str, Any]) -> None:
        self._check_memory_state(state)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, **kwargs) -> MemoryModelOutput:
        """input_ids (B, T) -> logits (B, num_labels); loss = mean CE when `labels` (B,) are given."""
        out = super().forward(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)
        return MemoryModelOutput(loss=out.loss, logits=out.logits, aux_loss=out.logits.new_zeros(()))


class BertSegmentClassifier(StatelessClassifier, BertForSequenceClassification):
    memory_kind = "bert"

    @property
    def max_segment_length(self) -> int:
        return self.config.max_position_embeddings


class RobertaSegmentClassifier(StatelessClassifier, RobertaForSequenceClassification):
    memory_kind = "roberta"

    @property
    def max_segment_length(self) -> int:
        return self.config.max_position_embeddings - self.config.pad_token_id - 1  # positions start after padding


class LongformerDocumentClassifier(StatelessClassifier, LongformerForSequenceClassification):
    """Global attention on token 0 (transformers' default for classification)."""

    memory_kind = "longformer"

    @property
    def document_tokens(self) -> int:
        return self.config.max_position_embeddings - self.config.pad_token_id - 1  # 4098 - 2 = 4096

    max_segment_length = document_tokens

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, **kwargs) -> MemoryModelOutput:
        global_attention = torch.zeros_like(input_ids)
        global_attention[:, 0] = 1  # the classification token attends everywhere
        return super().forward(input_ids, attention_mask=attention_mask, labels=labels,
                               global_attention_mask=global_attention, **kwargs)


class BigBirdDocumentClassifier(StatelessClassifier, BigBirdForSequenceClassification):
    """Block-sparse attention (transformers falls back to full attention, with a warning, on inputs too short for
    its blocks)."""

    memory_kind = "bigbird"

    @property
    def document_tokens(self) -> int:
        return self.config.max_position_embeddings

    max_segment_length = document_tokens
