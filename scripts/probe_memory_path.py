"""Watch Memoria GPT-2's memory path while it trains on sorting: does the memory drown the tokens?

Trains a model from `conf/model` on generated sorting data with plain Adam (no schedule, clip 1.0, the task's loss
on the 20 answer positions, memory built by the earlier segments without gradient, as the sorting task does) and
prints, every `--every` steps: the loss, the gradient norm, the spread of the final hidden states over positions
(mean over rows and features of their standard deviation across the segment's positions: near 0 means every
position looks the same, the plateau at loss ln 20), and for each layer the norm of the two memory
cross-attentions' outputs (working memory `wm`, reminded memory `mem`) with their spread over positions.

It was written to diagnose the short GPU sorting runs of docs/results.md, where Memoria GPT-2 stayed at loss ln 20:

    python scripts/probe_memory_path.py --model memoria_gpt2_sort --memory sort --length 1000 --segment 256 \
        --batch-size 8 --steps 80 --lr 2e-4
    python scripts/probe_memory_path.py ... --zero-init-memory-output   # c_proj of the memory attention at 0

Any model of conf/model runs (`--model gpt2_sort` for the control); the memory columns exist only for Memoria.
"""

from __future__ import annotations

import argparse
import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="memoria_gpt2_sort")
    parser.add_argument("--memory", default="sort")
    parser.add_argument("--length", type=int, default=1000, help="L, symbols before the separator")
    parser.add_argument("--segment", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--every", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--zero-init-memory-output", action="store_true",
                        help="Memoria only: model.config.memoria_zero_init_memory_output=true (the memory "
                             "cross-attention's output projection starts at zero)")
    args = parser.parse_args(argv)

    import experiment.models.gpt2_memoria as gpt2_memoria
    from experiment.cli import compose_config
    from experiment.models import build_model

    torch.manual_seed(args.seed)
    overrides = [f"model={args.model}", f"memory={args.memory}"]
    if args.zero_init_memory_output:
        overrides.append("model.config.memoria_zero_init_memory_output=true")
    model = build_model(compose_config(overrides).model, vocab_size=21).train()

    outputs: dict[str, list[tuple[float, float]]] = {}
    original = gpt2_memoria.memory_attention

    def recording(attn, hidden, source, keys_values=None, **options):
        y, probs = original(attn, hidden, source, keys_values, **options)
        # norm of the output vector, and its spread across positions (B, T, H) -> scalars
        outputs.setdefault("wm" if probs is None else "mem", []).append(
            (y.norm(dim=-1).mean().item(), y.std(dim=1).mean().item())
        )
        return y, probs

    gpt2_memoria.memory_attention = recording
    try:
        return train(model, args, outputs)
    finally:
        gpt2_memoria.memory_attention = original
        model.reset_memory()


def train(model, args: argparse.Namespace, outputs: dict) -> list[dict]:
    """The training loop; `outputs` is filled by the recording memory attention during each forward."""
    from experiment.data.sorting import IGNORE_INDEX, generate_sorting_splits

    data = generate_sorting_splits(args.length, args.batch_size * args.steps, 1, 1, args.seed)["train"]
    input_ids = torch.tensor([ex["prompt_ids"] + ex["target_ids"][:-1] for ex in data])  # (N, L+20)
    labels = torch.tensor([[IGNORE_INDEX] * args.length + ex["target_ids"] for ex in data])  # (N, L+20)
    last = ((input_ids.shape[1] - 1) // args.segment) * args.segment  # start of the last segment
    if last > input_ids.shape[1] - 20:
        raise SystemExit("the 20 answer positions must lie in the last segment: pick --length / --segment so")
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    rows = []
    for step in range(args.steps):
        batch = slice(step * args.batch_size, (step + 1) * args.batch_size)
        x, y = input_ids[batch], labels[batch]
        model.reset_memory()
        with torch.no_grad():
            for start in range(0, last, args.segment):
                model(x[:, start:start + args.segment])  # builds memory only
        outputs.clear()
        out = model(x[:, last:])
        logits = out.logits  # (B, S, V)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y[:, last:].reshape(-1),
                               ignore_index=IGNORE_INDEX) + out.aux_loss
        optimizer.zero_grad()
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % args.every == 0 or step == args.steps - 1:
            spread = out.hidden_states.std(dim=1).mean().item()
            row = {"step": step, "loss": loss.item(), "grad_norm": grad_norm.item(), "hidden_spread": spread,
                   **outputs}
            rows.append(row)
            memory = "  ".join(
                f"{k} " + " ".join(f"{n:.2f}/{s:.3f}" for n, s in v) for k, v in outputs.items()
            )
            print(f"step {step:4d}  loss {loss.item():.3f}  grad {grad_norm.item():.3f}  "
                  f"hidden spread {spread:.3f}  {memory}", flush=True)
    return rows


if __name__ == "__main__":
    main()
