"""Fixed-capacity slot storage for the engrams of B independent rows.

Every row owns C slots. A slot holds one engram or nothing (type NULL). Nothing is ever compacted: a deleted engram
just frees its slot, and a slot's row and column of co-fire counts are zeroed when the slot is handed out again, so
the (B, C + 1, C) count matrix (row C: an all-zero sink for "no node") is never copied in the per-step path. Reads
always mask by type, so stale counts of free slots are never seen.

Creation order is kept in `created` (a store-wide counter, the same for all rows at one step: it doubles as the
engram id), which is what "oldest" means everywhere.

Capacity grows amortised (x1.5) when the live count could exceed it. The store keeps a host-side upper bound on the
live count per row, so it asks the device only when that bound says the store might be full: no host sync while
there is room. With a fixed `ltm_capacity` the capacity is fixed and never grows.
"""

from __future__ import annotations

import torch

from .engrams import Engrams, EngramType

NULL = int(EngramType.NULL)
WORKING = int(EngramType.WORKING)
SHORTTERM = int(EngramType.SHORTTERM)
LONGTERM = int(EngramType.LONGTERM)

_STATE_TENSORS = ("data", "sq_norm", "lifespan", "types", "created", "age", "counts", "next_id")
_GROWN = ("data", "sq_norm", "lifespan", "types", "created", "age", "counts")  # the per-slot tensors
_RANK_BY_COMPARE = 1 << 24  # largest comparison (elements) made instead of a sort: view_ranks, Memoria._top


def first_true(mask: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The positions of the first k True entries of each row of `mask` (B, C), in order, as (slots (B, k), ok
    (B, k)); past a row's last True entry, slots is C - 1 and ok False. A running count and a binary search in it
    (two small kernels when compiled, fused with what reads them) instead of a top-k over the mask."""
    B, C = mask.shape
    upto = mask.cumsum(1, dtype=torch.int32)  # (B, C) True entries up to and including each
    rank = torch.arange(1, k + 1, device=mask.device, dtype=torch.int32).expand(B, k).contiguous()  # (B, k)
    slots = torch.searchsorted(upto, rank)  # (B, k) where the count first reaches 1, 2, ..., k
    return slots.clamp(max=C - 1), rank <= upto[:, -1:]


def write_slots(target: torch.Tensor, dim: int, slots: torch.Tensor, values: torch.Tensor | float,
                accumulate: bool = False) -> None:
    """Write `values` at `slots` (B, K) along `dim` of every batch row of `target`, in place: dim 1,
    target[b, slots[b, k]] (for a 3-d target the whole row behind it); dim 2 (a 3-d target), target[b, :, slots[b, k]]
    = values (+= with `accumulate`). values: a number, or a tensor shaped like what is written ((B, K), (B, K, D)
    or (B, R, K)).

    Eagerly a scatter_ (scatter_add_), one kernel. Inside torch.compile an index_put_, which inductor writes into
    the tensor in place and fuses with the work around it: an in-place scatter into a tensor the step receives
    becomes, under inductor, a copy in, the scatter and a copy back (for the count matrix, passes over all of it;
    on an H100 ~50 us each at the LM configuration)."""
    B, K = slots.shape
    if torch.compiler.is_compiling():
        rows = torch.arange(B, device=slots.device)
        if dim == 1:
            index = (rows[:, None], slots)
        else:
            index = (rows[:, None, None], torch.arange(target.shape[1], device=slots.device)[None, :, None],
                     slots[:, None, :])
        if accumulate:
            target.index_put_(index, values, accumulate=True)
        else:
            target[index] = values
        return
    if dim == 2:
        index = slots[:, None, :].expand(B, target.shape[1], K)
    else:
        index = slots if target.dim() == 2 else slots[:, :, None].expand(B, K, target.shape[2])
    if accumulate:
        target.scatter_add_(dim, index, values)
    else:
        target.scatter_(dim, index, values)


class SlotStore:
    def __init__(self, batch_size: int, hidden_dim: int, capacity: int, device: torch.device,
                 count_dtype: torch.dtype = torch.int32) -> None:
        B, C, H = batch_size, capacity, hidden_dim
        self.device = device
        self.count_dtype = count_dtype
        self.data = torch.zeros(B, C, H, device=device)  # (B, C, H) float32 snapshots
        # (B, C) their squared norms, written with them: the distances need them, and recomputing all of them
        # every step is a pass over the whole store
        self.sq_norm = torch.zeros(B, C, device=device)
        self.lifespan = torch.zeros(B, C, device=device)  # (B, C)
        self.types = torch.zeros(B, C, dtype=torch.uint8, device=device)  # (B, C) EngramType
        self.created = torch.zeros(B, C, dtype=torch.int64, device=device)  # (B, C) creation id = engram id
        self.age = torch.zeros(B, C, dtype=torch.int32, device=device)  # (B, C)
        # (B, C + 1, C) co-fire counts; row C is a sink that stays zero, so "no node" (index C) has no edges
        self.counts = torch.zeros(B, C + 1, C, dtype=count_dtype, device=device)
        # the next engram id, on the device, so a step never reads a host counter (CUDA-graph replays can't)
        self.next_id = torch.zeros((), dtype=torch.int64, device=device)
        self.live_bound = 0  # host-side upper bound on the live engrams of any row
        self.version = 0  # bumped whenever the tensors are reallocated (captured CUDA graphs then go stale)

    # ---------------------------------------------------------------- shape
    @property
    def batch_size(self) -> int:
        return self.data.shape[0]

    @property
    def capacity(self) -> int:
        return self.data.shape[1]

    @property
    def hidden_dim(self) -> int:
        return self.data.shape[2]

    @property
    def live(self) -> torch.Tensor:  # (B, C) bool
        return self.types != NULL

    def live_counts(self) -> torch.Tensor:  # (B,) int64
        return self.live.sum(1)

    # ---------------------------------------------------------------- capacity
    def grow(self, new_capacity: int) -> None:
        """Reallocate to `new_capacity` slots per row, keeping every engram in its slot."""
        B, C, H = self.data.shape
        if new_capacity <= C:
            return
        n = new_capacity

        def bigger(t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
            out = torch.zeros(shape, dtype=t.dtype, device=t.device)
            out[tuple(slice(0, s) for s in t.shape)] = t  # (the old sink row lands on a free slot's row: zero)
            return out

        for name in _GROWN:
            t = getattr(self, name)
            shape = (B, n, H) if name == "data" else (B, n + 1, n) if name == "counts" else (B, n)
            setattr(self, name, bigger(t, shape))
        self.version += 1

    # ---------------------------------------------------------------- slots
    def allocate(self, num: int) -> torch.Tensor:
        """Pick `num` free slots per row (B, num); the caller has made sure there is room."""
        return first_true(self.types == NULL, num)[0]  # (B, num) the lowest free slots, found without a sync

    def clear_counts(self, slots: torch.Tensor) -> None:
        """Zero the rows and columns of co-fire counts of `slots` (B, K) before they are reused."""
        write_slots(self.counts, 1, slots, 0)
        write_slots(self.counts, 2, slots, 0)  # (the sink row's columns too: zero already)

    def count_pairs(self, fired: torch.Tensor, fired_ok: torch.Tensor) -> None:
        """Fire together, wire together: +1 on the co-fire count of every ordered pair of the valid `fired` slots
        (B, K) (`fired_ok` (B, K)), the diagonal included."""
        B, C = self.types.shape
        pair_ok = (fired_ok[:, :, None] & fired_ok[:, None, :]).to(self.counts.dtype)  # (B, K, K)
        if torch.compiler.is_compiling():  # in place, see write_slots
            rows = torch.arange(B, device=fired.device)[:, None, None]
            self.counts.index_put_((rows, fired[:, :, None], fired[:, None, :]), pair_ok, accumulate=True)
        else:
            flat = (fired[:, :, None] * C + fired[:, None, :]).reshape(B, -1)  # (B, K*K) positions in ((C+1)*C)
            self.counts.view(B, -1).scatter_add_(1, flat, pair_ok.reshape(B, -1))

    def to(self, device: torch.device) -> None:
        for name in _STATE_TENSORS:
            setattr(self, name, getattr(self, name).to(device))
        self.device = device
        self.version += 1

    # ---------------------------------------------------------------- view
    def view_order(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Reference-layout positions. Returns (order (B,C) slots sorted live-oldest-first then free,
        offset (B,) = N - live_b front padding, rank (B,C) position of each slot in `order`)."""
        live = self.live
        key = torch.where(live, self.created, torch.iinfo(torch.int64).max)
        order = torch.sort(key, dim=1, stable=True).indices  # (B, C)
        rank = torch.empty_like(order)
        rank.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
        n_live = live.sum(1)  # (B,)
        offset = n_live.max() - n_live  # (B,) front padding of each row
        return order, offset, rank

    def view_ranks(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference-layout positions of live `slots` (B, K) without sorting the store: offset (B,) as in
        `view_order`, and rank (B, K) = how many live engrams of the row are older (engram ids are distinct
        within a row). A (B, K, C) comparison when that stays within _RANK_BY_COMPARE elements, else
        `view_order`'s sort."""
        B, C = self.types.shape
        if B * slots.shape[1] * C > _RANK_BY_COMPARE:
            _, offset, rank = self.view_order()
            return offset, torch.gather(rank, 1, slots)
        live = self.live
        n_live = live.sum(1)  # (B,)
        offset = n_live.max() - n_live  # (B,) as in view_order
        created = torch.gather(self.created, 1, slots)  # (B, K)
        older = (self.created[:, None, :] < created[:, :, None]) & live[:, None, :]  # (B, K, C)
        return offset, older.sum(-1)

    def view(self, track_age: bool, track_id: bool) -> Engrams:
        """Build the reference `Engrams` view (a copy). Costs a host sync; for inspection only."""
        B, C, H = self.data.shape
        live = self.live
        n_live = live.sum(1)
        N = int(n_live.max()) if B > 0 else 0
        order, offset, _ = self.view_order()
        # view position p of row b holds order[b, p - offset[b]] when p >= offset[b]
        p = torch.arange(N, device=self.device)[None, :]  # (1, N)
        src = p - offset[:, None]  # (B, N)
        valid = src >= 0
        slot = torch.gather(order, 1, src.clamp(min=0))  # (B, N); N <= C always
        data = torch.gather(self.data, 1, slot[:, :, None].expand(B, N, H)) * valid[:, :, None]
        lifespan = torch.where(valid, torch.gather(self.lifespan, 1, slot), -1.0)
        types = torch.where(valid, torch.gather(self.types, 1, slot), torch.zeros((), dtype=torch.uint8,
                                                                                  device=self.device))
        rows = torch.gather(self.counts, 1, slot[:, :, None].expand(B, N, C))  # (B, N, C)
        counts = torch.gather(rows, 2, slot[:, None, :].expand(B, N, N)).to(torch.int32)  # (B, N, N)
        pair_valid = valid[:, :, None] & valid[:, None, :]
        counts = torch.where(pair_valid, counts, -1)
        age = torch.where(valid, torch.gather(self.age, 1, slot), -1).to(torch.int32) if track_age else None
        ids = torch.where(valid, torch.gather(self.created, 1, slot), -1).to(torch.int32) if track_id else None
        return Engrams(data, counts, types, lifespan, age, ids)

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name).clone() for name in _STATE_TENSORS}

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], device: torch.device) -> SlotStore:
        B, C, H = state["data"].shape
        store = cls(0, H, 0, device, state["counts"].dtype)
        for name in _STATE_TENSORS:
            if name == "sq_norm" and name not in state:  # saved before the store kept them
                store.sq_norm = state["data"].to(device).pow(2).sum(-1)
                continue
            setattr(store, name, state[name].to(device).clone())
        store.live_bound = C
        return store
