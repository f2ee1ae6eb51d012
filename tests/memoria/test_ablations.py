"""The paper's memory ablations as options of Memoria (experiments.md §e.5): use_short_term, use_long_term and
ltm_search in {"hebbian", "random", "exhaustive"}, checked against the per-row oracle (pure Python, brute force),
on hand-built stores, on the GPU's sync-free path (taken on the CPU) and through traced / emulated-graph steps."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from memoria import EngramType, Memoria

from .oracle import OracleRow, close
from .test_graphs import DEVICE_CALLS, EmulatedGraphs, assert_same_runs, run
from .test_memoria import reminded_ids

W_, S_, L_ = int(EngramType.WORKING), int(EngramType.SHORTTERM), int(EngramType.LONGTERM)
M32 = 0xFFFFFFFF


def mix32(x: int) -> int:
    """The 32-bit xorshift-multiply hash, in Python integers."""
    x = ((x >> 16) ^ x) * 0x45D9F3B & M32
    x = ((x >> 16) ^ x) * 0x45D9F3B & M32
    return (x >> 16) ^ x


def random_keys(seed: int, next_id: int):
    """The random search's draw of each engram id at the step whose next engram id is `next_id` (brute force)."""
    salt = mix32((next_id & M32) ^ mix32(seed & M32) ^ 0x9E3779B9)
    return lambda engram_id: mix32((engram_id & M32) ^ salt)


def options(**kw):
    base = dict(num_reminded_stm=3, stm_capacity=4, ltm_search_depth=2, initial_lifespan=3, num_final_ltms=3)
    base.update(kw)
    return base


def run_against_oracle(B, H, W, steps, seed, form, sync_free=False, mem_seed=5, **kw):
    """Memoria (deterministic ties) and one OracleRow per batch row, step by step: the same reminded ids, engrams,
    lifespans, types and co-fire counts."""
    g = torch.Generator().manual_seed(seed)
    flags = {k: kw.pop(k) for k in ("use_short_term", "use_long_term", "ltm_search") if k in kw}
    m = Memoria(**kw, **flags, weight_form=form, deterministic=True, track_id=True, track_age=True, seed=mem_seed)
    m._force_sync_free = sync_free
    oracles = [OracleRow(kw["num_reminded_stm"], kw["stm_capacity"], kw["ltm_search_depth"], kw["initial_lifespan"],
                         kw["num_final_ltms"], form, flags.get("use_short_term", True),
                         flags.get("use_long_term", True), flags.get("ltm_search", "hebbian")) for _ in range(B)]
    for t in range(steps):
        x = torch.randn(B, W, H, generator=g)
        first = m.next_engram_id
        m.add_working_memory(x)
        for b in range(B):
            oracles[b].add(x[b], first)
        key = random_keys(mem_seed, m.next_engram_id)
        memories, idx = m.remind()
        got = reminded_ids(m, idx)
        view = m.engrams
        for b in range(B):
            assert got[b] == oracles[b].remind(key), f"step {t} row {b}"
            valid = idx[b] >= 0
            assert torch.equal(memories[b, valid], view.data[b, idx[b, valid]])
        delta = torch.rand(idx.shape, generator=g) * 4 * (idx >= 0)
        gains = [{i: float(d) for i, d in zip(got[b], delta[b].tolist())} for b in range(B)]
        m.adjust_lifespan_and_memories(idx, delta)
        view = m.engrams
        for b in range(B):
            oracles[b].adjust(gains[b])
            live = view.engrams_types[b] != 0
            ids = view.engram_ids[b, live].tolist()
            assert ids == [e.id for e in oracles[b].engrams], f"step {t} row {b}"
            for e, life, typ in zip(oracles[b].engrams, view.lifespan[b, live].tolist(),
                                    view.engrams_types[b, live].tolist()):
                assert close(life, e.life) and typ == e.type
            cnt = view.induce_counts[b][live][:, live]
            expect = torch.tensor([[oracles[b].c(i, j) for j in ids] for i in ids], dtype=cnt.dtype).reshape(cnt.shape)
            assert torch.equal(cnt, expect), f"step {t} row {b}"
    return m


ABLATIONS = [
    dict(use_short_term=False),
    dict(use_long_term=False),
    dict(use_short_term=False, use_long_term=False),
    dict(ltm_search="random"),
    dict(ltm_search="exhaustive"),
    dict(ltm_search="random", use_short_term=False),
    dict(ltm_search="random_matched"),
    dict(ltm_search="exhaustive", use_short_term=False),
]


@pytest.mark.parametrize("sync_free", [False, True])
@pytest.mark.parametrize("flags", ABLATIONS, ids=lambda f: ",".join(f"{k}={v}" for k, v in f.items()))
def test_long_run_matches_oracle(flags, sync_free):
    m = run_against_oracle(2, 3, 3, 25, 7, "exp", sync_free=sync_free, **options(**flags))
    assert int((m.engrams.engrams_types == L_).sum()) > 0  # the run did have long-term memory


@settings(max_examples=20, deadline=None)
@given(
    B=st.integers(1, 3), H=st.integers(1, 4), W=st.integers(1, 3), steps=st.integers(1, 12),
    seed=st.integers(0, 2**31), form=st.sampled_from(["exp", "neg_sq"]), r_stm=st.integers(0, 3),
    cap=st.integers(0, 5), depth=st.integers(0, 3), life0=st.integers(1, 4), r_ltm=st.integers(0, 4),
    flags=st.sampled_from(ABLATIONS), sync_free=st.booleans(),
)
def test_matches_oracle_on_random_runs(B, H, W, steps, seed, form, r_stm, cap, depth, life0, r_ltm, flags, sync_free):
    run_against_oracle(B, H, W, steps, seed, form, sync_free=sync_free, num_reminded_stm=r_stm, stm_capacity=cap,
                       ltm_search_depth=depth, initial_lifespan=life0, num_final_ltms=r_ltm, **flags)


def test_default_options_are_the_hebbian_memory():
    explicit = Memoria(**options(), use_short_term=True, use_long_term=True, ltm_search="hebbian", static_shape=True,
                       validate=False, seed=2)
    assert_same_runs(run(Memoria(**options(), static_shape=True, validate=False, seed=2), 20), run(explicit, 20))


# ------------------------------------------------------------------------------------------------ random search
def grown_memory(seed=1, **kw) -> tuple[Memoria, torch.Tensor]:
    """A hebbian memory of 2 rows after 30 steps (plenty of LTMs), and the next step's working memory."""
    g = torch.Generator().manual_seed(seed)
    m = Memoria(**options(stm_capacity=6, initial_lifespan=6), static_shape=True, validate=False, seed=seed,
                track_id=True, **kw)
    for _ in range(30):
        _, idx = m.add_and_remind(torch.randn(2, 3, 4, generator=g))
        m.adjust_lifespan_and_memories(idx, torch.rand(idx.shape, generator=g) * 2)
    return m, torch.randn(2, 3, 4, generator=g)


def with_options(m: Memoria, **kw) -> Memoria:
    """A copy of `m`'s state under other ablation options (and any other constructor arguments)."""
    base = dict(options(stm_capacity=6, initial_lifespan=6), static_shape=True, validate=False, seed=m.seed,
                track_id=True)
    base.update(kw)
    other = Memoria(**base)
    state = m.state_dict()
    state["config"] = other._config()
    other.load_state_dict(state)
    return other


def ltm_ids(m: Memoria, idx: torch.Tensor) -> list[list[int]]:
    """The reminded LTMs' engram ids, per row (read before adjust)."""
    view = m.engrams
    return [[int(view.engram_ids[b, i]) for i in row if i >= 0 and int(view.engrams_types[b, i]) == L_]
            for b, row in enumerate(idx.tolist())]


@pytest.mark.parametrize("sync_free", [False, True])
def test_random_search_visits_depth_plus_one_distinct_ltms_per_chain(sync_free):
    """num_final_ltms as large as the chains' visits, so every candidate is returned: F itself. Its size is the
    recalled STMs x (depth + 1) (or every LTM when fewer), all distinct, all long-term, and exactly the LTMs with
    the largest brute-force keys; the global RNG is untouched."""
    m, wm = grown_memory()
    extra_stms = (m.store.types[0] == S_).nonzero()[1:, 0]
    m.store.types[0, extra_stms] = int(EngramType.NULL)  # row 0 keeps one STM: fewer chains than recalls
    depth = m.ltm_search_depth
    for chains, depth_ in ((3, depth), (1, 0), (3, 30)):  # 30 hops: more visits than there are LTMs
        r = with_options(m, ltm_search="random", num_reminded_stm=chains, ltm_search_depth=depth_,
                         num_final_ltms=chains * (depth_ + 1))
        r._force_sync_free = sync_free
        view = r.engrams
        n_ltm = (view.engrams_types == L_).sum(1).tolist()
        n_stm = (view.engrams_types == S_).sum(1).tolist()
        live_ltm = [set(view.engram_ids[b][view.engrams_types[b] == L_].tolist()) for b in range(2)]
        rng = torch.random.get_rng_state()
        _, idx = r.add_and_remind(wm)
        assert torch.equal(torch.random.get_rng_state(), rng)
        key = random_keys(r.seed, r.next_engram_id)
        for b, got in enumerate(ltm_ids(r, idx)):
            want = min(min(chains, n_stm[b]) * (depth_ + 1), n_ltm[b])
            assert len(got) == len(set(got)) == want > 0, (chains, depth_, b)
            assert set(got) <= live_ltm[b]
            assert set(got) == set(sorted(live_ltm[b], key=lambda i: -key(i))[:want])
        if depth_ == 30:
            assert ltm_ids(r, idx)[0] and all(len(g) == n for g, n in zip(ltm_ids(r, idx), n_ltm))  # all of them


def test_matched_random_search_draws_as_many_ltms_as_the_walk_finds():
    m, wm = grown_memory()
    sizes = {}
    for search in ("hebbian", "random_matched"):
        other = with_options(m, ltm_search=search, num_final_ltms=3 * 3)  # every candidate returned
        _, idx = other.add_and_remind(wm)
        sizes[search] = ltms = ltm_ids(other, idx)
        assert all(len(row) == len(set(row)) for row in ltms)
    assert [len(r) for r in sizes["hebbian"]] == [len(r) for r in sizes["random_matched"]]
    assert sum(map(len, sizes["hebbian"])) > 0 and sizes["hebbian"] != sizes["random_matched"]


def test_random_search_is_seeded_and_differs_from_the_walk():
    m, wm = grown_memory()
    picks = {}
    for name, kw in (("hebbian", {}), ("random", dict(ltm_search="random")),
                     ("random again", dict(ltm_search="random")), ("random seed 9", dict(ltm_search="random", seed=9))):
        other = with_options(m, **kw)
        if "seed" in kw:
            other._set_seed(9)  # the loaded state carries the seed of the saved memory
        _, idx = other.add_and_remind(wm)
        picks[name] = ltm_ids(other, idx)
    assert picks["random"] == picks["random again"]
    assert picks["random"] != picks["hebbian"]
    assert picks["random"] != picks["random seed 9"]


def test_random_search_gives_a_chain_to_an_stm_without_counts():
    """One recalled STM that never co-fired with anything: the walk finds no LTM, the random search draws
    depth + 1 of them."""
    m = Memoria(num_reminded_stm=1, stm_capacity=1, ltm_search_depth=1, initial_lifespan=10, num_final_ltms=5,
                ltm_search="random", track_id=True, deterministic=True)
    walk = Memoria(num_reminded_stm=1, stm_capacity=1, ltm_search_depth=1, initial_lifespan=10, num_final_ltms=5,
                   track_id=True, deterministic=True)
    g = torch.Generator().manual_seed(0)
    for mem in (m, walk):
        mem.num_reminded_stm = 0  # fill the memory without reminding anything: no counts between engrams
        mem.num_final_ltms = 0
    for _ in range(5):
        x = torch.randn(1, 1, 2, generator=g)
        for mem in (m, walk):
            _, idx = mem.add_and_remind(x)
            mem.adjust_lifespan_and_memories(idx, torch.zeros(idx.shape))
    for mem in (m, walk):
        mem.num_reminded_stm, mem.num_final_ltms = 1, 5
        assert mem.store.counts.sum() == 5  # each engram's own fire count only (as WM)
    x = torch.randn(1, 1, 2, generator=g)
    _, idx = m.add_and_remind(x)
    _, walk_idx = walk.add_and_remind(x)
    assert len(ltm_ids(walk, walk_idx)[0]) == 0
    assert len(ltm_ids(m, idx)[0]) == 2  # one chain: the seed and one hop


# ------------------------------------------------------------------------------------------------ levels
def test_without_short_term_the_recalled_stms_still_seed_the_walk_and_fire():
    """From the same state and working memory: the default's long-term part is what use_short_term=False returns
    (the walk started from the same recalled STMs), no short-term engram is returned, and the co-fire counts
    grow as the default's (the recalled STMs fired)."""
    m, wm = grown_memory()
    full, no_stm = with_options(m), with_options(m, use_short_term=False)
    counts_before = no_stm.store.counts.clone()
    _, idx_full = full.add_and_remind(wm)
    _, idx = no_stm.add_and_remind(wm)
    view = no_stm.engrams
    assert idx.shape[1] == no_stm.num_final_ltms  # the static width has no STM part
    assert ltm_ids(no_stm, idx) == ltm_ids(full, idx_full) and any(ltm_ids(full, idx_full))
    valid = idx >= 0
    assert bool(valid.any()) and all(int(view.engrams_types[b, i]) == L_ for b in range(2) for i in idx[b][valid[b]])
    assert torch.equal(no_stm.store.counts, full.store.counts) and not torch.equal(full.store.counts, counts_before)


def test_without_short_term_the_walk_keeps_finding_ltms():
    """Over a run from an empty memory, use_short_term=False still reminds long-term engrams through the walk
    (its seeds' edges to LTMs come from recalled STMs firing)."""
    m = Memoria(**options(stm_capacity=6, initial_lifespan=8), use_short_term=False, static_shape=True,
                validate=False, track_id=True)
    g = torch.Generator().manual_seed(4)
    found = 0
    for _ in range(25):
        _, idx = m.add_and_remind(torch.randn(2, 3, 4, generator=g))
        found += sum(map(len, ltm_ids(m, idx)))
        assert all(len(r) == int((i >= 0).sum()) for r, i in zip(ltm_ids(m, idx), idx))  # only LTMs
        m.adjust_lifespan_and_memories(idx, torch.rand(idx.shape, generator=g) * 3)
    assert found > 0


@pytest.mark.parametrize("sync_free", [False, True])
def test_without_long_term_only_stms_are_returned_and_engrams_still_reach_ltm(sync_free):
    m = Memoria(**options(), use_long_term=False, static_shape=True, validate=False, track_id=True)
    m._force_sync_free = sync_free
    g = torch.Generator().manual_seed(3)
    for _ in range(20):
        _, idx = m.add_and_remind(torch.randn(2, 3, 4, generator=g))
        assert idx.shape == (2, m.num_reminded_stm)
        view = m.engrams
        assert all(int(view.engrams_types[b, i]) == S_ for b in range(2) for i in idx[b] if i >= 0)
        m.adjust_lifespan_and_memories(idx, torch.rand(idx.shape, generator=g) * 3)
    assert int((m.store.types == L_).sum()) > 0  # WM -> STM -> LTM as before


def test_static_width_follows_the_levels():
    for flags, width in (({}, 6), (dict(use_short_term=False), 3), (dict(use_long_term=False), 3),
                         (dict(use_short_term=False, use_long_term=False), 0), (dict(ltm_search="exhaustive"), 6)):
        m = Memoria(**options(), static_shape=True, validate=False, **flags)
        for out in run(m, 8):
            assert out[1].shape == (2, width) and out[0].shape == (2, width, 5), flags


# ------------------------------------------------------------------------------------------------ graph paths
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("flags", ABLATIONS, ids=lambda f: ",".join(f"{k}={v}" for k, v in f.items()))
def test_ablations_trace_as_whole_graphs_and_replay(flags, fused):
    """fullgraph tracing (no host sync, no recompile) and emulated CUDA-graph replay give the eager run."""
    torch._dynamo.reset()
    kw = dict(options(), static_shape=True, validate=False, seed=1, **flags)

    def traced_memory() -> Memoria:
        m = Memoria(**kw, ltm_capacity=6)
        m._force_sync_free = True
        for name in DEVICE_CALLS:
            setattr(m, name, torch.compile(getattr(m, name), fullgraph=True, backend="eager"))
        return m

    with torch._dynamo.config.patch(error_on_recompile=True):
        got = run(traced_memory(), 12, fused=fused)
    assert_same_runs(run(Memoria(**kw, ltm_capacity=6), 12), got)
    torch._dynamo.reset()
    graphed = Memoria(**kw, cuda_graph=True, initial_capacity=8)
    graphed._force_sync_free = True
    graphed._graph_backend = backend = EmulatedGraphs()
    assert_same_runs(run(Memoria(**kw, initial_capacity=8), 25), run(graphed, 25, fused=fused))
    assert backend.replays > 0


def test_random_search_compiled_equals_eager():
    """compile=True through inductor (C++ here): the random search's hashed keys and top-k as eager."""
    torch._dynamo.reset()
    kw = dict(options(), static_shape=True, validate=False, seed=4, ltm_capacity=6, ltm_search="random")
    compiled = Memoria(**kw, compile=True)
    assert_same_runs(run(Memoria(**kw), 10), run(compiled, 10, fused=True))
    assert int((compiled.store.types == L_).sum()) > 0
    torch._dynamo.reset()


# ------------------------------------------------------------------------------------------------ state, errors
def test_state_dict_carries_the_options():
    m, _ = grown_memory()
    r = with_options(m, ltm_search="random", use_short_term=False)
    assert r._config()["ltm_search"] == "random" and r._config()["use_short_term"] is False
    hebbian = Memoria(**options(stm_capacity=6, initial_lifespan=6), static_shape=True, validate=False,
                      track_id=True)
    with pytest.raises(ValueError, match="ltm_search"):
        hebbian.load_state_dict(r.state_dict())  # loading into a hebbian memory names the difference
    old = m.state_dict()
    for name in ("use_short_term", "use_long_term", "ltm_search"):
        del old["config"][name]  # a state saved before the options existed: the defaults
    fresh = Memoria(**options(stm_capacity=6, initial_lifespan=6), static_shape=True, validate=False, track_id=True)
    fresh.load_state_dict(old)
    with pytest.raises(ValueError, match="use_long_term"):
        Memoria(**options(), use_long_term=False).load_state_dict(old)


@pytest.mark.parametrize("kw, match", [
    (dict(ltm_search="dfs"), "ltm_search must be one of"),
    (dict(ltm_search="Random"), "ltm_search must be one of"),
    (dict(use_short_term=0), "use_short_term must be True or False"),
    (dict(use_long_term="no"), "use_long_term must be True or False"),
])
def test_bad_options_are_named(kw, match):
    with pytest.raises(ValueError, match=match):
        Memoria(**options(), **kw)
