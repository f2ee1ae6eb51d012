"""Transformer-XL-style streaming lanes for language modelling (experiments.md §c.1, §f.2-3).

1. Each document is cut into segments of T tokens (the reference drops every document's remainder).
2. All segments of the split are concatenated in order: n segments.
3. num_steps = n // B. Lane k holds segments [k * num_steps, (k + 1) * num_steps); step i feeds segment i of every
   lane, so each batch row is one contiguous stream and consecutive steps continue it. The last n mod B segments
   are dropped.
4. Under DDP, rank r always takes lanes [r * B/D, (r + 1) * B/D): every rank runs the same number of steps, nothing
   is padded or replayed, and per-lane memory never moves between ranks. With N nodes x G GPUs, D = N * G and r is
   the global rank (node * G + local rank): node n holds the contiguous lanes [n * B/N, (n + 1) * B/N).

Scoring (labels are returned already aligned: labels[:, t] is the target of position t, -100 = not scored):
- reference (default): predictions stay inside the segment, so its first token is never scored: T - 1 targets.
- score_all_tokens: inputs x[kT:(k+1)T], targets x[kT+1:(k+1)T+1]: every token of a document but its first is scored.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

IGNORE_INDEX = -100


@dataclass(frozen=True)
class SegmentTable:
    """Every segment of a split, in stream order."""

    starts: np.ndarray  # (n,) int64: offset of the segment's first input token in the token array
    lengths: np.ndarray  # (n,) int64: input tokens in the segment (T, or fewer for a kept remainder)
    doc_start: np.ndarray  # (n,) bool: the segment is the first of its document
    segment_length: int
    score_all_tokens: bool

    def __len__(self) -> int:
        return len(self.starts)


def build_segments(
    offsets: np.ndarray, segment_length: int, *, score_all_tokens: bool = False, keep_remainders: bool = False
) -> SegmentTable:
    """Cut every document (offsets: (num_docs + 1,) token boundaries) into segments of `segment_length` inputs."""
    if segment_length < 1:
        raise ValueError(f"segment_length must be >= 1, got {segment_length}")
    offsets = np.asarray(offsets, dtype=np.int64)
    doc_begin, doc_len = offsets[:-1], np.diff(offsets)
    # With score_all_tokens each input needs its next token as a target inside the document: L - 1 usable inputs.
    usable = np.maximum(doc_len - 1, 0) if score_all_tokens else doc_len
    full = usable // segment_length
    remainder = usable - full * segment_length
    count = full + ((remainder > 0) if keep_remainders else 0)  # segments per document

    doc_of_segment = np.repeat(np.arange(len(doc_len)), count)  # (n,)
    first_of_doc = np.concatenate([[0], np.cumsum(count)[:-1]]) if len(count) else np.zeros(0, np.int64)
    index_in_doc = np.arange(len(doc_of_segment)) - np.repeat(first_of_doc, count)  # (n,)
    starts = doc_begin[doc_of_segment] + index_in_doc * segment_length
    lengths = np.minimum(usable[doc_of_segment] - index_in_doc * segment_length, segment_length)
    return SegmentTable(
        starts=starts.astype(np.int64),
        lengths=lengths.astype(np.int64),
        doc_start=index_in_doc == 0,
        segment_length=segment_length,
        score_all_tokens=score_all_tokens,
    )


def rank_lanes(num_lanes: int, world_size: int, rank: int) -> range:
    """The fixed lanes rank `rank` of `world_size` owns."""
    if num_lanes % world_size != 0:
        raise ValueError(
            f"{num_lanes} lanes cannot be split evenly over {world_size} processes (nodes x GPUs per node); set "
            f"task.data.lanes (training) and task.data.eval_lanes (evaluation) to multiples of the number of devices "
            f"({world_size}), or run on fewer devices."
        )
    per_rank = num_lanes // world_size
    return range(rank * per_rank, (rank + 1) * per_rank)


class LaneStream(IterableDataset):
    """Yields one batch per step for this rank's lanes, in step order, starting at `start_step()`.

    Batch: input_ids (b, T) int64, labels (b, T) int64 (aligned, -100 unscored), attention_mask (b, T) int64,
    doc_start (b,) bool (the row begins a new document this step), step (int), and the plain bools has_padding
    (some row is shorter than T) and any_doc_start.
    `len()` is the full number of steps even when resuming mid-epoch: Lightning counts the skipped steps itself.
    With several DataLoader workers, worker w yields steps start+w, start+w+W, ...; the loader's round-robin order
    restores the step order.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        table: SegmentTable,
        num_lanes: int,
        lanes: range | None = None,
        start_step: Callable[[], int] | None = None,
        pad_id: int = 0,
    ):
        super().__init__()
        if num_lanes < 1:
            raise ValueError(f"the number of lanes must be >= 1, got {num_lanes}")
        self.tokens = tokens
        self.table = table
        self.num_lanes = num_lanes
        self.lanes = lanes if lanes is not None else range(num_lanes)
        if self.lanes.start < 0 or self.lanes.stop > num_lanes:
            raise ValueError(f"lanes {self.lanes} fall outside the {num_lanes} lanes of the layout")
        self.num_steps = len(table) // num_lanes
        self.start_step = start_step or (lambda: 0)
        self.pad_id = pad_id

    def __len__(self) -> int:
        return self.num_steps

    def segment_indices(self, step: int) -> np.ndarray:
        """(b,) indices into the segment table of this rank's lanes at `step`."""
        return np.asarray(self.lanes, dtype=np.int64) * self.num_steps + step

    def batch(self, step: int) -> dict:
        if not 0 <= step < self.num_steps:
            raise IndexError(f"step {step} outside [0, {self.num_steps})")
        seg = self.segment_indices(step)  # (b,)
        T = self.table.segment_length
        starts, lengths = self.table.starts[seg], self.table.lengths[seg]  # (b,), (b,)
        window = starts[:, None] + np.arange(T + 1)[None, :]  # (b, T+1): inputs and the token after them
        window = np.minimum(window, max(len(self.tokens) - 1, 0))
        tokens = np.asarray(self.tokens[window], dtype=np.int64)  # (b, T+1)
        position = np.arange(T)[None, :]  # (1, T)
        is_input = position < lengths[:, None]  # (b, T)
        input_ids = np.where(is_input, tokens[:, :T], self.pad_id)
        if self.table.score_all_tokens:
            is_scored = is_input
        else:  # the prediction of the segment's last input falls outside the segment: not scored
            is_scored = position < (lengths[:, None] - 1)
        labels = np.where(is_scored, tokens[:, 1:], IGNORE_INDEX)
        doc_start = self.table.doc_start[seg]
        return {
            "input_ids": torch.from_numpy(input_ids),
            "labels": torch.from_numpy(labels),
            "attention_mask": torch.from_numpy(is_input.astype(np.int64)),
            "doc_start": torch.from_numpy(doc_start.copy()),
            "step": step,
            # Host-side flags, so a task never needs a device sync to ask these:
            "has_padding": bool((lengths < T).any()),
            "any_doc_start": bool(doc_start.any()),
        }

    def __iter__(self) -> Iterator[dict]:
        start = self.start_step()
        if not 0 <= start <= self.num_steps:
            raise ValueError(f"cannot start at step {start}: the stream has {self.num_steps} steps")
        worker = get_worker_info()
        first, stride = (start, 1) if worker is None else (start + worker.id, worker.num_workers)
        for step in range(first, self.num_steps, stride):
            yield self.batch(step)
