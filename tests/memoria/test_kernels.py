"""The Triton graph walk (memoria/kernels.py) equals the torch walk, hop for hop: on the CPU through Triton's
interpreter, on a GPU compiled."""

from __future__ import annotations

import math
import os

import pytest
import torch

from memoria import EngramType, Memoria

from .test_graphs import assert_same_runs, config, run

triton = pytest.importorskip("triton", reason="the walk kernel needs Triton")
from memoria import kernels  # noqa: E402  (after the skip: it imports triton)

L_ = int(EngramType.LONGTERM)


@pytest.fixture
def interpret():
    """Kernels on CPU tensors: only in Triton's interpreter (tests/conftest.py turns it on without a GPU)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("CPU tensors need TRITON_INTERPRET=1 before triton is imported (the CUDA tests cover this)")


def random_walk_inputs(B, C, R, seed, dtype=torch.int32, ties=False):
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, 4, (B, C + 1, C), generator=g).to(dtype)
    counts *= torch.rand(B, C + 1, C, generator=g) < 0.3  # sparse, as co-firing is
    counts[:, C] = 0  # the sink row
    frac = torch.randint(0, 3, (B, C), generator=g).double() * 0.1 if ties else torch.rand(B, C, generator=g) * 0.49
    is_ltm = torch.rand(B, C, generator=g) < 0.7
    open_ = torch.full((B, C + 1), -math.inf, dtype=torch.float64)
    open_[:, :C] = torch.where(is_ltm, frac, -math.inf)
    src = torch.randint(0, C + 1, (B, R), generator=g)  # C = no chain
    return counts, src, open_


@pytest.mark.parametrize(
    "B, C, R, hops, tile",
    [
        (3, 37, 10, 4, 64),  # several column tiles per chain block
        (2, 50, 70, 3, 256),  # two chain blocks (R > 64), column tiles of 16
        (2, 9, 5, 6, 8192),  # one tile holds everything; chains run out of edges
        (1, 40, 1, 12, 64),  # one chain
    ],
)
@pytest.mark.parametrize("ties", [False, True])
def test_walk_kernel_equals_the_torch_walk(interpret, monkeypatch, B, C, R, hops, tile, ties):
    monkeypatch.setattr(kernels, "TILE", tile)
    monkeypatch.setattr(kernels, "CHAINS_PER_PROGRAM", 3)  # several programs a row, the last one partial
    counts, src, open_ = random_walk_inputs(B, C, R, seed=C + R + hops, ties=ties)
    want = open_.clone()
    Memoria._torch_walk(counts, src, want, hops)
    got = open_.clone()
    kernels.walk(counts, src, got, hops)
    assert torch.equal(got[:, :C], want[:, :C])
    assert int(torch.isneginf(want[:, :C]).sum()) > int(torch.isneginf(open_[:, :C]).sum())  # it went somewhere


@pytest.mark.parametrize("dtype", [torch.int16, torch.int64])
def test_walk_kernel_reads_every_count_dtype(interpret, dtype):
    counts, src, open_ = random_walk_inputs(2, 20, 6, seed=1, dtype=dtype)
    want, got = open_.clone(), open_.clone()
    Memoria._torch_walk(counts, src, want, 5)
    kernels.walk(counts, src, got, 5)
    assert torch.equal(got[:, :20], want[:, :20])


def test_walk_kernel_leaves_src_and_counts_alone(interpret):
    counts, src, open_ = random_walk_inputs(2, 16, 4, seed=2)
    counts0, src0 = counts.clone(), src.clone()
    kernels.walk(counts, src, open_, 3)
    assert torch.equal(counts, counts0) and torch.equal(src, src0)


def test_walk_kernel_refuses_what_it_cannot_read(interpret):
    counts, src, open_ = random_walk_inputs(2, 16, 4, seed=2)
    with pytest.raises(ValueError, match=r"open_ \(B, C \+ 1\) float64"):
        kernels.walk(counts, src, open_[:, :16].contiguous(), 3)
    with pytest.raises(ValueError, match=r"open_ \(B, C \+ 1\) float64"):
        kernels.walk(counts, src, open_.float(), 3)


@pytest.mark.parametrize("deterministic", [True, False])
def test_memoria_with_the_walk_kernel_equals_the_torch_walk(interpret, deterministic):
    kw = config(deterministic=deterministic, seed=4, ltm_search_depth=4)
    plain, fused = Memoria(**kw), Memoria(**kw)
    plain._force_sync_free = fused._force_sync_free = True  # the GPU's path (whole rows), where the kernel runs
    plain.fused_walk = False
    fused._walk_kernel_off_gpu = True
    calls = []
    real = kernels.walk
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kernels, "walk", lambda *a: calls.append(1) or real(*a))
        b = run(fused, 30)
    assert_same_runs(run(plain, 30), b)
    assert len(calls) >= 29  # every remind after the first walked with the kernel
    assert int((fused.store.types == L_).sum()) > 0


def test_compiled_step_calls_the_walk_kernel_and_equals_eager(interpret, monkeypatch):
    """compile=True (inductor, fullgraph) keeps the kernel's custom op whole inside the compiled remind."""
    torch._dynamo.reset()
    kw = config(seed=7, ltm_capacity=6, ltm_search_depth=4)
    eager, compiled = Memoria(**kw), Memoria(**kw, compile=True)
    eager.fused_walk = False
    compiled._walk_kernel_off_gpu = True
    calls = []
    real = kernels.walk
    monkeypatch.setattr(kernels, "walk", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert_same_runs(run(eager, 12), run(compiled, 12))
    assert len(calls) >= 12  # the pre-flight build, then every compiled remind
    assert compiled.fused_walk and int((compiled.store.types == L_).sum()) > 0
    torch._dynamo.reset()


def test_compile_checks_the_kernel_before_tracing_it(interpret, monkeypatch):
    """A kernel that cannot be built is found by the eager pre-flight: warned about once, and the compiled
    step traces the torch walk instead."""
    torch._dynamo.reset()
    kw = config(seed=8, ltm_capacity=6)
    compiled = Memoria(**kw, compile=True)
    compiled._walk_kernel_off_gpu = True

    def broken(*args, **kwargs):
        raise RuntimeError("out of resources: shared memory")

    monkeypatch.setattr(kernels, "walk", broken)
    with pytest.warns(UserWarning, match="Triton walk kernel failed"):
        got = run(compiled, 8)
    assert not compiled.fused_walk
    assert_same_runs(run(Memoria(**kw), 8), got)
    torch._dynamo.reset()


def test_the_torch_walk_runs_where_the_kernel_does_not(monkeypatch):
    calls = []
    monkeypatch.setattr(kernels, "walk", lambda *a: calls.append(1))
    counts, src, open_ = random_walk_inputs(2, 16, 4, seed=3)
    m = Memoria(**config())
    assert not m._walk_in_one_kernel(counts, src, open_) and not calls  # off a GPU
    m._walk_kernel_off_gpu = True
    assert m._walk_in_one_kernel(counts, src, open_) and len(calls) == 1
    m.fused_walk = False
    assert not m._walk_in_one_kernel(counts, src, open_) and len(calls) == 1  # turned off


def test_a_failing_kernel_falls_back_to_the_torch_walk(interpret, monkeypatch):
    """An untested Triton that cannot build the kernel costs a warning, not the run: same outputs as without it."""
    kw = config(seed=6)
    plain, fused = Memoria(**kw), Memoria(**kw)
    plain._force_sync_free = fused._force_sync_free = True
    plain.fused_walk = False
    fused._walk_kernel_off_gpu = True

    def broken(*args):
        raise RuntimeError("no such PTX version")

    monkeypatch.setattr(kernels, "walk", broken)
    with pytest.warns(UserWarning, match="Triton walk kernel failed .*no such PTX version"):
        got = run(fused, 20)
    assert_same_runs(run(plain, 20), got)
    assert fused.fused_walk is False  # warned once, then the torch walk


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("deterministic", [True, False])
def test_cuda_walk_kernel_equals_the_torch_walk(deterministic):
    """At the LM configuration's sizes (chains in two blocks past 64, count rows in several tiles)."""
    kw = dict(num_reminded_stm=80, stm_capacity=120, ltm_search_depth=10, initial_lifespan=9, num_final_ltms=50,
              static_shape=True, validate=False, deterministic=deterministic, seed=5, device="cuda")
    plain, fused = Memoria(**kw, fused_walk=False), Memoria(**kw)
    a = run(plain, 40, B=4, W=50, H=32, device="cuda")
    b = run(fused, 40, B=4, W=50, H=32, device="cuda")
    assert_same_runs(a, b)
    assert int((fused.store.types == L_).sum(1).min()) > 200  # a walk over a real long-term memory
    for name, t in plain.state_dict()["store"].items():
        assert torch.equal(t, fused.state_dict()["store"][name]), name
    counts, src, open_ = random_walk_inputs(8, 1100, 50, seed=6)
    want = open_.clone()
    Memoria._torch_walk(counts, src, want, 11)
    got = open_.cuda()
    kernels.walk(counts.cuda(), src.cuda(), got, 11)
    assert torch.equal(got.cpu()[:, :1100], want[:, :1100])
