"""The graph walk of `remind` as Triton kernels (GPUs; Triton ships with torch's CUDA builds).

In torch ops every hop of the walk is a gather of count rows, an add, a row max, a where and a scatter: about
seven small kernels a hop, 77 for the LM configuration's 11 hops, most of the step's device time once it is
replayed as a CUDA graph. Here each chain scans the count row of its current engram in tiles and keeps the running
best (count + tie fraction of open targets, first column on equal values, as `torch.max`); then the hop's targets
are closed and the next hop starts. Two ways to run it (`walk(mode=...)`):

    "hops"  (default) one launch per hop: programs over (row, block of 4 chains), each first closing the previous
            hop's targets of its row (B * chains / 4 programs, each one tile or a few; one scatter at the end)
    "rows"  one launch for every hop: one program per batch row runs all its chains, closes their targets itself
            and goes on (the fewest launches, but B programs walking their tiles one after another: R x C / 4096
            tiles a hop, each waiting on its loads)

Same inputs, same result as the torch walk (`Memoria._torch_walk`); `tests/memoria/test_kernels.py`
checks both modes through Triton's interpreter, and `scripts/bench_walk.py` times them on a GPU. `walk_op` is the
same as a torch custom op (`torch.ops.memoria.walk`), which torch.compile keeps whole inside a compiled step.

This module imports triton; `memoria.py` imports it only when a walk runs on a GPU (or a test forces it). Off a
GPU it runs only in Triton's interpreter: TRITON_INTERPRET=1 set before triton is first imported (the tests do).
"""

from __future__ import annotations

import contextlib
import math
import os

import torch
import triton
import triton.language as tl

# Measured on an H100 (scripts/bench_walk.py, graphed, 2026-11-26; docs/benchmarks.md): "hops" with 4 chains a
# program, tiles of 4096 elements and 4 warps is the fastest setting over the three configurations' sizes
# (geometric mean; LM 38 us against the torch walk's 242 us, 2 chains a program 37; enwik8 141 against 715; sort
# 537 against 4,612). "rows" is slower than the torch walk beyond the LM size (its B programs walk their tiles one
# after another); its best is tile 8192, 16 warps. MEMORIA_WALK (below) replaces these for another GPU.
_TILE = 4096
_NUM_WARPS = 4
_MODE = "hops"
_HOP_CHAINS = 4  # chains per program in "hops" mode
MODES = ("rows", "hops")


def _settings_from_environment(text: str) -> None:
    """MEMORIA_WALK="mode=rows,tile=4096,num_warps=8,hop_chains=4" (any of them) replaces the defaults above: the
    fastest row of scripts/bench_walk.py on another GPU, without editing this file."""
    global _MODE, _TILE, _NUM_WARPS, _HOP_CHAINS
    names = {"mode": "_MODE", "tile": "_TILE", "num_warps": "_NUM_WARPS", "hop_chains": "_HOP_CHAINS"}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, _, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if key not in names:
            raise ValueError(f"MEMORIA_WALK: unknown setting {key!r} in {text!r}; use {', '.join(names)} "
                             "(e.g. MEMORIA_WALK='mode=hops,tile=4096,num_warps=8,hop_chains=4')")
        if key == "mode":
            if value not in MODES:
                raise ValueError(f"MEMORIA_WALK: mode must be one of {MODES}, got {value!r}")
            _MODE = value
            continue
        if not value.isdigit() or int(value) < 1 or (key in ("tile", "num_warps") and int(value) & (int(value) - 1)):
            raise ValueError(f"MEMORIA_WALK: {key} must be a positive integer"
                             f"{' and a power of 2' if key in ('tile', 'num_warps') else ''}, got {value!r}")
        globals()[names[key]] = int(value)


if os.environ.get("MEMORIA_WALK"):
    _settings_from_environment(os.environ["MEMORIA_WALK"])


@triton.jit
def _close(open_b, chain_b, R, C, BLOCK: tl.constexpr):
    """Close (-inf in open) the engram each of the row's R chains is on (C = none)."""
    for r0 in range(0, R, BLOCK):
        r = r0 + tl.arange(0, BLOCK)
        r_ok = r < R
        at = tl.load(chain_b + r, mask=r_ok, other=C)
        tl.store(open_b + at, tl.full([BLOCK], float("-inf"), tl.float64), mask=r_ok & (at < C))


@triton.jit
def _walk_kernel(counts_ptr, open_ptr, src_ptr, dst_ptr, C, R, hops, chains,
                 stride_cb, stride_cr, stride_ob, stride_xb,
                 BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_CLOSE: tl.constexpr,
                 CLOSE_SOURCES: tl.constexpr, CLOSE_TARGETS: tl.constexpr):
    """Program (b, p) moves chains [p * chains, (p + 1) * chains) of batch row b, `hops` hops. counts (B, C + 1, C)
    int (row C: the all-zero sink), open (B, C + 1) float64: the tie fraction (< 0.5) of open targets, -inf
    elsewhere; src / dst (B, R) int64: the chains' sources (C = stopped) and where their targets go (the same
    buffer when hops > 1).
    CLOSE_SOURCES ("hops" mode, every hop but the first): first close the sources of all the row's chains, the
    previous hop's targets. Every program of the row writes the same -inf there, so their writes race harmlessly,
    and each reads its own after the barrier.
    CLOSE_TARGETS ("rows" mode): the program holds all of its row's chains and closes each hop's targets itself."""
    b = tl.program_id(0).to(tl.int64)
    first = tl.program_id(1) * chains  # this program's first chain
    counts_b = counts_ptr + b * stride_cb
    open_b = open_ptr + b * stride_ob
    src_b = src_ptr + b * stride_xb
    dst_b = dst_ptr + b * stride_xb
    if CLOSE_SOURCES:
        _close(open_b, src_b, R, C, BLOCK_CLOSE)
        tl.debug_barrier()
    for _hop in range(hops):
        # every chain picks its strongest open target, all against the same open set (lock-step)
        for r0 in range(0, chains, BLOCK_R):
            within = r0 + tl.arange(0, BLOCK_R)  # (BLOCK_R,) positions among this program's chains
            r = first + within
            r_ok = (within < chains) & (r < R)
            src = tl.load(src_b + r, mask=r_ok, other=C)  # (BLOCK_R,) C = the sink row: no edges
            best = tl.full([BLOCK_R], float("-inf"), tl.float64)
            arg = tl.full([BLOCK_R], 0, tl.int64) + C
            for c0 in range(0, C, BLOCK_C):
                c = c0 + tl.arange(0, BLOCK_C)  # (BLOCK_C,)
                c_ok = c < C
                tie = tl.load(open_b + c, mask=c_ok, other=float("-inf"))  # (BLOCK_C,) float64
                count = tl.load(counts_b + src[:, None] * stride_cr + c[None, :],
                                mask=r_ok[:, None] & c_ok[None, :], other=0)  # (BLOCK_R, BLOCK_C)
                value = count.to(tl.float64) + tie[None, :]  # >= 1 iff a positive count to an open target
                tile_best, tile_arg = tl.max(value, axis=1, return_indices=True)  # first column on equal values
                better = tile_best > best  # strict: an earlier tile keeps an equal value
                best = tl.where(better, tile_best, best)
                arg = tl.where(better, tile_arg.to(tl.int64) + c0, arg)
            target = tl.where(best >= 1.0, arg, C)  # no positive open edge: the chain stops (C from now on)
            tl.store(dst_b + r, target, mask=r_ok)  # each chain reads and writes only its own entry
        if CLOSE_TARGETS:  # then the hop's targets are visited: closed for every later hop
            tl.debug_barrier()
            _close(open_b, dst_b, R, C, BLOCK_CLOSE)
            tl.debug_barrier()


def walk(counts: torch.Tensor, src: torch.Tensor, open_: torch.Tensor, hops: int, *, tile: int | None = None,
         num_warps: int | None = None, mode: str | None = None, hop_chains: int | None = None) -> None:
    """Run `hops` lock-step hops of the greedy walk from `src` (B, R) int64 (C = no chain) over `counts`
    (B, C + 1, C), closing every visited target in `open_` (B, C + 1) float64 in place (column C: "no node").
    Equals `Memoria._torch_walk(counts, src, open_, hops)`.
    `tile` (elements of a chains x columns tile, a power of 2), `num_warps`, `mode` ("rows" or "hops", see
    above) and `hop_chains` (chains per program in "hops" mode) override the defaults (for tuning)."""
    B, R = src.shape
    C = counts.shape[2]
    mode = mode or _MODE
    if mode not in MODES:
        raise ValueError(f"walk mode must be one of {MODES}, got {mode!r}")
    if B == 0 or R == 0 or C == 0 or hops == 0:
        return
    if not (counts.stride(2) == 1 and open_.stride(1) == 1 and open_.dtype == torch.float64
            and open_.shape[1] > C):
        raise ValueError("walk needs counts and open_ (B, C + 1) float64, each contiguous in its last dimension")
    cur = src.to(torch.int64).contiguous().clone()  # (B, R) scratch: chain positions
    chains = R if mode == "rows" else min(R, hop_chains or _HOP_CHAINS)
    tile = tile or _TILE
    block_r = min(64, triton.next_power_of_2(chains), tile)
    block_c = min(max(16, tile // block_r), triton.next_power_of_2(C))
    strides = (counts.stride(0), counts.stride(1), open_.stride(0), cur.stride(0))
    options = dict(BLOCK_R=block_r, BLOCK_C=block_c, BLOCK_CLOSE=min(64, triton.next_power_of_2(R)),
                   num_warps=num_warps or _NUM_WARPS)
    # launch on the tensors' GPU, whichever is current (a no-op context on the CPU, under the interpreter)
    with torch.cuda.device(counts.device) if counts.is_cuda else contextlib.nullcontext():
        if mode == "rows":
            _walk_kernel[(B, 1)](counts, open_, cur, cur, C, R, hops, chains, *strides,
                                 CLOSE_SOURCES=False, CLOSE_TARGETS=True, **options)
            return
        # one launch a hop; each closes the previous hop's targets first, so the launches read and write
        # alternate buffers (a program must not overwrite a source another program of its row still closes)
        nxt = torch.empty_like(cur)
        for hop in range(hops):
            _walk_kernel[(B, triton.cdiv(R, chains))](counts, open_, cur, nxt, C, R, 1, chains, *strides,
                                                      CLOSE_SOURCES=hop > 0, CLOSE_TARGETS=False, **options)
            cur, nxt = nxt, cur
        open_.scatter_(1, cur, -math.inf)  # the last hop's targets (column C takes the stopped chains' C)


@torch.library.custom_op("memoria::walk", mutates_args=("open_",))
def walk_op(counts: torch.Tensor, src: torch.Tensor, open_: torch.Tensor, hops: int) -> None:
    """`walk` with the defaults, as a custom op: torch.compile calls it as it is (it mutates `open_` only)."""
    walk(counts, src, open_, hops)


@walk_op.register_fake
def _walk_op_fake(counts: torch.Tensor, src: torch.Tensor, open_: torch.Tensor, hops: int) -> None:
    return None  # no outputs: the op writes into open_
