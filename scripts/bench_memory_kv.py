"""Time the memory keys/values projections of Memoria GPT-2: batched GEMMs over all blocks against one GEMM per block
(and, an experiment, one wide GEMM over every block's weights side by side).

Every block's memory attention projects the same memories with its own c_attn (H -> 2H): the working memory
(B, W, H), which carries gradient into the Abstractor, and the reminded engrams (B, M, H), which carry none.
Per block (what the model falls back to when a c_attn has hooks or is replaced): one GEMM over both side by side,
whose backward also computes an input gradient for the reminded rows, then each block's keys and values copied
heads-major (B, nh, M, hd) for the attention's batched matmuls (as compiled float32 blocks do).
`stacked_memory_projections` (the model's path): one batched GEMM over the L blocks per memory, input gradient
only for the working memory, and one heads-major copy per memory for every block. This script times forward +
backward of both at the WikiText-103 shape (12 blocks, 768 wide, batch 8, W 50, M 100), with a loss that reads
every block's keys and values, after checking that they give the same outputs and gradients.

Examples:
    python scripts/bench_memory_kv.py                      # GPU: fp32 and bf16
    python scripts/bench_memory_kv.py --device cpu --precisions fp32 --steps 5
Record results in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

import torch  # noqa: E402  (after the sys.path insert above)
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from experiment.models.gpt2_memoria import (  # noqa: E402
    GPT2WithMemoriaConfig,
    GPT2WithMemoriaModel,
    memory_keys_values,
    stacked_memory_projections,
)


def per_block(blocks, wm: torch.Tensor, remembered: torch.Tensor) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Each block's own projection of both memories side by side, split into keys and values and laid out
    heads-major per block (the copies compiled float32 blocks make for their attention's batched matmuls)."""
    joint = torch.cat([wm, remembered], dim=1)  # (B, W + M, H)
    sizes = [wm.shape[1], remembered.shape[1]]
    return [[(k.contiguous(), v.contiguous())
             for k, v in memory_keys_values(block.memory_attn, block.memory_attn.c_attn(joint), sizes)]
            for block in blocks]  # [block][memory] (keys, values) (B, nh, M_i, hd)


def stacked(blocks, wm: torch.Tensor, remembered: torch.Tensor) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    return stacked_memory_projections(blocks, [wm, remembered])  # [block][memory] (keys, values) (B, nh, M_i, hd)


def wide(blocks, wm: torch.Tensor, remembered: torch.Tensor) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """One plain GEMM per memory against every block's weights side by side, (B*M, H) x (H, L*2H), instead of a
    batched GEMM over the blocks: the same products, as one wide GEMM (more output tiles per call, and one
    input-gradient GEMM with a long reduction instead of L batched ones summed). An experiment: the model stacks."""
    L, nh = len(blocks), blocks[0].memory_attn.num_heads
    weight = torch.cat([b.memory_attn.c_attn.weight for b in blocks], dim=1)  # (H, L*2H)
    bias = torch.cat([b.memory_attn.c_attn.bias for b in blocks])  # (L*2H,)
    per_memory = []
    for values in (wm, remembered):
        B, M, H = values.shape
        kv = torch.addmm(bias, values.reshape(B * M, H), weight)  # (B*M, L*2H)
        kv = kv.view(B, M, L, 2, nh, H // nh).permute(3, 2, 0, 4, 1, 5).contiguous()  # (2, L, B, nh, M, hd)
        per_memory.append(list(zip(kv[0].unbind(0), kv[1].unbind(0))))
    return [list(block_kv) for block_kv in zip(*per_memory)]


def step(fn, blocks, wm, remembered, weights, precision: str) -> list[torch.Tensor]:
    """Forward + backward; returns every key and value tensor of every block (float32, detached)."""
    with torch.autocast(wm.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        outs = [t for block_kv in fn(blocks, wm, remembered) for kv in block_kv for t in kv]
        loss = sum((t.float() * w).sum() for t, w in zip(outs, weights))  # reads every output
    loss.backward()
    return [t.detach().float() for t in outs]


def time_fn(fn, blocks, wm, remembered, weights, precision, warmup: int, steps: int) -> list[float]:
    sync = torch.cuda.synchronize if wm.device.type == "cuda" else (lambda: None)
    times = []
    for i in range(warmup + steps):
        sync()
        start = time.perf_counter()
        step(fn, blocks, wm, remembered, weights, precision)
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - start)
        blocks.zero_grad(set_to_none=True)
        wm.grad = None
    return times


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--working", type=int, default=50, help="W, working-memory slots")
    parser.add_argument("--reminded", type=int, default=100, help="M, reminded slots")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=2, help="the two variants take turns this many times")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    torch.manual_seed(0)
    config = GPT2WithMemoriaConfig(n_layer=args.layers, n_embd=args.width, n_head=12 if args.width % 12 == 0 else 1,
                                   vocab_size=16, bos_token_id=None, eos_token_id=None, memoria_num_memories=1)
    blocks = GPT2WithMemoriaModel(config).h.to(device)
    B, H = args.batch_size, args.width
    wm = torch.randn(B, args.working, H, device=device, requires_grad=True)  # from the Abstractor: has a gradient
    remembered = torch.randn(B, args.reminded, H, device=device)  # Memoria's stored engrams: none
    nh = blocks[0].memory_attn.num_heads
    weights = [torch.randn(B, nh, slots, H // nh, device=device)  # block, memory, keys / values
               for _ in blocks for slots in (args.working, args.reminded) for _ in range(2)]
    print(f"device {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}; {args.layers} blocks, "
          f"B {B}, W {args.working}, M {args.reminded}, H {H}; forward + backward; median ms of {args.steps} steps "
          f"x {args.rounds} rounds", flush=True)

    variants = (("per_block", per_block), ("stacked", stacked), ("wide", wide))
    rows = []
    for precision in args.precisions:
        # the same result first: every block's output, the working memory's and every parameter's gradient
        results = {}
        for name, fn in variants:
            outs = step(fn, blocks, wm, remembered, weights, precision)
            results[name] = [*outs, wm.grad.clone(), *(p.grad.clone() for p in blocks.parameters()
                                                         if p.grad is not None)]
            blocks.zero_grad(set_to_none=True)
            wm.grad = None
        for name, _ in variants[1:]:
            assert len(results["per_block"]) == len(results[name]), name
            for x, y in zip(results["per_block"], results[name]):
                if precision == "bf16":  # bf16 rounds differently in the two; compare whole tensors
                    error = (x - y).norm() / y.norm().clamp(min=1e-12)
                    assert error < 1e-2, f"{name}: bf16 results differ by {error:.3g} (relative norm)"
                else:  # fp32: the GEMMs sum in other orders (H100: 1.1e-4 apart in one element of 1.2M)
                    torch.testing.assert_close(x, y, atol=1e-3, rtol=1e-3, msg=lambda m, n=name: f"{n}: {m}")

        flops = {}
        for name, fn in variants:  # forward + backward FLOPs of one step (matmuls)
            with FlopCounterMode(display=False) as counter:
                step(fn, blocks, wm, remembered, weights, precision)
            flops[name] = counter.get_total_flops()
            blocks.zero_grad(set_to_none=True)
            wm.grad = None

        times = {name: [] for name, _ in variants}
        for _ in range(args.rounds):
            for name, fn in variants:
                times[name] += time_fn(fn, blocks, wm, remembered, weights, precision, args.warmup, args.steps)
        ms = {name: 1e3 * statistics.median(times[name]) for name, _ in variants}
        rate = {name: flops[name] / ms[name] / 1e9 for name, _ in variants}
        labels = {"per_block": "per block", "stacked": "batched over blocks (the model's)", "wide": "one wide GEMM"}
        parts = [f"{labels[name]} {ms[name]:.3f} ms ({flops[name] / 1e9:.1f} GFLOP, {rate[name]:.1f} TFLOP/s, "
                 f"x{ms['per_block'] / ms[name]:.2f})" for name, _ in variants]
        print(f"{precision}: " + "; ".join(parts) + "; same outputs and gradients", flush=True)
        rows.append({"precision": precision, "per_block_ms": ms["per_block"], "batched_ms": ms["stacked"],
                     "wide_ms": ms["wide"], "per_block_gflop": flops["per_block"] / 1e9,
                     "batched_gflop": flops["stacked"] / 1e9, "wide_gflop": flops["wide"] / 1e9})
    return rows


if __name__ == "__main__":
    main()
