"""A slow, obviously-correct model of one memory row, written straight from algorithm.md §c (float64, Python
loops, deterministic oldest-first ties). Tests compare the fast slot implementation against it."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

WORKING, SHORTTERM, LONGTERM = 1, 2, 3


@dataclass
class Engram:
    id: int
    x: torch.Tensor  # (H,) float64
    life: float
    type: int
    age: int = 0


@dataclass
class OracleRow:
    r_stm: int
    cap: int
    depth: int
    life0: float
    r_ltm: int
    form: str = "exp"
    use_short_term: bool = True  # the ablations of Memoria(use_short_term=, use_long_term=, ltm_search=)
    use_long_term: bool = True
    search: str = "hebbian"
    engrams: list[Engram] = field(default_factory=list)
    counts: dict = field(default_factory=dict)  # (id_i, id_j) -> int

    def c(self, i: int, j: int) -> int:
        return self.counts.get((i, j), 0)

    def add(self, x: torch.Tensor, first_id: int) -> None:
        for w in range(x.shape[0]):
            self.engrams.append(Engram(first_id + w, x[w].double(), self.life0, WORKING))

    def _score(self, wm: list[Engram], e: Engram) -> float:
        if self.form == "neg_sq":
            centroid = torch.stack([w.x for w in wm]).mean(0)
            return -float((e.x - centroid).pow(2).sum())
        return float(torch.logsumexp(torch.tensor([-float((w.x - e.x).pow(2).sum()) for w in wm]), 0))

    def remind(self, random_key=None) -> list[int]:
        """Returns the ids of the reminded engrams: STMs by descending score, then LTMs. `random_key(id)`: the
        random search's draw of an engram this step (search="random")."""
        wm = [e for e in self.engrams if e.type == WORKING]
        if not wm:
            return []
        stms = [e for e in self.engrams if e.type == SHORTTERM]
        ltm_ids = {e.id for e in self.engrams if e.type == LONGTERM}
        by_id = {e.id: e for e in self.engrams}
        r_s = sorted(stms, key=lambda e: (-self._score(wm, e), e.id))[: self.r_stm]
        if not self.use_long_term:
            visited = set()
        elif self.search == "exhaustive":
            visited = set(ltm_ids)
        elif self.search == "random":  # len(r_s) chains of depth + 1 distinct draws: the largest keys
            visited = set(sorted(ltm_ids, key=lambda i: -random_key(i))[: len(r_s) * (self.depth + 1)])
        elif self.search == "random_matched":  # as many draws as the walk finds
            visited = set(sorted(ltm_ids, key=lambda i: -random_key(i))[: len(self._walk(r_s, ltm_ids))])
        else:
            visited = self._walk(r_s, ltm_ids)
        r_l = sorted((by_id[i] for i in visited), key=lambda e: (-self._score(wm, e), e.id))[: self.r_ltm]
        fired = [e.id for e in wm] + [e.id for e in r_s] + [e.id for e in r_l]
        for i in fired:
            for j in fired:
                self.counts[(i, j)] = self.c(i, j) + 1
        if not self.use_short_term:
            r_s = []  # recalled, seeded the search and fired, but not returned
        return [e.id for e in r_s] + [e.id for e in r_l]

    def _walk(self, r_s: list[Engram], ltm_ids: set[int]) -> set[int]:
        """The greedy lock-step walk (§c.4-c.5): the visited set F."""

        def strongest(u: int, allowed: set[int]) -> int | None:
            cands = [v for v in allowed if self.c(u, v) > 0]
            if not cands:
                return None
            return max(cands, key=lambda v: (self.c(u, v), -v))

        seeds = []
        for s in r_s:
            t = strongest(s.id, ltm_ids)
            if t is not None and t not in seeds:
                seeds.append(t)
        visited = set(seeds)
        chains = list(seeds)
        for _ in range(self.depth):
            moved = []
            for u in chains:
                v = strongest(u, ltm_ids - visited)
                if v is not None:
                    moved.append(v)
            chains = moved
            visited |= set(moved)
            if not chains:
                break
        return visited

    def adjust(self, gains: dict[int, float]) -> None:
        for e in self.engrams:
            e.life += gains.get(e.id, 0.0)
        for e in self.engrams:
            e.life -= 1
            e.age += 1
            if e.type == WORKING:
                e.type = SHORTTERM
        stms = [e for e in self.engrams if e.type == SHORTTERM]  # creation order = oldest first
        for e in stms[: max(0, len(stms) - self.cap)]:
            e.type = LONGTERM
        dead = {e.id for e in self.engrams if e.life <= 0}
        self.engrams = [e for e in self.engrams if e.id not in dead]
        self.counts = {k: v for k, v in self.counts.items() if k[0] not in dead and k[1] not in dead}


def lifespans(row: OracleRow) -> dict[int, float]:
    return {e.id: e.life for e in row.engrams}


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-4)
