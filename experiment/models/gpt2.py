"""Plain GPT-2, the paper's "Transformer" baseline (experiments.md §d.4).

transformers' own GPT2LMHeadModel with no memory modules at all: every segment is processed alone,
positions restart at 0 each segment, nothing is carried between calls. It follows the project's memory
protocol with no-ops so tasks drive it exactly like the memory models. Config and checkpoints are stock
GPT-2 (`model_type` "gpt2"), so `pretrained: gpt2` (or any GPT2LMHeadModel directory) loads directly.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers import GPT2Config
from transformers import GPT2LMHeadModel as HFGPT2LMHeadModel

from .protocol import MemoryModelOutput, MemoryProtocol, no_memory_state


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the T-1 shifted predictions of a segment: logits (B, T, V) at t score labels
    at t+1. Labels equal to -100 are ignored (HF convention). Computed in float32 whatever the logits'
    dtype."""
    if labels.shape != logits.shape[:2]:
        raise ValueError(
            f"labels must have shape {tuple(logits.shape[:2])} (B, T) like input_ids, "
            f"got {tuple(labels.shape)}"
        )
    # The labels move, not the logits: logits[:, :-1] cannot be flattened without a copy (B x T x V floats, and
    # as many again backward); the last position scores nothing instead.
    shift_labels = F.pad(labels[:, 1:].to(logits.device), (0, 1), value=-100)  # (B, T)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), shift_labels.reshape(-1), ignore_index=-100)


class GPT2LMHeadModel(HFGPT2LMHeadModel, MemoryProtocol):
    """Stock GPT-2 LM (transformers' implementation) behind the memory protocol; memory_kind "none"."""

    config_class = GPT2Config
    memory_kind = "none"

    @property
    def max_segment_length(self) -> int:
        return self.config.n_positions

    def reset_memory(self, rows: torch.Tensor | None = None) -> None:
        if rows is not None and (
            not isinstance(rows, torch.Tensor) or rows.dtype != torch.bool or rows.dim() != 1
        ):
            raise ValueError(f"reset_memory(rows=...) takes a bool tensor of shape (B,), got {rows!r}")
        # Nothing is carried between segments, so there is nothing to forget.

    def get_memory_state(self) -> dict[str, Any]:
        return no_memory_state(self.memory_kind)

    def set_memory_state(self, state: dict[str, Any]) -> None:
        self._check_memory_state(state)

    def memory_stats(self) -> dict[str, float]:
        return {}

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs,
    ) -> MemoryModelOutput:
        """One segment on its own: input_ids (B, T) -> logits (B, T, V), positions 0..T-1, no cache."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape (B, T), got {tuple(input_ids.shape)}")
        T = input_ids.shape[1]
        if T > self.max_segment_length:
            raise ValueError(
                f"segment of {T} tokens is longer than the model's {self.max_segment_length} positions; "
                "use a shorter segment or a model config with a larger n_positions"
            )
        out = self.transformer(input_ids, attention_mask=attention_mask, use_cache=False, **kwargs)
        hidden = out.last_hidden_state  # (B, T, H) after ln_f
        logits = self.lm_head(hidden)  # (B, T, V)
        aux_loss = hidden.new_zeros(())
        loss = None if labels is None else causal_lm_loss(logits, labels) + aux_loss
        return MemoryModelOutput(loss=loss, logits=logits, aux_loss=aux_loss, hidden_states=hidden)
