"""The graph walk of `remind` as a Triton kernel (GPUs; Triton ships with torch's CUDA builds).

In torch ops every hop of the walk is a gather of count rows, an add, a row max, a where and a scatter: about
seven small kernels a hop, 77 for the LM configuration's 11 hops, most of the step's device time once it is
replayed as a CUDA graph. Here one launch runs one hop: programs over (batch row, block of chains), each chain
scanning the count row of its current engram in tiles and keeping the running best (count + tie fraction of open
targets, first column on equal values, as `torch.max`). Each launch first closes the previous hop's targets of its
row; one scatter closes the last hop's.

Same inputs, same result as the torch walk (`Memoria._torch_walk`); `tests/memoria/test_kernels.py` checks it
through Triton's interpreter. `walk_op` is the same as a torch custom op (`torch.ops.memoria.walk`), which
torch.compile keeps whole inside a compiled step.

This module imports triton; `memoria.py` imports it only when a walk runs on a GPU (or a test forces it). Off a
GPU it runs only in Triton's interpreter: TRITON_INTERPRET=1 set before triton is first imported (the tests do).
"""

from __future__ import annotations

import contextlib
import math

import torch
import triton
import triton.language as tl

# The fastest setting over the three configurations' sizes on an H100 (docs/benchmarks.md): 4 chains a program,
# tiles of 4096 (chains x columns) elements, 4 warps. One program per batch row running every hop ("rows", the
# fewest launches) was slower than the torch walk beyond the LM size: its B programs walk their tiles one after
# another.
TILE = 4096
NUM_WARPS = 4
CHAINS_PER_PROGRAM = 4


@triton.jit
def _close(open_b, chain_b, R, C, BLOCK: tl.constexpr):
    """Close (-inf in open) the engram each of the row's R chains is on (C = none)."""
    for r0 in range(0, R, BLOCK):
        r = r0 + tl.arange(0, BLOCK)
        r_ok = r < R
        at = tl.load(chain_b + r, mask=r_ok, other=C)
        tl.store(open_b + at, tl.full([BLOCK], float("-inf"), tl.float64), mask=r_ok & (at < C))


@triton.jit
def _hop_kernel(counts_ptr, open_ptr, src_ptr, dst_ptr, C, R, chains,
                stride_cb, stride_cr, stride_ob, stride_xb,
                BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_CLOSE: tl.constexpr,
                CLOSE_SOURCES: tl.constexpr):
    """Program (b, p) moves chains [p * chains, (p + 1) * chains) of batch row b one hop. counts (B, C + 1, C)
    int (row C: the all-zero sink), open (B, C + 1) float64: the tie fraction (< 0.5) of open targets, -inf
    elsewhere; src / dst (B, R) int64: the chains' sources (C = stopped) and where their targets go.
    CLOSE_SOURCES (every hop but the first): first close the sources of all the row's chains, the previous hop's
    targets. Every program of the row writes the same -inf there, so their writes race harmlessly, and each reads
    its own after the barrier."""
    b = tl.program_id(0).to(tl.int64)
    first = tl.program_id(1) * chains  # this program's first chain
    counts_b = counts_ptr + b * stride_cb
    open_b = open_ptr + b * stride_ob
    src_b = src_ptr + b * stride_xb
    dst_b = dst_ptr + b * stride_xb
    if CLOSE_SOURCES:
        _close(open_b, src_b, R, C, BLOCK_CLOSE)
        tl.debug_barrier()
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


def walk(counts: torch.Tensor, src: torch.Tensor, open_: torch.Tensor, hops: int) -> None:
    """Run `hops` lock-step hops of the greedy walk from `src` (B, R) int64 (C = no chain) over `counts`
    (B, C + 1, C), closing every visited target in `open_` (B, C + 1) float64 in place (column C: "no node").
    Equals `Memoria._torch_walk(counts, src, open_, hops)`."""
    B, R = src.shape
    C = counts.shape[2]
    if B == 0 or R == 0 or C == 0 or hops == 0:
        return
    if not (counts.stride(2) == 1 and open_.stride(1) == 1 and open_.dtype == torch.float64
            and open_.shape[1] > C):
        raise ValueError("walk needs counts and open_ (B, C + 1) float64, each contiguous in its last dimension")
    cur = src.to(torch.int64).contiguous().clone()  # (B, R) scratch: chain positions
    nxt = torch.empty_like(cur)
    chains = min(R, CHAINS_PER_PROGRAM)
    block_r = min(64, triton.next_power_of_2(chains), TILE)
    block_c = min(max(16, TILE // block_r), triton.next_power_of_2(C))
    strides = (counts.stride(0), counts.stride(1), open_.stride(0), cur.stride(0))
    options = dict(BLOCK_R=block_r, BLOCK_C=block_c, BLOCK_CLOSE=min(64, triton.next_power_of_2(R)),
                   num_warps=NUM_WARPS)
    # launch on the tensors' GPU, whichever is current (a no-op context on the CPU, under the interpreter)
    with torch.cuda.device(counts.device) if counts.is_cuda else contextlib.nullcontext():
        # one launch a hop; each closes the previous hop's targets first, so the launches read and write
        # alternate buffers (a program must not overwrite a source another program of its row still closes)
        for hop in range(hops):
            _hop_kernel[(B, triton.cdiv(R, chains))](counts, open_, cur, nxt, C, R, chains, *strides,
                                                     CLOSE_SOURCES=hop > 0, **options)
            cur, nxt = nxt, cur
    open_.scatter_(1, cur, -math.inf)  # the last hop's targets (column C takes the stopped chains' C)


@torch.library.custom_op("memoria::walk", mutates_args=("open_",))
def walk_op(counts: torch.Tensor, src: torch.Tensor, open_: torch.Tensor, hops: int) -> None:
    """`walk` as a custom op: torch.compile calls it as it is (it mutates `open_` only)."""
    walk(counts, src, open_, hops)


@walk_op.register_fake
def _walk_op_fake(counts: torch.Tensor, src: torch.Tensor, open_: torch.Tensor, hops: int) -> None:
    return None  # no outputs: the op writes into open_
