"""Opt-in engram history for the paper's engram studies (keep_history=True).

Records, per row, when each engram was created, every time it fired (was reminded) with its type and age, the
lifespan it gained, when it moved from short-term to long-term memory, when it was deleted (its lifespan ran out)
or evicted (by `ltm_capacity`), and how many engrams of each type the memory held at each remind. Bounded: at most
`limit` events of each kind are kept, the oldest dropped first and counted. Saved as JSON (no pickle). Recording
costs a device-to-host copy per step, so it is off by default.

Timesteps: the add of step t creates its engrams at `timestep` t (the WM of step t); remind, extend, promotion,
deletion and eviction of that step carry the same t. The fired set of step t (what gains a co-fire count) is the
WM of step t (the engrams created at t) plus the engrams reminded at t.

Edge weights E(i->j) = count(i, j) / count(i, i) of the live engrams come from `edge_weights(memoria, row)`.
"""

from __future__ import annotations

import json
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .store import LONGTERM, SHORTTERM, WORKING

if TYPE_CHECKING:  # pragma: no cover
    from .memoria import Memoria
    from .store import SlotStore

EVENT_FIELDS = {
    "created": ("row", "engram_id", "timestep"),
    "fired": ("row", "engram_id", "timestep", "type", "age"),
    "extended": ("row", "engram_id", "timestep", "gain"),
    "deleted": ("row", "engram_id", "timestep", "age"),
    "promoted": ("row", "engram_id", "timestep"),  # short-term -> long-term
    "evicted": ("row", "engram_id", "timestep", "age"),  # removed by ltm_capacity (not by its lifespan)
    "counts": ("row", "timestep", "working", "short_term", "long_term"),  # engrams of each type at the remind
}


class EngramHistory:
    def __init__(self, limit: int = 100_000) -> None:
        self.limit = int(limit)
        self.events: dict[str, deque] = {k: deque() for k in EVENT_FIELDS}
        self.dropped = {k: 0 for k in EVENT_FIELDS}

    # ------------------------------------------------------------ recording
    def _push(self, kind: str, rows: list[list]) -> None:
        q = self.events[kind]
        q.extend(rows)
        while len(q) > self.limit:
            q.popleft()
            self.dropped[kind] += 1

    def on_add(self, timestep: int, ids: torch.Tensor, valid: torch.Tensor) -> None:
        b, w = valid.nonzero(as_tuple=True)
        self._push("created", torch.stack([b, ids[w], torch.full_like(b, timestep)], 1).tolist())

    def on_remind(self, timestep: int, store: SlotStore, slots: torch.Tensor, ok: torch.Tensor) -> None:
        b, m = ok.nonzero(as_tuple=True)
        s = slots[b, m]
        cols = [b, store.created[b, s], torch.full_like(b, timestep), store.types[b, s].long(), store.age[b, s].long()]
        self._push("fired", torch.stack(cols, 1).tolist())
        types = store.types.long()  # (B, C)
        per_type = torch.stack([(types == t).sum(1) for t in (WORKING, SHORTTERM, LONGTERM)], 1)  # (B, 3)
        rows = torch.arange(types.shape[0], device=types.device)
        self._push("counts", torch.cat([rows[:, None], torch.full_like(rows, timestep)[:, None], per_type],
                                       1).tolist())

    def on_extend(self, timestep: int, store: SlotStore, slots: torch.Tensor, hit: torch.Tensor,
                  gain: torch.Tensor) -> None:
        b, m = hit.nonzero(as_tuple=True)
        ids = store.created[b, slots[b, m]].tolist()
        self._push("extended", [[r, i, timestep, g] for r, i, g in zip(b.tolist(), ids, gain[b, m].tolist())])

    def on_promote(self, timestep: int, store: SlotStore, slots: torch.Tensor, promote: torch.Tensor) -> None:
        """`slots` (B, k) whose `promote` (B, k) entries just became long-term."""
        b, m = promote.nonzero(as_tuple=True)
        cols = [b, store.created[b, slots[b, m]], torch.full_like(b, timestep)]
        self._push("promoted", torch.stack(cols, 1).tolist())

    def on_evict(self, timestep: int, store: SlotStore, slots: torch.Tensor, evict: torch.Tensor) -> None:
        """`slots` (B, k) whose `evict` (B, k) entries are being evicted (called before they are freed)."""
        b, m = evict.nonzero(as_tuple=True)
        s = slots[b, m]
        cols = [b, store.created[b, s], torch.full_like(b, timestep), store.age[b, s].long()]
        self._push("evicted", torch.stack(cols, 1).tolist())

    def extend(self, other: EngramHistory, row_offset: int = 0) -> None:
        """Append every event of `other` with its rows shifted by `row_offset` (so streams recorded one after
        another, each from row 0, become rows of one history); its dropped counts add to this one's."""
        for kind in EVENT_FIELDS:
            self._push(kind, [[e[0] + row_offset, *e[1:]] for e in other.events[kind]])
            self.dropped[kind] += other.dropped[kind]

    def num_events(self) -> dict[str, int]:
        return {kind: len(events) for kind, events in self.events.items()}

    def on_adjust(self, timestep: int, store: SlotStore, dead: torch.Tensor) -> None:
        b, s = dead.nonzero(as_tuple=True)
        cols = [b, store.created[b, s], torch.full_like(b, timestep), store.age[b, s].long()]
        self._push("deleted", torch.stack(cols, 1).tolist())

    # ------------------------------------------------------------ reading
    def table(self, kind: str) -> list[dict[str, Any]]:
        """Events of one kind as a list of dicts with the fields of EVENT_FIELDS[kind]."""
        if kind not in EVENT_FIELDS:
            raise ValueError(f"unknown history kind {kind!r}; one of {sorted(EVENT_FIELDS)}")
        return [dict(zip(EVENT_FIELDS[kind], e)) for e in self.events[kind]]

    def state_dict(self) -> dict[str, Any]:
        return {"limit": self.limit, "events": {k: list(v) for k, v in self.events.items()},
                "dropped": dict(self.dropped), "fields": {k: list(v) for k, v in EVENT_FIELDS.items()}}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> EngramHistory:
        h = cls(state["limit"])
        for k in EVENT_FIELDS:  # kinds added later are absent from older files: empty
            h.events[k].extend(state["events"].get(k, []))
            h.dropped[k] = int(state["dropped"].get(k, 0))
        return h

    def save(self, path: str | Path) -> None:
        """Write the history as JSON (atomically: a temp file renamed into place)."""
        path = Path(path)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.state_dict()))
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> EngramHistory:
        return cls.from_state_dict(json.loads(Path(path).read_text()))


def edge_weights(memoria: Memoria, row: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Hebbian edge weights among the live engrams of one row, oldest first.

    Returns (engram_ids (L,), weights (L, L)) with weights[i, j] = count(i, j) / count(i, i) = P(j fires | i fires),
    0 where i never fired.
    """
    store = memoria.store
    if store is None or memoria._empty:
        return torch.zeros(0, dtype=torch.int64), torch.zeros(0, 0)
    if not 0 <= row < store.batch_size:
        raise ValueError(f"row must be in [0, {store.batch_size}), got {row}")
    live = store.live[row]
    slots = live.nonzero().squeeze(1)
    slots = slots[torch.argsort(store.created[row, slots])]
    counts = store.counts[row][slots][:, slots].double()  # (L, L)
    fires = counts.diagonal()[:, None]
    weights = torch.where(fires > 0, counts / fires.clamp(min=1), 0.0)
    return store.created[row, slots].cpu(), weights.float().cpu()
