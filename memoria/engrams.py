"""EngramType and the reference-layout `Engrams` view.

The store keeps engrams in fixed slots (see store.py). Users and the reference API see them as the reference package
laid them out: per row `[NULL padding..., LTMs..., STMs..., WMs...]` in creation order, padded at the front to the
longest row. This view is built on demand; it is for inspection and tests, not the hot path.
"""

from __future__ import annotations

from enum import IntEnum

import torch


class EngramType(IntEnum):
    NULL = 0
    WORKING = 1
    SHORTTERM = 2
    LONGTERM = 3


class Engrams:
    """A batch of engrams in the reference layout.

    data (B,N,H) float32, lifespan (B,N) float32, engrams_types (B,N) uint8, induce_counts (B,N,N) int32,
    age / engram_ids (B,N) int32 or None. Padding: data 0, lifespan -1, types NULL, counts -1 on every row and
    column touching padding, age / ids -1. `len()` is B*N, padding included, as in the reference.
    """

    def __init__(
        self,
        data: torch.Tensor,
        induce_counts: torch.Tensor | None = None,
        engrams_types: torch.Tensor | EngramType | None = None,
        lifespan: torch.Tensor | float = 0,
        age: torch.Tensor | int | None = None,
        engram_ids: torch.Tensor | int | None = None,
        track_age: bool = False,
        track_engram_id: bool = False,
    ) -> None:
        """Argument order as in the reference. Scalars broadcast over (B, N); types default to WORKING."""
        if not isinstance(data, torch.Tensor) or data.dim() != 3:
            raise ValueError(f"Engrams data must be a (B, N, H) tensor, got {getattr(data, 'shape', type(data))}")
        B, N, _ = data.shape
        dev = data.device

        def per_slot(value, dtype):
            if isinstance(value, torch.Tensor):
                if value.shape != (B, N):
                    raise ValueError(f"Engrams fields must have shape (B={B}, N={N}), got {tuple(value.shape)}")
                return value.to(dtype)
            return torch.full((B, N), value, dtype=dtype, device=dev)

        self.data = data.float()
        self.induce_counts = (
            torch.zeros(B, N, N, dtype=torch.int32, device=dev) if induce_counts is None else induce_counts
        )
        self.engrams_types = per_slot(EngramType.WORKING if engrams_types is None else int(engrams_types)
                                      if not isinstance(engrams_types, torch.Tensor) else engrams_types, torch.uint8)
        self.lifespan = per_slot(lifespan, torch.float32)
        self.age = per_slot(0 if age is None else age, torch.int32) if (track_age or age is not None) else None
        self.engram_ids = (per_slot(0 if engram_ids is None else engram_ids, torch.int32)
                           if (track_engram_id or engram_ids is not None) else None)

    @property
    def fire_count(self) -> torch.Tensor:  # (B, N): the diagonal of the co-fire counts
        return torch.diagonal(self.induce_counts, dim1=1, dim2=2)

    @fire_count.setter
    def fire_count(self, value: torch.Tensor) -> None:
        torch.diagonal(self.induce_counts, dim1=1, dim2=2).copy_(value)

    @property
    def batch_size(self) -> int:
        return self.data.shape[0]

    @property
    def memory_length(self) -> int:
        return self.data.shape[1]

    def _type_mask(self, t: EngramType) -> torch.Tensor:
        return self.engrams_types == int(t)

    @property
    def working_mask(self) -> torch.Tensor:
        return self._type_mask(EngramType.WORKING)

    @property
    def shortterm_mask(self) -> torch.Tensor:
        return self._type_mask(EngramType.SHORTTERM)

    @property
    def longterm_mask(self) -> torch.Tensor:
        return self._type_mask(EngramType.LONGTERM)

    def __len__(self) -> int:
        return self.data.shape[0] * self.data.shape[1]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Engrams):
            return NotImplemented
        fields = ("data", "lifespan", "engrams_types", "induce_counts", "age", "engram_ids")
        for f in fields:
            a, b = getattr(self, f), getattr(other, f)
            if (a is None) != (b is None):
                return False
            if a is not None and (a.shape != b.shape or not torch.equal(a.cpu(), b.cpu())):
                return False
        return True

    def __repr__(self) -> str:
        B, N, H = self.data.shape
        counts = {t.name: int((self.engrams_types == int(t)).sum()) for t in EngramType if t != EngramType.NULL}
        return f"Engrams(B={B}, N={N}, H={H}, {counts})"

    @classmethod
    def empty(cls, device: torch.device | str | None = None, track_age: bool = False, track_id: bool = False):
        dev = torch.device(device) if device is not None else torch.device("cpu")
        e = cls(torch.zeros(0, 0, 0, device=dev))
        if track_age:
            e.age = torch.zeros(0, 0, dtype=torch.int32, device=dev)
        if track_id:
            e.engram_ids = torch.zeros(0, 0, dtype=torch.int32, device=dev)
        return e
