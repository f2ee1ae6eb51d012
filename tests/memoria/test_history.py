import torch

from memoria import EngramHistory, Memoria, edge_weights


def run(m: Memoria, steps: int = 8):
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        m.add_working_memory(torch.randn(2, 2, 3, generator=g))
        _, idx = m.remind()
        m.adjust_lifespan_and_memories(idx, torch.full(idx.shape, 1.5))


def test_history_records_creation_firing_gains_and_deletion(tmp_path):
    m = Memoria(2, 2, 2, 2, 2, keep_history=True)  # forces id/age tracking (with a warning)
    assert m.track_id and m.track_age
    run(m)
    h = m.history
    created = h.table("created")
    assert len(created) == 8 * 2 * 2 and created[0] == {"row": 0, "engram_id": 0, "timestep": 1}
    fired, extended, deleted = h.table("fired"), h.table("extended"), h.table("deleted")
    assert fired and len(extended) == len(fired) and all(e["gain"] == 1.5 for e in extended)
    assert deleted and all(d["age"] >= 1 for d in deleted)
    live = set(m.engrams.engram_ids[0][m.engrams.engrams_types[0] > 0].tolist())
    assert not live & {d["engram_id"] for d in deleted if d["row"] == 0}
    path = tmp_path / "history.json"
    h.save(path)
    assert EngramHistory.load(path).state_dict() == h.state_dict()


def test_history_is_bounded_and_off_by_default():
    m = Memoria(2, 2, 2, 2, 2, keep_history=True, history_limit=5)
    run(m)
    assert len(m.history.table("created")) == 5 and m.history.dropped["created"] == 8 * 2 * 2 - 5
    assert Memoria(2, 2, 2, 2, 2).history is None


def test_edge_weights_are_conditional_fire_rates():
    m = Memoria(2, 4, 2, 4, 2, track_id=True)
    run(m, 5)
    ids, w = edge_weights(m, 0)
    e = m.engrams
    live = e.engrams_types[0] > 0
    counts = e.induce_counts[0][live][:, live].double()
    assert torch.equal(ids, e.engram_ids[0][live].long())
    fires = counts.diagonal()
    expect = torch.where(fires[:, None] > 0, counts / fires.clamp(min=1)[:, None], 0.0)
    assert torch.allclose(w.double(), expect)
    assert torch.all(w.diagonal()[fires > 0] == 1)


def test_history_records_promotions_evictions_and_type_counts():
    m = Memoria(2, 2, 2, 3, 2, keep_history=True, ltm_capacity=2, deterministic=True)
    g = torch.Generator().manual_seed(1)
    for _ in range(8):
        m.add_working_memory(torch.randn(2, 2, 3, generator=g))
        _, idx = m.remind()
        counts = m.type_counts()  # (B, 4) at the remind, indexed by EngramType
        m.adjust_lifespan_and_memories(idx, torch.full(idx.shape, 2.0))
        last = [c for c in m.history.table("counts") if c["timestep"] == m.timestep]
        assert [[c["working"], c["short_term"], c["long_term"]] for c in last] == counts[:, 1:].tolist()
    h = m.history
    promoted, evicted, deleted = h.table("promoted"), h.table("evicted"), h.table("deleted")
    assert promoted and evicted  # STM capacity 2 overflows; LTM capacity 2 evicts
    e = m.engrams
    for row in range(2):
        live = e.engrams_types[row] > 0
        ids = e.engram_ids[row][live].tolist()
        types = e.engrams_types[row][live].tolist()
        gone = {d["engram_id"] for d in deleted + evicted if d["row"] == row}
        assert not gone & set(ids)
        made_ltm = {p["engram_id"] for p in promoted if p["row"] == row}
        # every live LTM was promoted, and nothing was promoted that is still short-term
        assert {i for i, t in zip(ids, types) if t == 3} <= made_ltm
        assert not {i for i, t in zip(ids, types) if t == 2} & made_ltm
        assert len({i for i in made_ltm if i not in gone}) == sum(t == 3 for t in types)


def test_extend_shifts_rows_and_old_files_load():
    a = Memoria(2, 2, 2, 2, 2, keep_history=True)
    run(a, 3)
    joined = EngramHistory()
    joined.extend(a.history, row_offset=0)
    joined.extend(a.history, row_offset=2)
    rows = {e["row"] for e in joined.table("created")}
    assert rows == {0, 1, 2, 3} and len(joined.table("fired")) == 2 * len(a.history.table("fired"))
    old = a.history.state_dict()
    for kind in ("promoted", "evicted", "counts"):  # a file written before these kinds existed
        del old["events"][kind], old["dropped"][kind]
    loaded = EngramHistory.from_state_dict(old)
    assert loaded.table("promoted") == [] and loaded.table("created") == a.history.table("created")
