"""How batches reach the device."""

from __future__ import annotations

from typing import Any


def pin_memory_for(trainer: Any) -> bool:
    """Whether a DataLoader should pin its batches: when `trainer` (a Lightning Trainer, or None) runs on a CUDA
    device. Lightning copies each batch to the GPU with non_blocking=True; from pinned memory the copy is queued
    behind the GPU's work, while a copy from pageable memory first waits for that work to finish (a host sync every
    step, so the host cannot prepare the next step while the GPU runs this one)."""
    root = getattr(getattr(trainer, "strategy", None), "root_device", None)
    return getattr(root, "type", None) == "cuda"
