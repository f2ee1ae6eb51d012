"""Time the GEMMs of one training step, shape by shape, under each BLAS library: where Memoria GPT-2's step loses
efficiency against plain GPT-2's, and whether another library would win it back.

In float32 (the paper's precision, and the step that issue 5 measures) most of Memoria GPT-2's extra time is GEMMs:
its memory paths add per block two query and two output projections (1,200 x 768 x 768 at the WikiText-103 shape)
and their gradients, GEMMs that fill a fraction of a large GPU's waves. This script records every GEMM call (mm,
addmm, bmm, baddbmm: shapes, strides, dtype) of one warm training step of each model, eagerly (compiled blocks call
the same GEMMs), then times each distinct call alone with CUDA events, under cuBLAS and under cuBLASLt
(`torch.backends.cuda.preferred_blas_library`), TF32 off, and optionally with TF32 on (`--tf32`: a change of
precision, for reference only). It prints per model the GEMM time of a step under each setting, and the shapes
that take the most time with their rates.

`--transposed` also times each 2-D product C = A @ B (mm, addmm) the other way round, Cᵀ = Bᵀ @ Aᵀ as an mm
(under the first setting; an addmm's bias left out): the same products, but the BLAS library sees the problem with
M and N swapped and may pick other kernels and tiles (a 1,200 x 768 output is only a few dozen large tiles for a
132-SM H100). A model can compute a product that way for free where its consumer copies the result anyway (a query
projection laid out heads-major) or where it owns the weight's layout. `--split-k 2 4` times each such product
as 2 (4) products over slices of its reduction, one batched GEMM summed: more output tiles per launch.

Examples:
    python scripts/bench_gemm.py                                   # GPU: both models, cuBLAS against cuBLASLt
    python scripts/bench_gemm.py --tf32 --json bench_gemm.json
    python scripts/bench_gemm.py --transposed --split-k 2 4        # ... and every 2-D product the other way round,
                                                                   # and split over its reduction
    python scripts/bench_gemm.py --tiny --device cpu               # CPU smoke run (one library)
Record results in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from collections import Counter

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)
sys.path.insert(0, os.path.join(REPO_ROOT, "scripts"))

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

GEMMS = {
    torch.ops.aten.mm.default: "mm",
    torch.ops.aten.addmm.default: "addmm",
    torch.ops.aten.bmm.default: "bmm",
    torch.ops.aten.baddbmm.default: "baddbmm",
}


class GemmRecorder(TorchDispatchMode):
    """Counts the GEMM calls that pass through the dispatcher, by (op, each tensor's shape and strides, dtype,
    scalar arguments)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in GEMMS:
            tensors = tuple((tuple(a.shape), tuple(a.stride())) for a in args if isinstance(a, torch.Tensor))
            dtype = next(a.dtype for a in args if isinstance(a, torch.Tensor))
            scalars = tuple(sorted((k, float(v)) for k, v in kwargs.items() if isinstance(v, (int, float))))
            self.calls[(GEMMS[func], tensors, str(dtype).replace("torch.", ""), scalars)] += 1
        return func(*args, **kwargs)


def flops_of(signature) -> float:
    """2 x batch x M x K x N of one call."""
    from bench_step import gemm_flops

    name, tensors, _, _ = signature
    return gemm_flops(f"aten::{name}", [shape for shape, _ in tensors])


def describe(signature) -> str:
    name, tensors, dtype, scalars = signature
    operands = tensors[1:] if name in ("addmm", "baddbmm") else tensors
    parts = []
    for shape, stride in operands:
        transposed = len(shape) >= 2 and stride[-1] != 1 and stride[-2] == 1
        parts.append("x".join(map(str, shape)) + ("ᵀ" if transposed else "") + (" (bcast)" if 0 in stride else ""))
    extra = "".join(f" {k}={v:g}" for k, v in scalars)
    return f"{name} {' @ '.join(parts)} {dtype}{extra}"


def make_inputs(signature, device: torch.device, generator: torch.Generator) -> list[torch.Tensor]:
    _, tensors, dtype, _ = signature
    out = []
    for shape, stride in tensors:
        extent = 1 + sum((s - 1) * st for s, st in zip(shape, stride))  # storage the strides reach
        storage = torch.randn(extent, generator=generator).to(device=device, dtype=getattr(torch, dtype))
        out.append(storage.as_strided(shape, stride))
    return out


def run_call(signature, inputs: list[torch.Tensor]) -> torch.Tensor:
    name, _, _, scalars = signature
    return getattr(torch, name)(*inputs, **dict(scalars))


def transposed_call(signature, inputs: list[torch.Tensor]):
    """(signature, inputs) of the same 2-D product computed the other way round, Cᵀ = Bᵀ @ Aᵀ, as an mm (an addmm's
    bias left to the consumer, where compiled code adds it in a kernel it runs anyway); None for batched
    products."""
    name, _, dtype, _ = signature
    if name not in ("mm", "addmm"):
        return None
    a, b = inputs[-2:]
    args = [b.t(), a.t()]
    return ("mm", tuple((tuple(t.shape), tuple(t.stride())) for t in args), dtype, ()), args


def split_k_call(signature, inputs: list[torch.Tensor], parts: int):
    """The same 2-D product C = A @ B as `parts` products over slices of the reduction, one batched GEMM, summed
    (a manual split-K: `parts` times the output tiles per launch, for a GPU that a small output leaves mostly idle;
    the sum is a kernel of its own here, fused into the consumer in compiled code). A callable, or None (batched
    products, a reduction `parts` does not divide)."""
    if signature[0] not in ("mm", "addmm"):
        return None
    a, b = inputs[-2:]
    (M, K), N = a.shape, b.shape[1]
    if K % parts:
        return None
    k = K // parts
    a_parts = a.as_strided((parts, M, k), (k * a.stride(1), a.stride(0), a.stride(1)))  # (parts, M, K/parts) views
    b_parts = b.as_strided((parts, k, N), (k * b.stride(0), b.stride(0), b.stride(1)))  # (parts, K/parts, N)
    return lambda: torch.bmm(a_parts, b_parts).sum(0)


def time_fn(fn, device: torch.device, reps: int, rounds: int) -> float:
    """Median microseconds of one `fn()` (CUDA events around `reps` calls, `rounds` times; wall time on a CPU)."""
    for _ in range(3):
        fn()
    samples = []
    for _ in range(rounds):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(reps):
                fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) * 1e3 / reps)
        else:
            t0 = time.perf_counter()
            for _ in range(reps):
                fn()
            samples.append((time.perf_counter() - t0) * 1e6 / reps)
    return statistics.median(samples)


def time_call(signature, inputs, device: torch.device, reps: int, rounds: int) -> float:
    """Median microseconds of one recorded call (`time_fn`)."""
    return time_fn(lambda: run_call(signature, inputs), device, reps, rounds)


@contextlib.contextmanager
def blas_setting(device: torch.device, library: str, tf32: bool):
    """cuBLAS or cuBLASLt, TF32 on or off, for the block (restored after)."""
    if device.type != "cuda":
        yield
        return
    old_library = torch.backends.cuda.preferred_blas_library()
    old_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.preferred_blas_library(library)
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        yield
    finally:
        torch.backends.cuda.preferred_blas_library(old_library)
        torch.backends.cuda.matmul.allow_tf32 = old_tf32


def record_step(label: str, tiny: bool, device: torch.device, precision: str, seed: int) -> Counter:
    """The GEMM calls of one training step of `label` (a bench_step model), after four warm-up steps (the memory
    paths start at the second segment; on a GPU the memory step is then warmed up, captured and replayed as CUDA
    graphs, whose GEMMs the recording does not see: it sees the model's)."""
    import bench_step

    model_name, memory_name, overrides = bench_step.MODELS[label]
    if tiny:
        model_name, memory_name = f"{model_name}_tiny", "tiny"
    batch, seq, vocab = (2, 16, 1000) if tiny else (8, 150, 50257)
    torch.manual_seed(seed)
    model = bench_step.build(model_name, memory_name, overrides, vocab, device)
    optimizer = bench_step.make_optimizer(model, "task")
    batches = bench_step.make_batches(5, batch, seq, vocab, seed, device)
    autocast = bench_step.autocast_for(device, precision)
    model.train()
    for step_batch in batches[:-1]:
        bench_step.train_step(model, optimizer, step_batch, autocast)
    recorder = GemmRecorder()
    with recorder:
        bench_step.train_step(model, optimizer, batches[-1], autocast)
    return recorder.calls


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", nargs="+", default=["memoria_gpt2", "gpt2"], choices=["memoria_gpt2", "gpt2"])
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--tiny", action="store_true", help="tiny models and shapes (CPU smoke run)")
    parser.add_argument("--tf32", action="store_true", help="also time with TF32 on (reference only)")
    parser.add_argument("--transposed", action="store_true",
                        help="also time every 2-D product the other way round, Cᵀ = Bᵀ @ Aᵀ (first setting only)")
    parser.add_argument("--split-k", type=int, nargs="+", default=[], metavar="PARTS",
                        help="also time every 2-D product as PARTS products over slices of its reduction, one "
                             "batched GEMM summed (first setting only)")
    parser.add_argument("--reps", type=int, default=20, help="calls per timing")
    parser.add_argument("--rounds", type=int, default=5, help="timings per call and setting (median)")
    parser.add_argument("--top", type=int, default=12, help="shapes listed per model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    settings = [("cublas", False), ("cublaslt", False)] if device.type == "cuda" else [("default", False)]
    if args.tf32 and device.type == "cuda":
        settings += [("cublas", True), ("cublaslt", True)]

    recorded = {label: record_step(label, args.tiny, device, args.precision, args.seed) for label in args.models}
    generator = torch.Generator().manual_seed(args.seed)
    times: dict = {}  # signature -> {setting: us}
    for signature in sorted({s for calls in recorded.values() for s in calls}, key=str):
        inputs = make_inputs(signature, device, generator)
        times[signature] = {}
        for library, tf32 in settings:
            with blas_setting(device, library, tf32):
                times[signature][f"{library}{'+tf32' if tf32 else ''}"] = time_call(
                    signature, inputs, device, args.reps, args.rounds)
    names = list(next(iter(times.values())).keys()) if times else []
    variants = (["transposed"] if args.transposed else []) + [f"split-K {parts}" for parts in args.split_k]
    if variants:  # each variant under the first setting (the call as recorded where one does not apply); then
        library, tf32 = settings[0]  # "best" = the fastest of them and the recorded call, per call
        for signature in times:
            inputs = make_inputs(signature, device, generator)
            for variant in variants:
                if variant == "transposed":
                    flipped = transposed_call(signature, inputs)
                    fn = flipped and (lambda flipped=flipped: run_call(*flipped))
                else:
                    fn = split_k_call(signature, inputs, int(variant.split()[-1]))
                with blas_setting(device, library, tf32):
                    us = time_fn(fn, device, args.reps, args.rounds) if fn else times[signature][names[0]]
                times[signature][variant] = us
            times[signature]["best"] = min(times[signature][n] for n in [names[0], *variants])
        names += [*variants, "best"]

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"GEMMs of one training step, each timed alone ({where}, {args.precision}; median us of {args.rounds} x "
          f"{args.reps} calls)")
    result = {"device": where, "precision": args.precision, "settings": names, "models": {}}
    print("| model | GEMM calls | GFLOP | " + " | ".join(f"{n} ms/step" for n in names) + " |")
    print("|---|---|---|" + "---|" * len(names))
    for label, calls in recorded.items():
        total_ms = {n: sum(count * times[s][n] for s, count in calls.items()) / 1e3 for n in names}
        gflop = sum(count * flops_of(s) for s, count in calls.items()) / 1e9
        print(f"| {label} | {sum(calls.values())} | {gflop:.1f} | "
              + " | ".join(f"{total_ms[n]:.2f}" for n in names) + " |")
        result["models"][label] = {
            "calls": sum(calls.values()), "gflop": gflop, "ms_per_step": total_ms,
            "shapes": [{"gemm": describe(s), "calls": count, "us": times[s], "gflop": flops_of(s) / 1e9}
                       for s, count in calls.items()],
        }
    for label, calls in recorded.items():
        first = names[0]
        ranked = sorted(calls.items(), key=lambda item: -item[1] * times[item[0]][first])
        print(f"\n{label}: the shapes taking the most time under {first} (us per call; TFLOP/s)")
        for signature, count in ranked[:args.top]:
            rates = " ".join(f"{n} {times[signature][n]:7.1f} ({flops_of(signature) / times[signature][n] / 1e6:5.1f})"
                             for n in names)
            print(f"  {count:3d} x {describe(signature)}: {rates}")
    if args.json:
        with open(args.json, "w") as file:
            json.dump(result, file, indent=1)
    return result


if __name__ == "__main__":
    main()
