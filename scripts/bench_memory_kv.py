"""Time the memory keys/values projection of Memoria GPT-2: one batched GEMM for all blocks against one per block.

Every block's memory attention projects the same memory values (B, W + M, H) with its own c_attn (H -> 2H).
`stacked_memory_projections` does all L of them in one batched GEMM (weights stacked for the call), what the
model does on a GPU; the alternative is the L calls of each block's own c_attn. This script times forward +
backward of both at the WikiText-103 shape (12 blocks, 768 wide, batch 8, 50 + 100 memory slots), with a loss
that reads every block's output, after checking that they give the same output and gradients.

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

from experiment.models.gpt2_memoria import (  # noqa: E402
    GPT2WithMemoriaConfig,
    GPT2WithMemoriaModel,
    stacked_memory_projections,
)


def per_block(blocks, values: torch.Tensor) -> list[torch.Tensor]:
    return [block.memory_attn.c_attn(values) for block in blocks]  # L x (B, M, 2H)


def stacked(blocks, values: torch.Tensor) -> list[torch.Tensor]:
    return stacked_memory_projections(blocks, values)  # L x (B, M, 2H)


def step(fn, blocks, values, weights, precision: str) -> list[torch.Tensor]:
    with torch.autocast(values.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        outs = fn(blocks, values)
        loss = sum((out.float() * w).sum() for out, w in zip(outs, weights))  # reads every block's output
    loss.backward()
    return outs


def time_fn(fn, blocks, values, weights, precision, warmup: int, steps: int) -> list[float]:
    sync = torch.cuda.synchronize if values.device.type == "cuda" else (lambda: None)
    times = []
    for i in range(warmup + steps):
        sync()
        start = time.perf_counter()
        step(fn, blocks, values, weights, precision)
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - start)
        blocks.zero_grad(set_to_none=True)
        values.grad = None
    return times


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--slots", type=int, default=150, help="W + M memory slots (default 50 + 100)")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=2, help="the two variants take turns this many times")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    torch.manual_seed(0)
    config = GPT2WithMemoriaConfig(n_layer=args.layers, n_embd=args.width, n_head=12 if args.width % 12 == 0 else 1,
                                   vocab_size=16, bos_token_id=None, eos_token_id=None, memoria_num_memories=1)
    blocks = GPT2WithMemoriaModel(config).h.to(device)
    values = torch.randn(args.batch_size, args.slots, args.width, device=device, requires_grad=True)
    weights = [torch.randn(args.batch_size, args.slots, 2 * args.width, device=device) for _ in blocks]
    print(f"device {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}; {args.layers} blocks, "
          f"values ({args.batch_size}, {args.slots}, {args.width}); forward + backward; median ms of {args.steps} "
          f"steps x {args.rounds} rounds", flush=True)

    for precision in args.precisions:
        # same result first: outputs and every gradient
        results = {}
        for name, fn in (("per_block", per_block), ("stacked", stacked)):
            outs = step(fn, blocks, values, weights, precision)
            results[name] = ([o.detach().float() for o in outs], values.grad.clone(),
                             [p.grad.clone() for p in blocks.parameters() if p.grad is not None])
            blocks.zero_grad(set_to_none=True)
            values.grad = None
        tol = {"atol": 2e-2, "rtol": 2e-2} if precision == "bf16" else {"atol": 1e-4, "rtol": 1e-4}
        a, b = results["per_block"], results["stacked"]
        for x, y in zip([*a[0], a[1], *a[2]], [*b[0], b[1], *b[2]]):
            torch.testing.assert_close(x, y, **tol)

        times = {"per_block": [], "stacked": []}
        for _ in range(args.rounds):
            for name, fn in (("per_block", per_block), ("stacked", stacked)):
                times[name] += time_fn(fn, blocks, values, weights, precision, args.warmup, args.steps)
        per, one = (1e3 * statistics.median(times[k]) for k in ("per_block", "stacked"))
        print(f"{precision}: per block {per:.3f} ms, one GEMM {one:.3f} ms (x{per / one:.2f}); same output and "
              "gradients", flush=True)


if __name__ == "__main__":
    main()
