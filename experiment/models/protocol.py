"""The one memory protocol every model of the project follows.

Tasks drive every model the same way and never special-case one:

    model.reset_memory()                 # forget everything (start of an example / stage / reset period)
    out = model(input_ids)               # one segment; the model carries its memory to the next call itself
    loss = task_loss(out.logits) + out.aux_loss
    state = model.get_memory_state()     # snapshot for a checkpoint or around validation
    model.set_memory_state(state)        # restore it exactly

Carried state (Memoria engrams + previous hidden states, Transformer-XL mems, compressive mems/cmems, the
infinity-former's continuous memory) lives on the model as plain attributes: never parameters, never persistent
buffers, never synchronised across ranks. A model without memory (plain GPT-2) implements the protocol as no-ops.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers.utils import ModelOutput


@dataclass
class MemoryModelOutput(ModelOutput):
    """What every model's forward returns.

    loss: shifted mean cross-entropy over `labels` (HF convention, -100 ignored) plus `aux_loss`; only when labels
        are given. Tasks usually compute their own loss from `logits` and add `aux_loss`.
    logits: (B, T, V)
    aux_loss: scalar tensor, the model's auxiliary training loss already weighted (compressive reconstruction,
        infinity-former KL); zero for models that have none.
    hidden_states: (B, T, H) final hidden states after the last norm.
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    hidden_states: torch.Tensor | None = None


class MemoryProtocol:
    """Mixin for every model. `memory_kind` names the state layout so a foreign state is refused."""

    memory_kind: str = "none"

    def reset_memory(self, rows: torch.Tensor | None = None) -> None:
        """Forget the carried state: all rows, or only rows where the bool mask `rows` (B,) is True."""
        raise NotImplementedError

    def get_memory_state(self) -> dict[str, Any]:
        """A detached copy of the carried state: a dict of tensors / plain Python values (safe to torch.save)."""
        raise NotImplementedError

    def set_memory_state(self, state: dict[str, Any]) -> None:
        """Restore a state from `get_memory_state` of a model of the same kind; ValueError otherwise."""
        raise NotImplementedError

    def memory_stats(self) -> dict[str, float]:
        """Cheap scalars worth logging (engram counts, memory lengths). Must not force a host sync per step
        unless called for logging."""
        return {}

    def _check_memory_state(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or "memory_kind" not in state:
            raise ValueError(
                f"{type(self).__name__}.set_memory_state got {type(state).__name__}, not a memory state; "
                "pass what get_memory_state() returned."
            )
        if state["memory_kind"] != self.memory_kind:
            raise ValueError(
                f"memory state of kind {state['memory_kind']!r} handed to a {self.memory_kind!r} model "
                f"({type(self).__name__}); load a checkpoint written by the same model type."
            )


class MemoryOfBaseModel(MemoryProtocol):
    """The protocol of a model with a head (LM or classifier) whose memory lives in its base model: every call goes
    to the attribute that `memory_base` names (`transformer`, `bert`, `roberta`)."""

    memory_base: str = "transformer"

    @property
    def _memory_owner(self) -> MemoryProtocol:
        return getattr(self, self.memory_base)

    @property
    def max_segment_length(self) -> int:
        return self._memory_owner.max_segment_length

    def reset_memory(self, rows: torch.Tensor | None = None) -> None:
        self._memory_owner.reset_memory(rows)

    def get_memory_state(self) -> dict[str, Any]:
        return self._memory_owner.get_memory_state()

    def set_memory_state(self, state: dict[str, Any]) -> None:
        self._memory_owner.set_memory_state(state)

    def memory_stats(self) -> dict[str, float]:
        return self._memory_owner.memory_stats()


def no_memory_state(kind: str) -> dict[str, Any]:
    return {"memory_kind": kind}
