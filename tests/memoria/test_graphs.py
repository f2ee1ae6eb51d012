"""The step's device work is graph-safe (no host sync, no host value that changes between steps), the GPU's
sync-free path equals the CPU's shortcuts, compiled equals eager, and CUDA-graph replay equals eager execution
(emulated on the CPU; for real on a GPU)."""

from __future__ import annotations

import re

import pytest
import torch

from memoria import EngramType, Memoria

L_ = int(EngramType.LONGTERM)
DEVICE_CALLS = ("_add_device", "_remind_device", "_adjust_device", "_add_and_remind_device")


def run(m: Memoria, steps: int, seed: int = 0, B: int = 2, W: int = 3, H: int = 5, device: str = "cpu",
        events: dict | None = None, fused: bool = False):
    """Outputs (memories, indices) of `steps` steps on generated data; `events` maps a step to a callable run
    on the memory before it (resets, masks). `fused`: add and remind through `add_and_remind`."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for t in range(steps):
        x = torch.randn(B, W, H, generator=g).to(device)
        mask = None
        if events and t in events:
            mask = events[t](m)
        if fused:
            mem, idx = m.add_and_remind(x, mask=mask)
        else:
            m.add_working_memory(x, mask=mask)
            mem, idx = m.remind()
        width = m.num_reminded_stm + m.num_final_ltms
        delta = (torch.rand(B, width, generator=g) * 3).to(device)[:, : idx.shape[1]]
        m.adjust_lifespan_and_memories(idx, delta)
        out.append((mem.clone(), idx.clone()))
    return out


def assert_same_runs(a, b):
    for t, ((m1, i1), (m2, i2)) in enumerate(zip(a, b)):
        assert torch.equal(i1.cpu(), i2.cpu()), t
        assert torch.equal(m1.cpu(), m2.cpu()), t


def config(**kw):
    base = dict(num_reminded_stm=3, stm_capacity=4, ltm_search_depth=3, initial_lifespan=3, num_final_ltms=3,
                static_shape=True, validate=False)
    base.update(kw)
    return base


@pytest.mark.parametrize("deterministic", [True, False])
def test_sync_free_path_matches_the_cpu_shortcuts(deterministic):
    shortcuts = Memoria(**config(deterministic=deterministic, seed=3))
    sync_free = Memoria(**config(deterministic=deterministic, seed=3))
    sync_free._force_sync_free = True  # the GPU's path: whole count rows, every hop run
    a, b = run(shortcuts, 30), run(sync_free, 30)
    assert_same_runs(a, b)
    assert int((sync_free.store.types == L_).sum()) > 0  # the walk had long-term memory to cover


@pytest.mark.parametrize("fused", [False, True])
def test_step_traces_as_whole_graphs_without_recompiling(fused):
    """torch.compile(fullgraph=True) fails on any host sync or data-dependent Python branch, and
    error_on_recompile on any host value that changes between steps: what a CUDA-graph capture cannot hold
    (also add and remind as one call)."""
    torch._dynamo.reset()
    def traced_memory() -> Memoria:
        m = Memoria(**config(seed=1, ltm_capacity=6))  # a fixed capacity: the store never grows
        m._force_sync_free = True
        for name in DEVICE_CALLS:
            setattr(m, name, torch.compile(getattr(m, name), fullgraph=True, backend="eager"))
        return m

    eager, traced = Memoria(**config(seed=1, ltm_capacity=6)), traced_memory()
    with torch._dynamo.config.patch(error_on_recompile=True):
        got = run(traced, 14, fused=fused)
        again = run(traced_memory(), 14, fused=fused)  # a new memory (as after a restore) reuses the compiled code
    assert_same_runs(run(eager, 14), got)
    assert_same_runs(got, again)
    assert int(traced.evictions.sum()) > 0  # the eviction path ran inside the traced adjust
    torch._dynamo.reset()


def test_cuda_graph_needs_the_static_unvalidated_path():
    with pytest.raises(ValueError, match="cuda_graph need static_shape=True"):
        Memoria(**config(validate=True), cuda_graph=True)
    with pytest.raises(ValueError, match="cuda_graph and compile need"):
        Memoria(**config(static_shape=False), cuda_graph=True, compile=True)
    m = Memoria(**config(), cuda_graph=True)  # off a GPU it changes nothing
    assert_same_runs(run(m, 6), run(Memoria(**config()), 6))


@pytest.mark.parametrize("fused", [False, True])
def test_compiled_step_equals_eager(fused):
    """compile=True through inductor (C++ on the CPU, Triton on a GPU): the same steps as eager execution, also
    after a reset to another batch size (as when evaluation follows training: a second compile); also with add
    and remind as one call (one compiled function)."""
    torch._dynamo.reset()
    kw = config(num_reminded_stm=4, num_final_ltms=4, stm_capacity=8, ltm_search_depth=2, seed=4, ltm_capacity=6)
    eager, compiled = Memoria(**kw), Memoria(**kw, compile=True)
    for B in (2, 50):
        for m in (eager, compiled):
            m.reset_memory()
        assert_same_runs(run(eager, 8, B=B), run(compiled, 8, B=B, fused=fused))
    assert set(compiled._compiled) == ({"add_remind", "adjust"} if fused else {"add", "remind", "adjust"})
    torch._dynamo.reset()


def test_compiled_step_with_int16_counts_equals_eager():
    """The compiled co-fire update adds into the counts with index_put_; with int16 counts (which Triton cannot
    add atomically, so inductor falls back) the steps are still those of eager execution."""
    torch._dynamo.reset()
    kw = config(num_reminded_stm=4, num_final_ltms=4, stm_capacity=8, ltm_search_depth=2, seed=4, ltm_capacity=6,
                count_dtype=torch.int16)
    eager, compiled = Memoria(**kw), Memoria(**kw, compile=True)
    assert_same_runs(run(eager, 8, B=3), run(compiled, 8, B=3, fused=True))
    assert torch.equal(eager.store.counts, compiled.store.counts)
    torch._dynamo.reset()


def test_compiled_step_ordering_by_counting_equals_eager(monkeypatch):
    """On a GPU the compiled step puts _top's keys in order by counting instead of sorting: forced here on the
    CPU, the same steps as eager execution (which sorts)."""
    import memoria.memoria

    monkeypatch.setattr(memoria.memoria, "_order_by_counting", lambda key: torch.compiler.is_compiling())
    torch._dynamo.reset()
    kw = config(num_reminded_stm=4, num_final_ltms=4, stm_capacity=8, ltm_search_depth=2, seed=4, ltm_capacity=6)
    eager, compiled = Memoria(**kw), Memoria(**kw, compile=True)
    assert_same_runs(run(eager, 8, B=3), run(compiled, 8, B=3))
    torch._dynamo.reset()


@pytest.mark.parametrize("fused", [False, True])
def test_compiled_step_writes_counts_and_data_in_place(fused):
    """Inductor turns an in-place scatter into a tensor the step receives into a copy of all of it, the scatter
    and a copy back (and an index_put through a view of it into a pass over all of it); the step writes through
    store.write_slots / count_pairs (index_put_ on the tensors themselves when compiled), so the compiled code
    neither allocates nor passes over anything of the counts' (B, C + 1, C) or the data's (B, C, H) size."""
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    kw = config(num_reminded_stm=4, num_final_ltms=4, stm_capacity=8, ltm_search_depth=2, seed=4, ltm_capacity=12)
    compiled = Memoria(**kw, compile=True)
    _, code = run_and_get_code(lambda: run(compiled, 3, B=2, W=3, H=7, fused=fused))
    torch._dynamo.reset()
    code = "\n".join(code)
    B, C1, C = compiled.store.counts.shape
    H = compiled.store.data.shape[2]
    assert "index_put" in code
    for shape in ((B, C1, C), (B, C, H)):
        assert not re.search(rf"empty_strided_\w+\(\({shape[0]}, {shape[1]}, {shape[2]}\),", code), shape
        numel = shape[0] * shape[1] * shape[2]  # a loop (C++) or a launch (Triton) over all of it
        assert not re.search(rf"\b{numel}L?\b", code), (shape, numel)


class EmulatedGraphs:
    """CUDA-graph semantics on the CPU, for StepGraphs' bookkeeping: a capture records the call without its
    effects (the store is rolled back, as a capture runs nothing), a replay reruns it on the captured static
    inputs and writes into the captured outputs in place, and fails if the store's tensors are not the ones
    captured (a real graph holds their addresses)."""

    def __init__(self):
        self.captures = self.replays = 0

    def stream(self, device):
        return None

    def run_on(self, stream, device, fn, args):
        return fn(*args)

    def capture(self, stream, fn, args):
        store = fn.__self__.store
        before = store.state_dict()
        outputs = fn(*args)
        for name, tensor in before.items():
            getattr(store, name).copy_(tensor)
        self.captures += 1
        held = {name: getattr(store, name) for name in before}
        return (fn, args, outputs, store, held), outputs

    def replay(self, graph):
        fn, args, outputs, store, held = graph
        assert fn.__self__.store is store and all(getattr(store, n) is t for n, t in held.items())
        fresh = fn(*args)
        for out, new in zip(outputs if isinstance(outputs, tuple) else (outputs,),
                            fresh if isinstance(fresh, tuple) else (fresh,)):
            if out is not None:  # (adjust's eviction count without a cap)
                out.copy_(new)
        self.replays += 1


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("deterministic", [True, False])
def test_graph_bookkeeping_equals_eager_with_emulated_graphs(deterministic, fused):
    """Warm-up, capture, replay, static inputs and outputs, recapture after growth, resets and masks: the same
    run as eager execution (the CUDA version of this test runs on a GPU); also with add and remind as one call."""
    kw = config(deterministic=deterministic, seed=2, initial_capacity=8)  # small: the store grows (recapture)
    eager, graphed = Memoria(**kw), Memoria(**kw, cuda_graph=True)
    for m in (eager, graphed):
        m._force_sync_free = True
    graphed._graph_backend = backend = EmulatedGraphs()
    events = {12: lambda mem: mem.reset_memory(), 20: lambda mem: mem.reset_memory(rows=torch.tensor([False, True])),
              25: lambda mem: torch.tensor([False, True])}
    a, b = run(eager, 40, events=events), run(graphed, 40, events=events, fused=fused)
    assert_same_runs(a, b)
    assert backend.replays > (40 if fused else 60) and backend.captures >= 4  # replayed; recaptured on growth
    assert {key[0] for key in graphed._graphs.graphs} == ({"add_remind", "adjust"} if fused
                                                          else {"add", "remind", "adjust"})
    assert graphed.store.capacity > 8
    for name, t in eager.state_dict()["store"].items():
        assert torch.equal(t, graphed.state_dict()["store"][name]), name


# ------------------------------------------------------------------------------------------------ CUDA
def resets() -> dict:
    """Events for run(): a full reset at step 12, row 1 reset at step 20, row 0 masked at step 25."""
    dev = "cuda"
    return {
        12: lambda mem: mem.reset_memory(),
        20: lambda mem: mem.reset_memory(rows=torch.tensor([False, True], device=dev)),
        25: lambda mem: torch.tensor([False, True], device=dev),
    }


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("deterministic", [True, False])
def test_cuda_graph_replay_equals_eager(deterministic, fused):
    kw = config(deterministic=deterministic, seed=2, initial_capacity=8)  # small: the store grows (recapture)
    eager = Memoria(**kw, device="cuda")
    graphed = Memoria(**kw, device="cuda", cuda_graph=True)
    a = run(eager, 40, device="cuda", events=resets())
    b = run(graphed, 40, device="cuda", events=resets(), fused=fused)
    assert_same_runs(a, b)
    assert graphed._graphs is not None and len(graphed._graphs.graphs) == (2 if fused else 3)  # all replayed
    assert graphed.store.capacity > 8
    sa, sb = eager.state_dict(), graphed.state_dict()
    for name, t in sa["store"].items():
        assert torch.equal(t, sb["store"][name]), name


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fused", [False, True])
def test_cuda_compiled_and_graphed_step_equals_eager(fused):
    torch._dynamo.reset()
    kw = config(seed=3, ltm_capacity=6)  # a fixed store size: one compile per call
    eager = run(Memoria(**kw, device="cuda"), 14, device="cuda")
    fast = Memoria(**kw, device="cuda", compile=True, cuda_graph=True)
    got = run(fast, 14, device="cuda", fused=fused)
    for t, ((m1, i1), (m2, i2)) in enumerate(zip(eager, got)):
        assert torch.equal(i1, i2), t
        torch.testing.assert_close(m1, m2)
    assert len(fast._graphs.graphs) == (2 if fused else 3)
    torch._dynamo.reset()


ON_CUDA = pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                             reason="needs CUDA")])


@pytest.mark.parametrize("device", ["emulated", ON_CUDA])
def test_graph_outputs_are_not_overwritten_by_the_next_step(device):
    m = Memoria(**config(), device="cpu" if device == "emulated" else device, cuda_graph=True)
    if device == "emulated":
        m._graph_backend, m._force_sync_free = EmulatedGraphs(), True
    dev = m.device
    g = torch.Generator(device=dev).manual_seed(0)
    raw = []  # what remind returned, as returned (run() would clone it)
    for _ in range(12):
        m.add_working_memory(torch.randn(2, 3, 5, generator=g, device=dev))
        mem, idx = m.remind()
        raw.append((mem, idx, mem.clone(), idx.clone()))
        m.adjust_lifespan_and_memories(idx, torch.rand(idx.shape, generator=g, device=dev) * 3)
    assert len(m._graphs.graphs) == 3  # the later steps were replays
    for mem, idx, mem_then, idx_then in raw:
        assert torch.equal(mem, mem_then) and torch.equal(idx, idx_then)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("cuda_graph", [False, True])
def test_cuda_step_makes_no_host_sync(cuda_graph, fused):
    m = Memoria(50, 400, 10, 9, 50, static_shape=True, validate=False, ltm_capacity=1024, cuda_graph=cuda_graph)
    dev = torch.device("cuda")
    x = torch.randn(30, 8, 50, 64, device=dev)
    logits = torch.randn(30, 8, 100, device=dev)
    for t in range(30):
        if t == 5:  # warm-up and capture are over
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        try:
            if fused:
                _, idx = m.add_and_remind(x[t])
            else:
                m.add_working_memory(x[t])
                _, idx = m.remind()
            m.adjust_lifespan_and_memories(idx, logits[t].softmax(-1) * 8)
        finally:
            if t == 29:
                torch.cuda.set_sync_debug_mode(0)
    assert not cuda_graph or len(m._graphs.graphs) == (2 if fused else 3)
    assert int((m.store.types == L_).sum()) > 0


def test_autocast_of_the_caller_does_not_reach_the_step():
    """Models run Memoria inside their autocast region; scores must still be full fp32 (algorithm.md §c.2)."""
    plain = run(Memoria(**config(seed=6)), 20, H=64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = run(Memoria(**config(seed=6)), 20, H=64)
    assert_same_runs(plain, autocast)


@pytest.mark.parametrize("count_dtype", [torch.int16, torch.int64])
@pytest.mark.parametrize("sync_free", [False, True])
def test_count_dtypes_give_the_same_run(count_dtype, sync_free):
    runs = []
    for dtype in (torch.int32, count_dtype):
        m = Memoria(**config(seed=8), count_dtype=dtype)
        m._force_sync_free = sync_free
        runs.append(run(m, 25))
        assert m.store.counts.dtype == dtype
    assert_same_runs(*runs)
