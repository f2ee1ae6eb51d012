"""Time one training step of Memoria GPT-2 against plain GPT-2 at the WikiText-103 shape, fp32 and bf16.

One step = forward of one segment (the model carries its memory from the previous step), the LM task's loss (its
`token_nll` over labels aligned with the inputs, as the task's data gives them: the T - 1 predictions inside the
segment, the reference's protocol), backward, gradient clipping to 1.0, Adam step, zero grad: what the LM task does
per optimizer step, without Lightning's loop around it. Inputs are random token ids from a private generator.

Shapes (experiments.md §b.1, §b.2):
    default   12 layers x 768 wide x 12 heads, vocab 50257, batch 8, 150 tokens; Memoria with memory=lm
              (50 engrams/step, STM 400, reminded 50/50, depth 10)
    --tiny    the *_tiny model configs (2 x 64 x 2) with memory=tiny, vocab 1000, batch 2, 16 tokens (CPU smoke)

The memory is reset once before the warm-up; the timed steps follow `--warmup` steps, so they measure a memory that
has filled its STM and started an LTM (the LM task resets every 500 steps). Each (model, precision) pair runs in
this process one after the other; CUDA timings synchronise around every step.

Examples:
    python scripts/bench_step.py                          # GPU: fp32 and bf16, both models
    python scripts/bench_step.py --tiny --device cpu --precisions fp32
    python scripts/bench_step.py --warmup 50 --steps 100 --json bench_step.json
    python scripts/bench_step.py --profile profile.txt    # also where the time goes (torch.profiler tables)
    python scripts/bench_step.py --phases                 # ... and per phase of the step (CUDA events)
    python scripts/bench_step.py --pipelined              # ... and steps back to back (one sync at the end)
    python scripts/bench_step.py --compile-blocks         # every transformer block compiled (compile=true)
    python scripts/bench_step.py --compile-blocks --compile-mode reduce-overhead --rounds 2
                                                          # ... replayed as CUDA graphs; two rounds in turn
                                                          # (with --compile-blocks the loss is compiled too, as
                                                          # compile=true does in the LM task; --loss eager: not)
    python scripts/bench_step.py --precisions fp32 --json eager.json
    python scripts/bench_step.py --precisions fp32 --compile-blocks --compile-mode reduce-overhead \
        --baseline eager.json                             # Memoria against the eager plain step of eager.json

The target (issue 5): Memoria GPT-2 <= 1.3x the eager plain step, fp32, on one H100 (plain is about 34 ms there).
Every run prints each Memoria row against the eager plain step of its precision (from this run or --baseline) and
against the plain model run alike, with the verdict. Record results in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

import torch  # noqa: E402  (after the sys.path insert above)

from experiment.tasks.language_modeling import IGNORE_INDEX, compiled_token_nll, token_nll  # noqa: E402

MODELS = {  # label -> (model config, memory config, more overrides) at full and tiny size
    # on a GPU the memory step is replayed as CUDA graphs (memory.cuda_graph, on by default as in training runs)
    "memoria_gpt2": ("memoria_gpt2", "lm", []),
    "gpt2": ("gpt2", "lm", []),
}
TARGET = 1.3  # Memoria GPT-2's step at most 1.3x the eager plain step (issue 5), fp32


def build(model_name: str, memory_name: str, overrides: list[str], vocab_size: int, device: torch.device):
    from experiment.cli import compose_config
    from experiment.models import build_model

    cfg = compose_config([f"model={model_name}", f"memory={memory_name}", *overrides])
    return build_model(cfg.model, vocab_size).to(device)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_optimizer(model, kind: str) -> torch.optim.Optimizer:
    if kind == "task":
        from experiment.tasks.base import adam

        return adam(model.parameters(), lr=2e-4)
    return torch.optim.Adam(model.parameters(), lr=2e-4, **{kind: True})


# The phases of one step, in order (`--phases`): each runs from its mark to the next one. Memoria GPT-2's memory
# read includes the blocks' memory key/value projections (one batched GEMM per memory, before the first block).
PHASES = ("embed + memory read", "blocks forward", "ln_f + memory write", "LM head + loss", "backward",
          "clip + Adam + zero_grad")


class _MarkBefore(torch.nn.Module):
    """`module` that calls `mark()` first, from outside it: a hook on a compiled block would run inside the
    compiled call."""

    def __init__(self, module: torch.nn.Module, mark) -> None:
        super().__init__()
        self.module = module
        self.mark = mark

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:  # the block's own parts (e.g. memory_attn, read by the model before the blocks)
            return getattr(self.module, name)

    def forward(self, *args, **kwargs):
        self.mark()
        return self.module(*args, **kwargs)


class PhaseClock:
    """Marks the phases of a step: CUDA events on a GPU (device time between marks, no extra sync; read after the
    step's synchronisation), wall time on the CPU. Inside the model's forward, the trunk's first block (wrapped),
    its final LayerNorm and the trunk itself (hooks) mark the phases, so the models stay as they are."""

    def __init__(self, model, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list = []
        self.per_step: list[list[float]] = []
        self.trunk = model.transformer
        self.first_block = self.trunk.h[0]
        self.trunk.h[0] = _MarkBefore(self.first_block, self.mark)
        self.handles = [
            self.trunk.ln_f.register_forward_pre_hook(lambda *_: self.mark()),
            self.trunk.register_forward_hook(lambda *_: self.mark()),
        ]

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def end_step(self, keep: bool) -> None:
        """After the step's synchronisation: its phase durations in ms (kept if `keep`)."""
        marks, self.marks = self.marks, []
        if len(marks) != len(PHASES) + 1:
            raise RuntimeError(f"expected {len(PHASES) + 1} phase marks per step, got {len(marks)}")
        if keep:
            pairs = zip(marks, marks[1:])
            self.per_step.append([a.elapsed_time(b) if self.cuda else 1e3 * (b - a) for a, b in pairs])

    def medians(self) -> dict[str, float]:
        return {name: statistics.median(step[i] for step in self.per_step) for i, name in enumerate(PHASES)}

    def remove(self) -> None:
        self.trunk.h[0] = self.first_block
        for handle in self.handles:
            handle.remove()


def make_batches(count: int, batch_size: int, seq_len: int, vocab_size: int, seed: int, device: torch.device
                 ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`count` (input_ids, labels) pairs, each (B, T) of random tokens, labelled as the LM task's data labels them
    by default (the reference's protocol): labels[:, t] = input_ids[:, t + 1], the last position unscored (-100)."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        input_ids = torch.randint(vocab_size, (batch_size, seq_len), generator=generator)
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        labels[:, :-1] = input_ids[:, 1:]
        batches.append((input_ids.to(device), labels.to(device)))
    return batches


def train_step(model, optimizer, batch: tuple[torch.Tensor, torch.Tensor], autocast, mark=lambda: None,
               loss_fn=token_nll) -> torch.Tensor:
    """One training step (forward, loss, backward, clip, Adam, zero grad) on `batch` = (input_ids, labels); returns
    the loss, not read back. The loss is the LM task's: mean NLL over the scored tokens (+ the model's aux loss),
    through `loss_fn` (the task's `token_nll`, or its compiled form)."""
    input_ids, labels = batch
    torch.compiler.cudagraph_mark_step_begin()  # a new iteration for compiled blocks' CUDA graphs (if any)
    with autocast:
        output = model(input_ids)
        nll_sum, tokens = loss_fn(output.logits, labels)
        loss = nll_sum / tokens.clamp(min=1)
        if output.aux_loss is not None:
            loss = loss + output.aux_loss
    mark()
    loss.backward()
    mark()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def autocast_for(device: torch.device, dtype: str):
    return (torch.autocast(device_type=device.type, dtype=torch.bfloat16) if dtype == "bf16"
            else contextlib.nullcontext())


def time_steps(model, optimizer, batches, device, dtype, warmup: int, reset: bool = True,
               losses: list | None = None, clock: PhaseClock | None = None, loss_fn=token_nll) -> list[float]:
    """Seconds per training step for each batch after the first `warmup` ones (memory reset first if `reset`);
    each step's loss is appended to `losses` when given (read after the step's synchronisation); `clock` times
    the step's phases."""
    model.train()
    if reset:
        model.reset_memory()
    autocast = autocast_for(device, dtype)
    mark = clock.mark if clock is not None else (lambda: None)
    times = []
    for i, batch in enumerate(batches):
        synchronize(device)
        start = time.perf_counter()
        mark()
        loss = train_step(model, optimizer, batch, autocast, mark, loss_fn)
        mark()
        synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
        if clock is not None:
            clock.end_step(keep=i >= warmup)
        if losses is not None:
            losses.append(loss.item())
    return times


def time_pipelined(model, optimizer, batches, device, dtype, loss_fn=token_nll) -> tuple[float, list[float]]:
    """Seconds per step of `batches` run back to back, one synchronisation at the end (the memory goes on from
    where it is): what a training loop that does not read the loss every step sees, where the host queues the
    next step while the GPU runs this one (a step with a host sync inside it waits there). Returns the mean and
    the losses, read after the end."""
    model.train()
    autocast = autocast_for(device, dtype)
    synchronize(device)
    start = time.perf_counter()
    losses = [train_step(model, optimizer, batch, autocast, loss_fn=loss_fn) for batch in batches]
    synchronize(device)
    return (time.perf_counter() - start) / len(batches), [loss.item() for loss in losses]


def count_flops(model, optimizer, batches, device, dtype, loss_fn=token_nll) -> int:
    """FLOPs of one more training step (the memory warm, as timed), by torch.utils.flop_counter."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        time_steps(model, optimizer, batches, device, dtype, warmup=0, reset=False, loss_fn=loss_fn)
    return counter.get_total_flops()


GEMM_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")


def gemm_flops(name: str, shapes: list) -> float:
    """FLOPs of one call of a GEMM op from its recorded input shapes (0 if they are not what the op takes)."""
    try:
        if name in ("aten::addmm", "aten::baddbmm"):
            shapes = shapes[1:]  # (bias, mat1, mat2, ...)
        a, b = shapes[0], shapes[1]
        batch = a[0] if len(a) == 3 else 1
        return 2.0 * batch * a[-2] * a[-1] * b[-1]
    except (IndexError, TypeError):
        return 0.0


def gemm_table(prof, device: torch.device, steps: int) -> str:
    """The step's GEMMs by op and input shapes: calls and time per step, and the rate they ran at (device time
    on a GPU, host time on the CPU; an eager step, since ops replayed from CUDA graphs are not recorded)."""
    time_of = (lambda e: e.device_time_total) if device.type == "cuda" else (lambda e: e.cpu_time_total)
    rows = []
    for event in prof.key_averages(group_by_input_shape=True):
        if event.key in GEMM_OPS and time_of(event) > 0:
            flops = gemm_flops(event.key, event.input_shapes) * event.count
            rows.append((time_of(event), event.key, event.input_shapes, event.count, flops))
    rows.sort(reverse=True)
    total = sum(r[0] for r in rows)
    lines = [f"GEMMs by shape ({'device' if device.type == 'cuda' else 'host'} time; per step): "
             f"{total / 1e3 / steps:.2f} ms in {sum(r[3] for r in rows) / steps:.0f} calls",
             f"{'ms/step':>8} {'calls':>6} {'us/call':>8} {'TFLOP/s':>8}  op, input shapes"]
    for us, name, shapes, count, flops in rows[:40]:
        rate = flops / (us * 1e-6) / 1e12 if us else 0.0
        lines.append(f"{us / 1e3 / steps:8.3f} {count / steps:6.1f} {us / count:8.1f} {rate:8.2f}  {name} {shapes}")
    return "\n".join(lines) + "\n"


def profile_steps(model, optimizer, batches, device, dtype, title: str, path: str, loss_fn=token_nll) -> None:
    """Append torch.profiler op tables of a few more steps (where the step's time goes) to `path`, and the GEMMs
    by shape."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, record_shapes=True) as prof:
        time_steps(model, optimizer, batches, device, dtype, warmup=0, reset=False,  # the warm memory goes on
                   loss_fn=loss_fn)
    averages = prof.key_averages()
    device_key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    host_ops = sum(1 for event in prof.events() if event.cpu_parent is None and event.name.startswith("aten::"))
    with open(path, "a") as handle:
        per_step = host_ops / len(batches)
        handle.write(f"\n==== {title}: {len(batches)} steps, {per_step:.0f} top-level aten ops per step\n")
        handle.write(averages.table(sort_by=device_key, row_limit=30) + "\n")
        handle.write(averages.table(sort_by="self_cpu_time_total", row_limit=20) + "\n")
        handle.write(gemm_table(prof, device, len(batches)))


def finish_pair(pair: dict, args: argparse.Namespace, batches: list, device: torch.device, loss_fn) -> None:
    """Pipelined steps, FLOPs and profile of a pair after its timings (if asked), then free its model."""
    model, optimizer, precision = pair.pop("model"), pair.pop("optimizer"), pair["precision"]
    clock = pair.pop("clock")
    if clock is not None:  # off before the FLOP count and the profile: they are not timed steps
        pair["phases"] = clock.medians()
        clock.remove()
    if args.pipelined:
        pair["pipelined_ms"] = 1e3 * time_pipelined(model, optimizer, batches[args.warmup:], device, precision,
                                                    loss_fn)[0]
        print(f"{pair['label']} {precision}: pipelined {pair['pipelined_ms']:.2f} ms/step", flush=True)
    if args.flops:
        pair["gflop"] = count_flops(model, optimizer, batches[-1:], device, precision, loss_fn) / 1e9
    if args.profile:
        profile_steps(model, optimizer, batches[-3:], device, precision, f"{pair['label']} {precision}",
                      args.profile, loss_fn)
    del model, optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny models and shapes (CPU smoke run)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--models", nargs="+", default=None, choices=list(MODELS),
                        help="default: both")
    parser.add_argument("--batch-size", type=int, default=None, help="default 8 (tiny: 2)")
    parser.add_argument("--seq-len", type=int, default=None, help="default 150 (tiny: 16)")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=1,
                        help="time --steps steps of every pair this many times, in turn (all models kept alive)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    parser.add_argument("--flops", action="store_true",
                        help="also count the FLOPs of one more training step (torch.utils.flop_counter: matmuls and "
                             "attention, forward and backward)")
    parser.add_argument("--compile-blocks", action="store_true",
                        help="torch.compile every transformer block of each model (the CLI's compile=true)")
    parser.add_argument("--compile-mode", default=None, choices=["default", "reduce-overhead", "max-autotune"],
                        help="torch.compile mode of --compile-blocks (reduce-overhead: replay each block's forward "
                             "and backward as CUDA graphs)")
    parser.add_argument("--optimizer", default="task", choices=["task", "foreach", "fused"],
                        help="Adam's implementation: task = what the LM task uses on this device; foreach / fused "
                             "force one (fused: one kernel for every parameter; CUDA)")
    parser.add_argument("--phases", action="store_true",
                        help="also time the step's phases (memory read, blocks, memory write, head + loss, "
                             "backward, optimizer): CUDA events on a GPU, wall time on the CPU")
    parser.add_argument("--pipelined", action="store_true",
                        help="also time --steps steps of each pair back to back with one synchronisation at the "
                             "end (the host queues the next step while the GPU runs one; a host sync inside the "
                             "step stops that)")
    parser.add_argument("--profile", default=None,
                        help="also profile 3 more steps of each (model, precision) with torch.profiler and write "
                             "the op tables (by device time and by host time) to this file")
    parser.add_argument("--loss", default="task", choices=["task", "eager", "compiled"],
                        help="the LM loss (the task's token_nll): task = as the CLI runs it (compiled with "
                             "--compile-blocks, like compile=true; eager without); eager / compiled force one")
    parser.add_argument("--baseline", nargs="*", default=[], metavar="JSON",
                        help="files an earlier run wrote with --json (same machine): their eager plain GPT-2 rows "
                             "are the baseline of this run's ratios when this run has none (e.g. it compiles)")
    args = parser.parse_args(argv)
    if args.warmup < 0 or args.steps < 1 or args.rounds < 1:
        parser.error("--warmup must be >= 0, --steps and --rounds >= 1")
    baseline_rows = []
    for path in args.baseline:
        try:
            with open(path) as handle:
                baseline_rows += json.load(handle)
        except (OSError, ValueError) as error:
            parser.error(f"--baseline {path}: {error} (give a file that bench_step.py --json wrote)")
    from experiment.models import compile_blocks, compile_settings

    compile_kwargs = compile_settings(args.compile_mode)
    compile_loss = args.loss == "compiled" or args.loss == "task" and args.compile_blocks
    loss_fn = compiled_token_nll() if compile_loss else token_nll

    device = torch.device(args.device)
    if args.models is None:
        args.models = list(MODELS)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but no CUDA GPU is visible; use --device cpu (with --tiny)")
    batch_size = args.batch_size or (2 if args.tiny else 8)
    seq_len = args.seq_len or (16 if args.tiny else 150)
    vocab_size = 1000 if args.tiny else 50257
    batches = make_batches(args.warmup + args.steps, batch_size, seq_len, vocab_size, args.seed, device)

    # Every (model, precision) pair is built and warmed up first; then `--rounds` rounds time `--steps` steps of
    # each pair in turn, so a drift of the machine (a shared, noisy host) spreads over all pairs alike.
    pairs = []
    for label in args.models:
        model_name, memory_name, overrides = MODELS[label]
        if args.tiny:
            model_name, memory_name = f"{model_name}_tiny", "tiny"
        for precision in args.precisions:
            baseline = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
            torch.manual_seed(args.seed)
            model = build(model_name, memory_name, overrides, vocab_size, device)
            if args.compile_blocks:
                compile_blocks(model, **compile_kwargs)
            optimizer = make_optimizer(model, args.optimizer)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            losses = []  # the warm-up steps' losses: a check that compiled / graphed variants train alike
            clock = PhaseClock(model, device) if args.phases else None
            times = time_steps(model, optimizer, batches, device, precision, args.warmup,
                               losses=losses, clock=clock, loss_fn=loss_fn)
            peak = (torch.cuda.max_memory_allocated(device) - baseline) / 2**30 if device.type == "cuda" else None
            config = " ".join([model_name, *overrides,
                               *(["compile=true"] if args.compile_blocks else []),
                               *([f"mode={args.compile_mode}"] if args.compile_blocks and args.compile_mode else []),
                               *(["loss=compiled"] if compile_loss else [])])
            pairs.append({"label": label, "precision": precision, "config": config, "model": model,
                          "optimizer": optimizer, "times": times, "peak": peak, "losses": losses[:args.warmup],
                          "clock": clock})
            # one line per pair as it is measured, so a run stopped at its time limit still reports something
            print(f"{label} {precision}: round 1 median {1e3 * statistics.median(times):.2f} ms/step", flush=True)
            if args.rounds == 1:
                finish_pair(pairs[-1], args, batches, device, loss_fn)
    for round_index in range(2, args.rounds + 1):
        for pair in pairs:
            pair["times"] += time_steps(pair["model"], pair["optimizer"], batches[args.warmup:], device,
                                        pair["precision"], warmup=0, reset=False, clock=pair["clock"],
                                        loss_fn=loss_fn)
            print(f"{pair['label']} {pair['precision']}: round {round_index} median "
                  f"{1e3 * statistics.median(pair['times'][-args.steps:]):.2f} ms/step", flush=True)
    if args.rounds > 1:
        for pair in pairs:
            finish_pair(pair, args, batches, device, loss_fn)

    rows = []
    for pair in pairs:
        times = pair["times"]
        rows.append({
            "model": pair["label"], "precision": pair["precision"], "config": pair["config"],
            "optimizer": args.optimizer,
            "loss": "compiled" if compile_loss else "eager",
            "device": str(device),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "batch_size": batch_size, "seq_len": seq_len, "warmup": args.warmup, "steps": args.steps,
            "rounds": args.rounds,
            "median_ms": 1e3 * statistics.median(times), "mean_ms": 1e3 * statistics.fmean(times),
            "min_ms": 1e3 * min(times),
            "round_medians_ms": [1e3 * statistics.median(times[i:i + args.steps])
                                 for i in range(0, len(times), args.steps)],
            "tokens_per_s": batch_size * seq_len / statistics.median(times),
            "peak_mem_gib": pair["peak"],
            "gflop_per_step": pair.get("gflop"),
            "warmup_losses": pair["losses"],
            "phases_ms": pair.get("phases"),
            "pipelined_ms": pair.get("pipelined_ms"),
        })

    plain = {r["precision"]: r["median_ms"] for r in rows if r["model"] == "gpt2"}
    plain_pipelined = {r["precision"]: r["pipelined_ms"] for r in rows if r["model"] == "gpt2"}
    for row in rows:
        row["x_plain"] = row["median_ms"] / plain[row["precision"]] if row["precision"] in plain else None
        pipelined, base = row["pipelined_ms"], plain_pipelined.get(row["precision"])
        row["x_plain_pipelined"] = pipelined / base if pipelined is not None and base else None
    print(format_table(rows, device, batch_size, seq_len))
    if args.phases:
        print(format_phases(rows, device))
    print(format_ratios(ratios(rows + baseline_rows)))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=2)
    return rows


def format_table(rows: list[dict], device: torch.device, batch_size: int, seq_len: int) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    header = ["model", "precision", "median ms", "mean ms", "min ms", "tokens/s", "x plain", "pipelined ms",
              "x plain pipelined", "peak GiB", "GFLOP/step", "x plain FLOPs"]
    plain_flops = {r["precision"]: r["gflop_per_step"] for r in rows if r["model"] == "gpt2"}
    body = []
    for r in rows:
        body.append([
            r["config"], r["precision"], f"{r['median_ms']:.1f}", f"{r['mean_ms']:.1f}", f"{r['min_ms']:.1f}",
            f"{r['tokens_per_s']:,.0f}", "-" if r["x_plain"] is None else f"{r['x_plain']:.2f}",
            "-" if r["pipelined_ms"] is None else f"{r['pipelined_ms']:.1f}",
            "-" if r["x_plain_pipelined"] is None else f"{r['x_plain_pipelined']:.2f}",
            "-" if r["peak_mem_gib"] is None else f"{r['peak_mem_gib']:.2f}",
            "-" if r["gflop_per_step"] is None else f"{r['gflop_per_step']:,.1f}",
            "-" if r["gflop_per_step"] is None or not plain_flops.get(r["precision"])
            else f"{r['gflop_per_step'] / plain_flops[r['precision']]:.3f}",
        ])
    widths = [max(len(h), *(len(line[i]) for line in body)) for i, h in enumerate(header)]
    lines = [f"one training step, batch {batch_size} x {seq_len} tokens, {name}",
             "| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(line, widths)) + " |" for line in body]
    return "\n".join(lines)


def _settings(config: str) -> str:
    """The compile settings of a row's config string (what follows the model and its overrides: "compile=true
    mode=... loss=compiled"), "" for an eager step."""
    words = config.split()
    starts = [i for i, word in enumerate(words) if word.startswith(("compile=", "loss="))]
    return " ".join(words[starts[0]:]) if starts else ""


def ratios(rows: list[dict]) -> list[dict]:
    """One entry per Memoria row: its median against the eager plain median of its precision (the first such row:
    this run's before any --baseline file's) and against the plain row with the same compile settings."""
    eager_plain, eager_plain_pipelined, plain_alike = {}, {}, {}
    for row in rows:
        if row["model"] != "gpt2":
            continue
        settings = _settings(row["config"])
        if not settings:  # nothing compiled, not even the loss
            eager_plain.setdefault(row["precision"], row["median_ms"])
            if row.get("pipelined_ms"):
                eager_plain_pipelined.setdefault(row["precision"], row["pipelined_ms"])
        plain_alike.setdefault((row["precision"], settings), row["median_ms"])
    out = []
    for row in rows:
        if row["model"] == "gpt2":
            continue
        settings = _settings(row["config"])
        eager = eager_plain.get(row["precision"])
        alike = plain_alike.get((row["precision"], settings))
        pipelined, eager_pipelined = row.get("pipelined_ms"), eager_plain_pipelined.get(row["precision"])
        out.append({
            "model": row["model"], "precision": row["precision"], "settings": settings or "eager",
            "median_ms": row["median_ms"],
            "plain_eager_ms": eager, "x_plain_eager": row["median_ms"] / eager if eager else None,
            "plain_alike_ms": alike, "x_plain_alike": row["median_ms"] / alike if alike else None,
            "pipelined_ms": pipelined,  # back to back, against the eager plain step run so
            "x_plain_eager_pipelined": pipelined / eager_pipelined if pipelined and eager_pipelined else None,
        })
    return out


def format_ratios(entries: list[dict]) -> str:
    def ms(value):
        return "-" if value is None else f"{value:.2f}"

    def times(value):
        return "-" if value is None else f"{value:.3f}x"

    lines = ["Memoria GPT-2 against plain GPT-2",
             "| Memoria GPT-2 | precision | settings | ms/step | plain eager ms | x plain eager | plain alike ms "
             f"| x plain alike | target <= {TARGET}x (fp32) | pipelined: ms/step, x plain eager |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for e in entries:
        verdict = ""
        if e["precision"] == "fp32" and e["x_plain_eager"] is not None:
            needs = TARGET * e["plain_eager_ms"]
            verdict = "met" if e["x_plain_eager"] <= TARGET else f"not met (needs <= {needs:.2f} ms)"
        lines.append(f"| {e['model']} | {e['precision']} | {e['settings']} | {ms(e['median_ms'])} | "
                     f"{ms(e['plain_eager_ms'])} | {times(e['x_plain_eager'])} | {ms(e['plain_alike_ms'])} | "
                     f"{times(e['x_plain_alike'])} | {verdict} | "
                     f"{ms(e['pipelined_ms'])}, {times(e['x_plain_eager_pipelined'])} |")
    if not any(e["plain_eager_ms"] for e in entries):
        lines.append("(no eager plain GPT-2 row: run with --models ... gpt2 without --compile-blocks, or give that "
                     "run's JSON as --baseline)")
    return "\n".join(lines)


def format_phases(rows: list[dict], device: torch.device) -> str:
    """Median ms of each phase (columns) per (model, precision) (rows)."""
    clock = "GPU time between CUDA events" if device.type == "cuda" else "wall time"
    lines = [f"phases of the step, median ms ({clock})",
             "| model | precision | " + " | ".join(PHASES) + " | sum |",
             "|---|---|" + "---|" * (len(PHASES) + 1)]
    for r in rows:
        phases = r["phases_ms"]
        cells = [f"{phases[name]:.2f}" for name in PHASES] + [f"{sum(phases.values()):.2f}"]
        lines.append(f"| {r['config']} | {r['precision']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
