"""Time the language-modelling loss, forward and backward, in the ways a step can score a segment's logits.

At the WikiText-103 shape the logits are B x T x V = 8 x 150 x 50,257 floats (241 MB in float32), so the loss is
a few passes over a quarter of a gigabyte, and a formulation that copies the logits once more costs another pass
forward and two backward. Three formulations, same logits, each timed forward + backward:

    sliced   cross-entropy of logits[:, :-1] against labels[:, 1:] (T - 1 predictions): the slice cannot be
             flattened without a copy (what `scripts/bench_step.py` and `causal_lm_loss` did before)
    shifted  `causal_lm_loss`: the same T - 1 predictions, the labels shifted instead and the last position
             ignored (no copy)
    task     the LM task's `token_nll` over labels aligned with the positions, as its data gives them (by default
             the same T - 1 targets, the last position -100), divided by the scored tokens: what a training step
             of the task computes
    compiled the same through `compiled_token_nll` (what the LM task runs with compile=true; `--compiled`)

Examples:
    python scripts/bench_loss.py                         # GPU (or CPU) at the WikiText-103 shape, float32
    python scripts/bench_loss.py --compiled                # ... and the task's loss compiled
    python scripts/bench_loss.py --dtype bf16 --json bench_loss.json
    python scripts/bench_loss.py --device cpu --vocab-size 1000 --repeats 3
Record results in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)
sys.path.insert(0, os.path.join(REPO_ROOT, "scripts"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from bench_step import make_batches  # noqa: E402

from experiment.models.gpt2 import causal_lm_loss  # noqa: E402
from experiment.tasks.language_modeling import compiled_token_nll, token_nll  # noqa: E402


def sliced_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    shift = logits[:, :-1]  # (B, T-1, V): not viewable as (B*(T-1), V), so reshape copies it
    return F.cross_entropy(shift.reshape(-1, shift.shape[-1]).float(), labels[:, 1:].reshape(-1))


def task_loss(logits: torch.Tensor, labels: torch.Tensor, nll=token_nll) -> torch.Tensor:
    nll_sum, tokens = nll(logits, labels)
    return nll_sum / tokens.clamp(min=1)


FORMULATIONS = {"sliced": sliced_loss, "shifted": causal_lm_loss, "task": task_loss,
                "compiled": lambda logits, labels: task_loss(logits, labels, compiled_token_nll())}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_loss(fn, logits: torch.Tensor, labels: torch.Tensor, repeats: int, warmup: int) -> tuple[float, float]:
    """Median seconds of fn's forward + backward over `repeats` calls (after `warmup`), and the last loss."""
    device = logits.device
    times, loss = [], None
    for i in range(warmup + repeats):
        logits.grad = None
        synchronize(device)
        start = time.perf_counter()
        loss = fn(logits, labels)
        loss.backward()
        synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times), loss.item()


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=150)
    parser.add_argument("--vocab-size", type=int, default=50257)
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"],
                        help="the logits' dtype (bf16: as an autocast LM head gives them; the loss is float32)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--compiled", action="store_true", help="also time the task's loss compiled")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but no CUDA GPU is visible; use --device cpu")
    if args.seq_len < 2:
        parser.error("--seq-len must be at least 2 (a segment of one token predicts nothing inside it)")

    generator = torch.Generator().manual_seed(args.seed)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    shape = (args.batch_size, args.seq_len, args.vocab_size)
    logits = torch.randn(shape, generator=generator).to(device=device, dtype=dtype).requires_grad_()
    # the input ids (the labels the model's own loss shifts) and the task's labels: the next token of every
    # position but the last (the reference's T - 1 targets a segment)
    [(inputs_labels, aligned_labels)] = make_batches(1, args.batch_size, args.seq_len, args.vocab_size, args.seed,
                                                     device)

    rows = []
    for name, fn in FORMULATIONS.items():
        if name == "compiled" and not args.compiled:
            continue
        labels = aligned_labels if name in ("task", "compiled") else inputs_labels
        seconds, loss = time_loss(fn, logits, labels, args.repeats, args.warmup)
        rows.append({"formulation": name, "median_ms": 1e3 * seconds, "loss": loss})
    base = rows[0]["median_ms"]
    print(f"LM loss forward + backward, logits {' x '.join(map(str, shape))} {args.dtype}, device {device} "
          f"({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), median of {args.repeats}")
    print(f"{'formulation':<10} {'ms':>9} {'x sliced':>9} {'loss':>9}")
    for row in rows:
        row["x_sliced"] = row["median_ms"] / base
        print(f"{row['formulation']:<10} {row['median_ms']:9.3f} {row['x_sliced']:9.3f} {row['loss']:9.4f}")
    if args.json:
        with open(args.json, "w") as file:
            json.dump({"argv": argv if argv is not None else sys.argv[1:], "shape": shape, "dtype": args.dtype,
                       "device": str(device), "rows": rows}, file, indent=1)
    return rows


if __name__ == "__main__":
    main()
