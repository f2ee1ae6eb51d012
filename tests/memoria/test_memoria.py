"""The Memoria step, checked by hand-computed cases (algorithm.md §c), the tutorial (§b.5), the defects we fix (§d),
and a slow per-row oracle over random multi-step runs."""

from __future__ import annotations

import io
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from memoria import EngramType, Memoria
from memoria.store import SlotStore

from .oracle import OracleRow, close

W_, S_, L_ = int(EngramType.WORKING), int(EngramType.SHORTTERM), int(EngramType.LONGTERM)


def make_memory(rows, counts=None, capacity=None, **kw) -> Memoria:
    """A memory holding exactly the given engrams. rows: per row a list of (type, vector, lifespan), oldest first;
    every row has the same number of WORKING engrams. counts: per row a dict {(i, j): n} over list positions
    (made symmetric)."""
    kw.setdefault("deterministic", True)
    kw.setdefault("track_id", True)
    m = Memoria(**kw)
    B = len(rows)
    N = max(len(r) for r in rows)
    H = len(rows[0][0][1])
    store = SlotStore(B, H, capacity or N + 8, torch.device("cpu"))
    wm = []
    for b, row in enumerate(rows):
        for i, (t, x, life) in enumerate(row):
            slot = N - 1 - i  # slots deliberately in reverse creation order: layout must not matter
            store.data[b, slot] = torch.tensor(x, dtype=torch.float32)
            store.types[b, slot] = t
            store.lifespan[b, slot] = life
            store.created[b, slot] = i
        wm.append([N - 1 - i for i, (t, _, _) in enumerate(row) if t == W_])
        for (i, j), n in (counts[b] if counts else {}).items():
            store.counts[b, N - 1 - i, N - 1 - j] = n
            store.counts[b, N - 1 - j, N - 1 - i] = n
    store.sq_norm = store.data.pow(2).sum(-1)  # as the adds keep them
    store.live_bound = N
    store.next_id.fill_(N)
    m.store, m._empty, m.device, m.next_engram_id, m.timestep = store, False, torch.device("cpu"), N, 1
    m._wm_slots = torch.tensor(wm)
    m._wm_valid = torch.ones_like(m._wm_slots, dtype=torch.bool)
    return m


def reminded_ids(m: Memoria, indices: torch.Tensor) -> list[list[int]]:
    ids = m.engrams.engram_ids
    return [[int(ids[b, i]) for i in row if i >= 0] for b, row in enumerate(indices.tolist())]


def cfg(**kw):
    base = dict(num_reminded_stm=2, stm_capacity=4, ltm_search_depth=3, initial_lifespan=3, num_final_ltms=2)
    base.update(kw)
    return base


# ------------------------------------------------------------------------------------------------ tutorial (§b.5)
@pytest.mark.parametrize(
    "form, row0_recalled, row0_life",
    [("exp", {2, 3, 4, 6}, [1, 1, 6, 6, 6, 1, 6, 1]), ("neg_sq", {2, 5, 6, 7}, [1, 1, 6, 1, 1, 6, 6, 6])],
)
def test_readme_tutorial(form, row0_recalled, row0_life):
    torch.manual_seed(42)
    m = Memoria(num_reminded_stm=4, stm_capacity=16, ltm_search_depth=5, initial_lifespan=3, num_final_ltms=4,
                weight_form=form)
    m.add_working_memory(torch.rand(2, 8, 64))
    assert len(m.engrams) == 16 and m.engrams.data.shape == (2, 8, 64)
    assert torch.all(m.engrams.lifespan == 3.0)
    memories, indices = m.remind()
    assert memories.shape == (2, 0, 64) and indices.shape == (2, 0) and indices.dtype == torch.int64
    m.adjust_lifespan_and_memories(indices, torch.zeros_like(indices, dtype=torch.float))
    assert torch.all(m.engrams.lifespan == 2.0) and torch.all(m.engrams.engrams_types == S_)
    m.add_working_memory(torch.rand(2, 8, 64))
    assert len(m.engrams) == 32
    assert m.engrams.lifespan.tolist() == [[2.0] * 8 + [3.0] * 8] * 2
    memories, indices = m.remind()
    assert indices.shape == (2, 4)  # no LTM exists: exactly the 4 recalled STMs, no spurious engram 0 (D4)
    assert set(indices[0].tolist()) == row0_recalled and set(indices[1].tolist()) == {4, 5, 6, 7}
    assert torch.equal(memories, m.engrams.data[torch.arange(2)[:, None], indices])
    m.adjust_lifespan_and_memories(indices, torch.full(indices.shape, 5.0))
    assert m.engrams.lifespan[0].tolist() == [float(v) for v in row0_life] + [2.0] * 8
    assert m.engrams.lifespan[1].tolist() == [1.0, 1.0, 1.0, 1.0, 6.0, 6.0, 6.0, 6.0] + [2.0] * 8


# ------------------------------------------------------------------------------------------------ §c by hand
def test_stm_recall_weight_forms_rank_differently():
    # WMs at 0 and 10; STM A at 0.5 sits next to one WM, STM B at 5 sits on the centroid.
    row = [(S_, [0.5], 5), (S_, [5.0], 5), (S_, [30.0], 5), (W_, [0.0], 3), (W_, [10.0], 3)]
    for form, best in (("exp", 0), ("neg_sq", 1)):
        m = make_memory([row], **cfg(num_reminded_stm=1, weight_form=form))
        _, idx = m.remind()
        assert reminded_ids(m, idx) == [[best]], form


def test_exp_form_has_no_underflow_ties():
    # every d^2 > 104: exp(-d^2) is 0 in float32 for all candidates, yet the nearest must still win
    row = [(S_, [20.0], 5), (S_, [12.0], 5), (S_, [15.0], 5), (W_, [0.0], 3)]
    m = make_memory([row], **cfg(num_reminded_stm=1))
    _, idx = m.remind()
    assert reminded_ids(m, idx) == [[1]]


def test_padding_never_competes_and_k_is_per_row():
    rows = [
        [(S_, [0.0], 5), (W_, [0.0], 3)],
        [(S_, [1.0], 5), (S_, [2.0], 5), (S_, [3.0], 5), (W_, [0.0], 3)],
    ]
    m = make_memory(rows, **cfg(num_reminded_stm=2))
    _, idx = m.remind()
    assert reminded_ids(m, idx) == [[0], [0, 1]]
    assert idx.shape == (2, 2) and idx[0, 1] == -1  # padding only at the end


def test_seeds_walk_and_final_selection():
    # 0..3 LTM, 4..5 STM, 6 WM. Recalled STM 4 links to LTMs 0 (count 1) and 1 (count 3): seed 1.
    # From 1 the strongest unvisited edge is 2; from 2 it is 3 (1 is visited); from 3 there is no edge: stop.
    # STM 5 has no LTM link (D3): it seeds nothing.
    row = [(L_, [9.0], 5), (L_, [1.0], 5), (L_, [2.0], 5), (L_, [3.0], 5), (S_, [0.1], 5), (S_, [50.0], 5),
           (W_, [0.0], 3)]
    counts = {(4, 0): 1, (4, 1): 3, (1, 2): 2, (1, 0): 1, (2, 3): 1, (2, 1): 5, (5, 5): 1}
    m = make_memory([row], counts=[counts], **cfg(num_reminded_stm=2, num_final_ltms=2, ltm_search_depth=5))
    _, idx = m.remind()
    # F = {1, 2, 3}; LTM 0 is never reached (1 -> 0 is weaker than 1 -> 2, and 0 is not a seed)
    # final: the 2 of F nearest to the WM at 0: LTM 1 (at 1.0) and LTM 2 (at 2.0)
    assert reminded_ids(m, idx) == [[4, 5, 1, 2]]


def test_walk_depth_limits_hops():
    row = [(L_, [1.0], 5), (L_, [2.0], 5), (L_, [3.0], 5), (S_, [0.0], 5), (W_, [0.0], 3)]
    counts = {(3, 2): 1, (2, 1): 1, (1, 0): 1}  # chain STM 3 -> 2 -> 1 -> 0
    for depth, expect in ((0, [3, 2]), (1, [3, 1, 2]), (2, [3, 0, 1, 2])):
        m = make_memory([row], counts=[counts], **cfg(num_reminded_stm=1, num_final_ltms=5, ltm_search_depth=depth))
        _, idx = m.remind()
        assert reminded_ids(m, idx) == [expect], depth


def test_count_ties_break_oldest_first_in_deterministic_mode():
    row = [(L_, [1.0], 5), (L_, [1.0], 5), (S_, [0.0], 5), (W_, [0.0], 3)]
    counts = {(2, 0): 2, (2, 1): 2}
    m = make_memory([row], counts=[counts], **cfg(num_reminded_stm=1, num_final_ltms=1, ltm_search_depth=0))
    _, idx = m.remind()
    assert reminded_ids(m, idx) == [[2, 0]]


def test_random_ties_are_uniform_seeded_and_never_touch_the_global_rng():
    row = [(L_, [1.0], 5), (L_, [1.0], 5), (L_, [1.0], 5), (S_, [0.0], 5), (W_, [0.0], 3)]
    counts = {(3, 0): 1, (3, 1): 1, (3, 2): 1}
    state = torch.random.get_rng_state()

    def pick(seed: int, step: int = 0) -> int:
        m = make_memory([row], counts=[counts], **cfg(num_reminded_stm=1, num_final_ltms=1, ltm_search_depth=0,
                                                      deterministic=False, seed=seed))
        m.store.next_id += step  # a later step of the same memory draws again
        _, idx = m.remind()
        return reminded_ids(m, idx)[0][1]

    by_seed = [pick(seed) for seed in range(300)]
    assert all(70 <= by_seed.count(i) <= 130 for i in (0, 1, 2)), [by_seed.count(i) for i in (0, 1, 2)]
    by_step = [pick(0, step) for step in range(300)]
    assert all(70 <= by_step.count(i) <= 130 for i in (0, 1, 2)), [by_step.count(i) for i in (0, 1, 2)]
    assert [pick(5) for _ in range(3)] == [by_seed[5]] * 3  # the same seed and step break the tie the same way
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is never drawn from


def test_hebbian_update_touches_only_the_fired_set():
    row = [(L_, [1.0], 5), (L_, [7.0], 5), (S_, [0.0], 5), (S_, [40.0], 5), (W_, [0.0], 3), (W_, [0.5], 3)]
    counts = {(2, 0): 1, (1, 1): 4}
    m = make_memory([row], counts=[counts], **cfg(num_reminded_stm=1, num_final_ltms=1, ltm_search_depth=0))
    before = m.engrams.induce_counts[0].clone()
    _, idx = m.remind()
    assert reminded_ids(m, idx) == [[2, 0]]
    after = m.engrams.induce_counts[0]
    fired = [0, 2, 4, 5]
    expect = before.clone()
    for i in fired:
        for j in fired:
            expect[i, j] += 1
    assert torch.equal(after, expect)
    assert torch.equal(after, after.T) and torch.equal(m.engrams.fire_count[0], after.diagonal())


def test_no_ltm_or_no_seed_gives_no_ltm_output():
    row = [(L_, [0.0], 5), (S_, [0.0], 5), (W_, [0.0], 3)]  # an LTM exists but nothing links to it
    m = make_memory([row], **cfg())
    _, idx = m.remind()
    assert reminded_ids(m, idx) == [[1]]


def test_adjust_order_promotes_before_deleting():
    # cap 2: an old, extended STM 0 (life 5) sits ahead of an expiring STM 1 (life 1); WM 2 joins STM.
    # Promote first (ours, the reference's order): 3 STMs > 2, so the oldest (0) becomes LTM, then 1 dies.
    # Deleting first would have left 0 in STM.
    row = [(S_, [0.0], 5), (S_, [1.0], 1), (W_, [2.0], 3)]
    m = make_memory([row], **cfg(stm_capacity=2, num_reminded_stm=0))
    _, idx = m.remind()
    m.adjust_lifespan_and_memories(idx, torch.zeros(idx.shape))
    e = m.engrams
    assert e.engram_ids[0].tolist() == [0, 2]
    assert e.engrams_types[0].tolist() == [L_, S_]
    assert e.lifespan[0].tolist() == [4.0, 2.0]


def test_extend_accumulates_duplicates_and_never_writes_inputs():
    row = [(S_, [0.0], 2), (W_, [0.0], 3)]
    m = make_memory([row], **cfg(num_reminded_stm=1))
    _, idx = m.remind()
    dup = torch.cat([idx, idx, torch.tensor([[-7]])], 1)
    delta = torch.tensor([[1.5, 2.5, 100.0]])
    dup_copy, delta_copy = dup.clone(), delta.clone()
    m.adjust_lifespan_and_memories(dup, delta)
    assert torch.equal(dup, dup_copy) and torch.equal(delta, delta_copy)
    assert m.engrams.lifespan[0].tolist() == [2 + 1.5 + 2.5 - 1, 2.0]


def test_never_reminded_engram_lives_exactly_initial_lifespan_steps():
    m = Memoria(**cfg(num_reminded_stm=0, initial_lifespan=4, stm_capacity=2), track_id=True)
    present = []
    for _ in range(8):
        m.add_working_memory(torch.randn(1, 1, 3))
        present.append(0 in m.engrams.engram_ids[0].tolist())
        _, idx = m.remind()
        m.adjust_lifespan_and_memories(idx, torch.zeros(idx.shape))
    assert present == [True] * 4 + [False] * 4


# ------------------------------------------------------------------------------------------------ oracle runs
def run_against_oracle(B, H, W, steps, seed, form, **kw):
    g = torch.Generator().manual_seed(seed)
    m = Memoria(**kw, weight_form=form, deterministic=True, track_id=True, track_age=True)
    oracles = [OracleRow(kw["num_reminded_stm"], kw["stm_capacity"], kw["ltm_search_depth"], kw["initial_lifespan"],
                         kw["num_final_ltms"], form) for _ in range(B)]
    for t in range(steps):
        x = torch.randn(B, W, H, generator=g)
        first = m.next_engram_id
        m.add_working_memory(x)
        for b in range(B):
            oracles[b].add(x[b], first)
        memories, idx = m.remind()
        got = reminded_ids(m, idx)
        view = m.engrams
        for b in range(B):
            assert got[b] == oracles[b].remind(), f"step {t} row {b}"
            valid = idx[b] >= 0
            assert torch.all(valid[: int(valid.sum())])  # -1 only trailing
            assert set(view.engrams_types[b, idx[b, valid]].tolist()) <= {S_, L_}
            assert torch.equal(memories[b, valid], view.data[b, idx[b, valid]])
            assert torch.all(memories[b, ~valid] == 0)
        delta = torch.rand(idx.shape, generator=g) * 4 * (idx >= 0)
        gains = [{i: float(d) for i, d in zip(got[b], delta[b].tolist())} for b in range(B)]
        m.adjust_lifespan_and_memories(idx, delta)
        view = m.engrams
        for b in range(B):
            oracles[b].adjust(gains[b])
            live = view.engrams_types[b] != 0
            ids = view.engram_ids[b, live].tolist()
            assert ids == [e.id for e in oracles[b].engrams], f"step {t} row {b}"
            for e, life, typ, age in zip(oracles[b].engrams, view.lifespan[b, live].tolist(),
                                         view.engrams_types[b, live].tolist(), view.age[b, live].tolist()):
                assert close(life, e.life) and typ == e.type and age == e.age
            cnt = view.induce_counts[b][live][:, live]
            assert torch.equal(cnt, cnt.T)
            expect = torch.tensor([[oracles[b].c(i, j) for j in ids] for i in ids], dtype=cnt.dtype).reshape(cnt.shape)
            assert torch.equal(cnt, expect)
            assert int((view.engrams_types[b] == S_).sum()) <= kw["stm_capacity"]
        live = m.store.live  # the kept squared norms are those of the stored engrams
        torch.testing.assert_close(m.store.sq_norm[live], m.store.data.pow(2).sum(-1)[live])
    return m


@settings(max_examples=25, deadline=None)
@given(
    B=st.integers(1, 3), H=st.integers(1, 4), W=st.integers(1, 4), steps=st.integers(1, 10), seed=st.integers(0, 2**31),
    form=st.sampled_from(["exp", "neg_sq"]), r_stm=st.integers(0, 4), cap=st.integers(0, 6), depth=st.integers(0, 3),
    life0=st.integers(1, 4), r_ltm=st.integers(0, 4),
)
def test_matches_oracle_on_random_runs(B, H, W, steps, seed, form, r_stm, cap, depth, life0, r_ltm):
    run_against_oracle(B, H, W, steps, seed, form, num_reminded_stm=r_stm, stm_capacity=cap, ltm_search_depth=depth,
                       initial_lifespan=life0, num_final_ltms=r_ltm)


@pytest.mark.parametrize("form", ["exp", "neg_sq"])
@pytest.mark.parametrize("every_slot", [None, True, False])
def test_long_run_with_ltm_matches_oracle(monkeypatch, every_slot, form):
    """Also with remind scoring every slot of the store once, and only the gathered candidates (what it picks by
    the store's size, None)."""
    monkeypatch.setattr(Memoria, "_score_every_slot", every_slot)
    m = run_against_oracle(2, 3, 3, 25, 7, form, num_reminded_stm=3, stm_capacity=4, ltm_search_depth=3,
                           initial_lifespan=3, num_final_ltms=3)
    assert int((m.engrams.engrams_types == L_).sum()) > 0  # the run did exercise long-term memory


def test_remind_scores_every_slot_when_the_store_is_small_against_the_candidates():
    m = Memoria(**cfg(num_reminded_stm=3, stm_capacity=4, ltm_search_depth=3))  # candidates: 4 STMs + 3 x 4 LTMs
    m.add_working_memory(torch.randn(1, 2, 3))
    assert [m._scores_every_slot(C, 16) for C in (16, 17)] == [True, False]  # CPU: no more work than the candidates
    m.store.device = torch.device("cuda")  # the rule only (no CUDA tensor is made)
    assert [m._scores_every_slot(C, 16) for C in (32, 33)] == [True, False]  # GPU: up to twice (latency-bound)


def test_small_initial_capacity_grows_and_gives_the_same_run():
    kw = cfg(num_reminded_stm=3, stm_capacity=4, num_final_ltms=3, initial_lifespan=4)
    outs = []
    for cap in (None, 1):
        g = torch.Generator().manual_seed(3)
        m = Memoria(**kw, deterministic=True, track_id=True, initial_capacity=cap)
        ids = []
        for _ in range(15):
            m.add_working_memory(torch.randn(2, 3, 4, generator=g))
            _, idx = m.remind()
            ids.append(reminded_ids(m, idx))
            m.adjust_lifespan_and_memories(idx, torch.full(idx.shape, 2.0))
        outs.append(ids)
    assert outs[0] == outs[1]


def test_descending_order_by_counting_equals_a_stable_sort():
    from memoria.memoria import _descending_order

    g = torch.Generator().manual_seed(3)
    for K in (1, 2, 7, 64):
        key = torch.randint(-4, 4, (3, K), generator=g) * 2**40 + torch.randint(0, 3, (3, K), generator=g)
        assert torch.equal(_descending_order(key), torch.sort(key, dim=1, descending=True, stable=True).indices)


def test_first_true_finds_the_first_k_true_positions_in_order():
    from memoria.store import first_true

    g = torch.Generator().manual_seed(4)
    for C, k, p in ((1, 1, 0.5), (9, 4, 0.3), (40, 12, 0.2), (40, 40, 0.9), (17, 5, 0.0), (17, 5, 1.0)):
        mask = torch.rand(5, C, generator=g) < p
        slots, ok = first_true(mask, k)
        assert slots.shape == ok.shape == (5, k) and slots.dtype == torch.int64
        for b in range(5):
            want = mask[b].nonzero().flatten()[:k].tolist()
            assert slots[b, : len(want)].tolist() == want
            assert ok[b].tolist() == [True] * len(want) + [False] * (k - len(want))
            assert (slots[b, len(want):] == C - 1).all()  # in range, so a gather with them is safe


@pytest.mark.parametrize("by_compare", [True, False])
def test_top_one_packed_sort_equals_two_stable_sorts(monkeypatch, by_compare):
    """_top's single int64 order (float32 score bits above the 32-bit tie key), by comparison or by one sort,
    orders exactly as sorting by the tie key, then stably by score (its path for other score dtypes): negatives,
    both zeros, -inf, equal scores and equal tie keys (equal packed keys keep their positions) included."""
    import memoria.memoria

    monkeypatch.setattr(memoria.memoria, "_order_by_counting", lambda key: by_compare)
    m = Memoria(**cfg())
    g = torch.Generator().manual_seed(0)
    values = torch.tensor([-math.inf, -3.5, -1e-30, -0.0, 0.0, 1e-30, 2.0, 2.0000002, 7.25])
    for _ in range(200):
        B, K = 3, int(torch.randint(1, 12, (), generator=g))
        score = values[torch.randint(len(values), (B, K), generator=g)]
        ok = torch.rand(B, K, generator=g) < 0.8
        tie = torch.tensor([0, 1, 2**31, 2**32 - 1])[torch.randint(4, (B, K), generator=g)]  # keys < 2**32
        slots = torch.randperm(40, generator=g)[: B * K].view(B, K)
        k = int(torch.randint(1, K + 1, (), generator=g))
        packed = m._top(score, ok, tie, slots, k)
        two_sorts = m._top(score.double(), ok, tie, slots, k)
        assert torch.equal(packed[0], two_sorts[0]) and torch.equal(packed[1], two_sorts[1])


@pytest.mark.parametrize("deterministic", [True, False])
def test_view_ranks_by_comparison_equal_the_sorted_view(monkeypatch, deterministic):
    """remind's view indices, ranked by comparing ids (small stores) or from the sorted layout (large ones)."""
    import memoria.store

    runs = []
    for limit in (memoria.store._RANK_BY_COMPARE, 0):
        monkeypatch.setattr(memoria.store, "_RANK_BY_COMPARE", limit)
        g = torch.Generator().manual_seed(5)
        m = Memoria(**cfg(num_reminded_stm=3, stm_capacity=4, num_final_ltms=3), deterministic=deterministic,
                    static_shape=True)
        out = []
        for _ in range(20):
            m.add_working_memory(torch.randn(3, 3, 4, generator=g))
            _, idx = m.remind()
            out.append(idx)
            m.adjust_lifespan_and_memories(idx, torch.rand(idx.shape, generator=g) * 4)
        runs.append(torch.stack(out))
    assert torch.equal(runs[0], runs[1]) and (runs[0] >= 0).sum() > 0


# ------------------------------------------------------------------------------------------------ batch, state
def test_batch_rows_are_independent():
    kw = cfg(num_reminded_stm=3, stm_capacity=3, num_final_ltms=3, initial_lifespan=3)
    g = torch.Generator().manual_seed(11)
    xs = [torch.randn(3, 2, 4, generator=g) for _ in range(12)]
    ds = [torch.rand(3, 6, generator=g) * 3 for _ in range(12)]

    def run(rows):
        m = Memoria(**kw, deterministic=True, track_id=True, static_shape=True)
        out = []
        for x, d in zip(xs, ds):
            m.add_working_memory(x[rows])
            _, idx = m.remind()
            out.append(reminded_ids(m, idx))
            m.adjust_lifespan_and_memories(idx, d[rows])
        return out

    batched = run([0, 1, 2])
    for b in range(3):
        assert [step[b] for step in batched] == [step[0] for step in run([b])]


def step_outputs(m: Memoria, g: torch.Generator, steps: int):
    out = []
    for _ in range(steps):
        m.add_working_memory(torch.randn(2, 3, 5, generator=g))
        mem, idx = m.remind()
        out.append((mem.clone(), idx.clone()))
        delta = torch.rand(2, m.num_reminded_stm + m.num_final_ltms, generator=g) * 3  # same draws at any width
        m.adjust_lifespan_and_memories(idx, delta[:, : idx.shape[1]])
    return out


def test_state_dict_round_trip_continues_exactly():
    kw = cfg(num_reminded_stm=3, stm_capacity=3, num_final_ltms=3)  # random tie-break mode
    m = Memoria(**kw, seed=5)
    step_outputs(m, torch.Generator().manual_seed(0), 8)
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    expected = step_outputs(m, torch.Generator().manual_seed(1), 8)
    restored = Memoria(**kw, seed=123)
    restored.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    got = step_outputs(restored, torch.Generator().manual_seed(1), 8)
    for (m1, i1), (m2, i2) in zip(expected, got):
        assert torch.equal(i1, i2) and torch.equal(m1, m2)


def test_a_state_saved_without_squared_norms_loads_and_continues():
    """States saved before the store kept its engrams' squared norms get them computed on load."""
    kw = cfg(num_reminded_stm=3, stm_capacity=3, num_final_ltms=3)
    m = Memoria(**kw, seed=5)
    step_outputs(m, torch.Generator().manual_seed(0), 8)
    state = m.state_dict()
    del state["store"]["sq_norm"]
    expected = step_outputs(m, torch.Generator().manual_seed(1), 8)
    restored = Memoria(**kw, seed=5)
    restored.load_state_dict(state)
    got = step_outputs(restored, torch.Generator().manual_seed(1), 8)
    for (m1, i1), (m2, i2) in zip(expected, got):
        assert torch.equal(i1, i2) and torch.equal(m1, m2)


def test_load_state_dict_refuses_other_settings():
    m = Memoria(**cfg())
    m.add_working_memory(torch.randn(1, 2, 3))
    other = Memoria(**cfg(stm_capacity=9))
    with pytest.raises(ValueError, match="stm_capacity"):
        other.load_state_dict(m.state_dict())
    with pytest.raises(ValueError, match="not a Memoria state"):
        other.load_state_dict({"foo": 1})


def test_reset_memory_all_and_per_row():
    m = Memoria(**cfg(), track_id=True)
    for _ in range(3):
        m.add_working_memory(torch.randn(2, 2, 3))
        _, idx = m.remind()
        m.adjust_lifespan_and_memories(idx, torch.ones(idx.shape))
    m.reset_memory(torch.tensor([True, False]))
    e = m.engrams
    assert int((e.engrams_types[0] != 0).sum()) == 0 and int((e.engrams_types[1] != 0).sum()) > 0
    m.add_working_memory(torch.randn(2, 2, 3))
    _, idx = m.remind()
    assert (idx[0] >= 0).sum() == 0  # row 0 forgot everything
    m.reset_memory()
    assert len(m.engrams) == 0 and m.engrams.data.shape == (0, 0, 0)
    assert m.timestep == 0 and m.next_engram_id == 0
    with pytest.raises(ValueError, match="before any add_working_memory"):
        m.remind()
    m.add_working_memory(torch.randn(4, 2, 3))  # a new batch size after a reset is fine
    assert m.engrams.data.shape == (4, 2, 3)


def test_add_mask_skips_rows():
    m = Memoria(**cfg(), track_id=True)
    m.add_working_memory(torch.randn(2, 2, 3), mask=torch.tensor([True, False]))
    e = m.engrams
    assert (e.engrams_types[0] == W_).sum() == 2 and (e.engrams_types[1] == W_).sum() == 0
    counts = m.type_counts()  # (B, 4) by EngramType; column 0 = free slots
    assert counts[:, W_].tolist() == [2, 0] and counts.sum(1).tolist() == [m.store.capacity] * 2


def test_static_shape_gives_the_same_engrams_padded():
    kw = cfg(num_reminded_stm=3, stm_capacity=3, num_final_ltms=2)
    runs = []
    for static in (False, True):
        m = Memoria(**kw, deterministic=True, static_shape=static)
        runs.append(step_outputs(m, torch.Generator().manual_seed(4), 10))
    for (m1, i1), (m2, i2) in zip(*runs):
        assert i2.shape[1] == 5
        assert torch.equal(i2[:, : i1.shape[1]], i1) and torch.all(i2[:, i1.shape[1]:] == -1)
        assert torch.equal(m2[:, : i1.shape[1]], m1)


def test_ltm_capacity_evicts_lowest_lifespan():
    m = Memoria(**cfg(stm_capacity=1, num_reminded_stm=0, initial_lifespan=10), ltm_capacity=2, track_id=True)
    for _ in range(6):
        m.add_working_memory(torch.randn(1, 1, 2))
        _, idx = m.remind()
        m.adjust_lifespan_and_memories(idx, torch.zeros(idx.shape))
    e = m.engrams
    assert int((e.engrams_types == L_).sum()) == 2
    assert e.engram_ids[0].tolist() == [3, 4, 5]  # the oldest (lowest lifespan) LTMs went first
    assert int(m.evictions.sum()) == 3
    assert m.store.capacity == 1 + 2 + 1  # fixed: stm + ltm + W


@pytest.mark.parametrize("partial", [False, True])
def test_ltm_eviction_packed_top_k_equals_two_stable_sorts(partial):
    """The cap's eviction order (lowest lifespan, then oldest) from the k smallest packed keys equals the
    two-sort order (its path for non-float32 lifespans), with many equal lifespans; also when k is below the
    excess (at most k evicted a step)."""
    import copy

    g = torch.Generator().manual_seed(2)
    m = Memoria(**cfg(stm_capacity=2, num_reminded_stm=2, num_final_ltms=2, initial_lifespan=6), ltm_capacity=40)
    for _ in range(12):
        m.add_working_memory(torch.randn(3, 2, 4, generator=g))
        _, idx = m.remind()
        m.adjust_lifespan_and_memories(idx, torch.randint(0, 3, idx.shape, generator=g).float())  # equal gains
    packed, two_sorts = copy.deepcopy(m), copy.deepcopy(m)
    two_sorts.store.lifespan = two_sorts.store.lifespan.double()
    for mem in (packed, two_sorts):
        mem.ltm_capacity = 3
    k = 2 if partial else m.store.capacity
    lost = packed._evict_ltm(packed.store, k), two_sorts._evict_ltm(two_sorts.store, k)
    assert torch.equal(lost[0], lost[1]) and int(lost[0].sum()) > 3
    assert int((packed.store.types == L_).sum()) == int((m.store.types == L_).sum()) - (
        int(torch.clamp(lost[0], max=k).sum()))  # min(excess, k) a row went
    assert torch.equal(packed.store.types, two_sorts.store.types)


# ------------------------------------------------------------------------------------------------ bad input
def bad_calls():
    return [
        ("add", (torch.randn(2, 3),), "shape"),
        ("add", (torch.randint(0, 3, (1, 2, 3)),), "floating"),
        ("add", (torch.randn(3, 2, 3),), "batch"),
        ("add", (torch.full((1, 2, 3), float("nan")),), "NaN"),
        ("add", ([[1.0]],), "torch.Tensor"),
        ("adjust", (torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 3)), "shape"),
        ("adjust", (torch.zeros(1, 1), torch.zeros(1, 1)), "integer"),
        ("adjust", (torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 1, dtype=torch.bool)), "real number"),
        ("adjust", (torch.tensor([[9999]]), torch.zeros(1, 1)), "last remind"),
        ("adjust", (None, torch.zeros(1, 1)), "torch.Tensor"),
    ]


@pytest.mark.parametrize("method, args, message", bad_calls())
def test_bad_input_raises_and_keeps_state(method, args, message):
    m = Memoria(**cfg(), seed=1)
    m.add_working_memory(torch.randn(1, 2, 3))
    _, idx = m.remind()
    m.adjust_lifespan_and_memories(idx, torch.zeros(idx.shape))
    m.add_working_memory(torch.randn(1, 2, 3))
    m.remind()
    before = m.state_dict()
    fn = m.add_working_memory if method == "add" else m.adjust_lifespan_and_memories
    with pytest.raises(ValueError, match=message):
        fn(*args)
    after = m.state_dict()
    assert before["timestep"] == after["timestep"]
    for k, v in before["store"].items():
        assert torch.equal(v, after["store"][k]), k


def test_nan_delta_raises_and_keeps_state():
    m = Memoria(**cfg())
    m.add_working_memory(torch.randn(1, 2, 3))
    _, idx = m.remind()
    m.adjust_lifespan_and_memories(idx, torch.zeros(idx.shape))
    m.add_working_memory(torch.randn(1, 2, 3))
    _, idx = m.remind()
    life = m.store.lifespan.clone()
    with pytest.raises(ValueError, match="NaN"):
        m.adjust_lifespan_and_memories(idx, torch.full(idx.shape, float("nan")))
    assert torch.equal(life, m.store.lifespan)


def test_remind_before_add_and_bad_constructor_args():
    with pytest.raises(ValueError, match="before any add_working_memory"):
        Memoria(**cfg()).remind()
    with pytest.raises(ValueError, match="num_reminded_stm"):
        Memoria(**cfg(num_reminded_stm=2.5))
    with pytest.raises(ValueError, match="initial_lifespan"):
        Memoria(**cfg(initial_lifespan=0))
    with pytest.raises(ValueError, match="weight_form"):
        Memoria(**cfg(), weight_form="cosine")


# ------------------------------------------------------------------------------------------------ devices
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("deterministic", [True, False])  # random ties are a hash: the same on every device
def test_cuda_matches_cpu(deterministic):
    kw = cfg(num_reminded_stm=3, stm_capacity=3, num_final_ltms=3)
    cpu = step_outputs(Memoria(**kw, deterministic=deterministic), torch.Generator().manual_seed(2), 10)
    gpu_mem = Memoria(**kw, deterministic=deterministic, device="cuda")
    gpu = step_outputs(gpu_mem, torch.Generator().manual_seed(2), 10)
    for (m1, i1), (m2, i2) in zip(cpu, gpu):
        assert torch.equal(i1, i2.cpu()) and torch.allclose(m1, m2.cpu())


def fused_or_separate_run(m: Memoria, fused: bool, steps: int = 20, B: int = 2, W: int = 3, H: int = 5):
    """Steps with the working memory added and reminded by one `add_and_remind` call or by the two calls; row 1
    adds nothing at step 7, and step 11 adds a second working memory first (both sets are that step's WM)."""
    g = torch.Generator().manual_seed(9)
    out = []
    for t in range(steps):
        x = torch.randn(B, W, H, generator=g)
        mask = torch.tensor([True, False]) if t == 7 else None
        if t == 11:
            m.add_working_memory(torch.randn(B, 1, H, generator=g))
        if fused:
            mem, idx = m.add_and_remind(x, mask=mask)
        else:
            m.add_working_memory(x, mask=mask)
            mem, idx = m.remind()
        out.append((mem.clone(), idx.clone(), m.engrams.lifespan.clone()))
        m.adjust_lifespan_and_memories(idx, torch.rand(idx.shape, generator=g) * 3 * (idx >= 0))
    return out


def assert_same_state(a, b, where: str = "state") -> None:
    assert type(a) is type(b), where
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same_state(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    else:
        assert a == b, where


@pytest.mark.parametrize("kw", [
    {},  # the defaults: trimmed output, validation
    {"static_shape": True, "validate": False, "weight_form": "neg_sq", "deterministic": True},
    {"ltm_capacity": 4, "keep_history": True},
])
@pytest.mark.parametrize("sync_free", [False, True])
def test_add_and_remind_equals_the_two_calls(kw, sync_free):
    """The same outputs, views, state and history as add_working_memory then remind."""
    runs, memories = [], []
    for fused in (False, True):
        m = Memoria(**cfg(num_reminded_stm=3, stm_capacity=4, num_final_ltms=3), seed=2, **kw)
        m._force_sync_free = sync_free
        runs.append(fused_or_separate_run(m, fused))
        memories.append(m)
    for t, (a, b) in enumerate(zip(*runs)):
        assert all(torch.equal(x, y) for x, y in zip(a, b)), t
    separate, fused = memories
    assert int((fused.store.types == L_).sum()) > 0
    assert_same_state(separate.state_dict(), fused.state_dict())
    if separate.history is not None:
        assert separate.history.state_dict() == fused.history.state_dict()


def test_add_and_remind_refuses_bad_input_and_keeps_state():
    m = Memoria(**cfg(), seed=1)
    _, idx = m.add_and_remind(torch.randn(1, 2, 3))
    m.adjust_lifespan_and_memories(idx, torch.zeros(idx.shape))
    before = m.state_dict()
    for data, message in ((torch.randn(2, 3), "shape"), (torch.full((1, 2, 3), float("nan")), "NaN"),
                          (torch.randn(3, 2, 3), "batch")):
        with pytest.raises(ValueError, match=message):
            m.add_and_remind(data)
    with pytest.raises(ValueError, match="mask must be a bool tensor"):
        m.add_and_remind(torch.randn(1, 2, 3), mask=torch.ones(2, dtype=torch.bool))
    after = m.state_dict()
    assert before["timestep"] == after["timestep"]
    assert all(torch.equal(v, after["store"][k]) for k, v in before["store"].items())
