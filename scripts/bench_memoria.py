"""Benchmark Memoria's bookkeeping: one step = add_working_memory + remind + adjust_lifespan_and_memories.

Measures the time per step and the peak memory of our implementation (`--impl ours`, the repository's `memoria/`)
and of the reference package memoria-pytorch (`--impl reference`, run with the reference venv's python, see
scripts/setup_reference_venv.sh) at the paper's three configurations (algorithm.md §f):

    lm       B 8,  H 768, W 50,  stm_capacity 400,  r_stm 50,  r_ltm 50,  depth 10, lambda0 9
    enwik8   B 8,  H 512, W 128, stm_capacity 1536, r_stm 192, r_ltm 192, depth 10, lambda0 9
    sort     B 32, H 512, W 128, stm_capacity 512,  r_stm 256, r_ltm 640, depth 10, lambda0 5

Inputs are random: working memory ~ N(0, 1) of shape (B, W, H), and lifespan deltas derived as a model would
(algorithm.md §e.1): attention probabilities = softmax of random logits over the valid reminded engrams,
delta = prob * M_valid * alpha (alpha = 8). The data come from a private generator, so both implementations see the
same inputs (the reference also draws from the global RNG for tie-breaks, defect D11).

Every (config, impl, device) runs in a fresh subprocess, which prints one JSON line. Peak memory:
- CUDA: torch.cuda.max_memory_allocated() over the warm-up and timed steps;
- CPU: the process's peak resident set size (resource.getrusage ru_maxrss). tracemalloc does not see torch's
  allocations. The RSS includes the interpreter and torch itself, so the RSS right after import (baseline) is
  reported too, and the table shows peak minus baseline.

Examples:
    python scripts/bench_memoria.py --configs lm --impl ours reference --warmup 100 --steps 30
    python scripts/bench_memoria.py --configs sort --batch-size 4 --steps 10 --device cpu
    python scripts/bench_memoria.py --configs lm enwik8 sort --device cuda --json bench.json
    python scripts/bench_memoria.py --impl ours --configs lm --device cpu --ltm-search hebbian random exhaustive
        (also random_matched)

`--ltm-search` times ours with each LTM search of the ablation (Memoria(ltm_search=...), experiments.md §e.5) and
reports how many LTM candidates each ranks per row and step ("LTMs scored", measured over 3 more steps).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_REFERENCE_PYTHON = os.path.join(REPO_ROOT, "refvenv", "bin", "python")
LIFESPAN_EXTEND_SCALE = 8.0

# The paper's configurations (algorithm.md §f, experiments.md §b.1).
CONFIGS = {
    "lm": {
        "batch_size": 8,
        "hidden": 768,
        "num_memories": 50,
        "stm_capacity": 400,
        "num_reminded_stm": 50,
        "num_final_ltms": 50,
        "ltm_search_depth": 10,
        "initial_lifespan": 9,
    },
    "enwik8": {
        "batch_size": 8,
        "hidden": 512,
        "num_memories": 128,
        "stm_capacity": 1536,
        "num_reminded_stm": 192,
        "num_final_ltms": 192,
        "ltm_search_depth": 10,
        "initial_lifespan": 9,
    },
    "sort": {
        "batch_size": 32,
        "hidden": 512,
        "num_memories": 128,
        "stm_capacity": 512,
        "num_reminded_stm": 256,
        "num_final_ltms": 640,
        "ltm_search_depth": 10,
        "initial_lifespan": 5,
    },
}


# ====================================================================== worker (one config, one impl, one device)
def import_memoria(impl: str):
    """Our memoria from the repository, or the reference from the running venv's site-packages."""
    if impl == "ours":
        sys.path.insert(0, REPO_ROOT)
    import memoria

    in_repo = os.path.abspath(memoria.__file__).startswith(os.path.join(REPO_ROOT, "memoria"))
    if (impl == "ours") != in_repo:
        raise SystemExit(
            f"--impl {impl} imported memoria from {memoria.__file__}; "
            "the reference must be run with the reference venv's python"
        )
    return memoria


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def engrams_per_row(memory, impl: str) -> float:
    """Mean live engrams per row (the view's non-NULL slots)."""
    engrams = memory.engrams
    if engrams.data.numel() == 0:
        return 0.0
    return float((engrams.engrams_types != 0).sum().item()) / engrams.data.shape[0]


# Calls that launch no kernel: views and metadata.
NO_KERNEL = {"view", "unsqueeze", "squeeze", "slice", "select", "expand", "expand_as", "alias", "reshape", "transpose",
             "t", "split", "narrow", "as_strided", "detach", "_unsafe_view", "lift_fresh", "result_type", "empty",
             "empty_like", "empty_strided", "contiguous", "is_nonzero", "item", "_local_scalar_dense", "resize_",
             "set_", "new_empty"}  # (the last two: Triton's interpreter handing tensors around)


def count_aten_calls(step, steps: int) -> dict:
    """Top-level aten calls per step (torch.profiler, host side): all, and those that are not views or metadata
    (each launches at least one kernel on a GPU)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    top = [e.name for e in prof.events() if e.name.startswith("aten::")
           and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))]
    compute = [name for name in top if name.removeprefix("aten::") not in NO_KERNEL]
    # the expensive kinds on a GPU (a radix sort or top-k costs 10-30 small kernels' time)
    heavy = {kind: sum(name in (f"aten::{kind}", f"aten::{kind}_") for name in top) / steps
             for kind in ("sort", "topk", "gather", "scatter", "scatter_add", "max", "cumsum", "baddbmm")}
    return {"all": len(top) / steps, "not_views": len(compute) / steps, "by_kind": heavy}


def count_ltm_candidates(memory, step, steps: int) -> float | None:
    """Ours: the mean number of LTM candidates remind ranks per row and step (the walk's found set F, the random
    search's draws, every LTM for the exhaustive search), over `steps` more steps: the valid entries of remind's
    second top-k (the first is the STM recall). None where the step is compiled or replayed (nothing to watch)."""
    if memory.compile or memory._graphs is not None or not memory.use_long_term:
        return None
    seen = []
    top = memory._top

    def watching_top(score, ok, tie, slots, k):
        seen.append(ok.sum(1).double().mean().item())
        return top(score, ok, tie, slots, k)

    memory._top = watching_top
    try:
        for _ in range(steps):
            step()
    finally:
        del memory._top  # back to the class's method
    per_step = seen[1::2]  # (STM recall, LTM selection) per remind
    return statistics.fmean(per_step) if per_step else None


def profile_kernels(step, sync, steps: int, path: str, title: str) -> None:
    """Append where the device time of `steps` more steps goes (torch.profiler; kernels replayed from CUDA
    graphs are listed too) to `path`: kernels per step, device time per step, and the op/kernel table."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA]
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        sync()
    kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
    device_us = sum(e.device_time_total for e in kernels)  # self time of each kernel / memcpy / memset
    with open(path, "a") as handle:
        handle.write(f"\n==== {title}: {len(kernels) / steps:.0f} device kernels and copies per step, "
                     f"{device_us / steps / 1e3:.3f} ms of device time per step\n")
        handle.write(prof.key_averages().table(sort_by="self_device_time_total", row_limit=40) + "\n")


def run_worker(args: argparse.Namespace) -> dict:
    if args.walk_kernel_off_gpu and args.device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: Triton kernels on CPU tensors
    import torch

    baseline_rss = peak_rss_mib()
    memoria = import_memoria(args.impl)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but CUDA is not available")
    torch.set_num_threads(args.threads) if args.threads else None
    cfg = dict(CONFIGS[args.config])
    if args.batch_size:
        cfg["batch_size"] = args.batch_size
    B, H, W = cfg["batch_size"], cfg["hidden"], cfg["num_memories"]
    kwargs = {
        "num_reminded_stm": cfg["num_reminded_stm"],
        "stm_capacity": cfg["stm_capacity"],
        "ltm_search_depth": cfg["ltm_search_depth"],
        "initial_lifespan": cfg["initial_lifespan"],
        "num_final_ltms": cfg["num_final_ltms"],
        "device": device,
    }
    ours_options = {}
    if args.impl == "ours":
        ours_options = {
            "weight_form": args.weight_form,
            "static_shape": args.static_shape,
            "validate": not args.no_validate,
        }
        if args.cuda_graph:
            ours_options["cuda_graph"] = True
        if args.compile:
            ours_options["compile"] = True
        if args.no_fused_walk:
            ours_options["fused_walk"] = False
        if args.ltm_capacity:
            ours_options["ltm_capacity"] = args.ltm_capacity
        if args.ltm_search != ["hebbian"]:
            ours_options["ltm_search"] = args.ltm_search[0]
        kwargs.update(ours_options)
    memory = memoria.Memoria(**kwargs)
    fused = args.add_and_remind and args.impl == "ours"  # (the reference has the two calls only)
    if fused:
        ours_options["add_and_remind"] = True
    if args.score_slots != "auto" and args.impl == "ours":  # remind's scoring forced (same rankings; speed)
        memory._score_every_slot = args.score_slots == "every"
        ours_options["score_slots"] = args.score_slots
    if args.sync_free_path:
        memory._force_sync_free = True  # the GPU's path (whole count rows, every hop) on any device
    if args.walk_kernel_off_gpu:
        memory._walk_kernel_off_gpu = True  # the Triton walk on the CPU (its interpreter: slow, to count calls)

    generator = torch.Generator(device=device).manual_seed(args.seed)
    import_rss = peak_rss_mib()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()

    def step() -> int:
        data = torch.randn(B, W, H, generator=generator, device=device)  # (B, W, H)
        if fused:  # one call, one device function (what the models do)
            _, indices = memory.add_and_remind(data)  # (B, M)
        else:
            memory.add_working_memory(data)
            _, indices = memory.remind()  # (B, M)
        valid = indices >= 0
        logits = torch.randn(indices.shape, generator=generator, device=device)
        probs = torch.softmax(logits.masked_fill(~valid, float("-inf")), dim=1).nan_to_num(
            0.0
        )  # rows with M_b = 0
        delta = probs * valid.sum(1, keepdim=True) * LIFESPAN_EXTEND_SCALE  # (B, M): ~alpha per engram
        memory.adjust_lifespan_and_memories(indices, delta)
        return indices.shape[1]

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    with torch.no_grad():
        for _ in range(args.warmup):
            step()
        sync()
        times, cpu_times, widths = [], [], []
        for _ in range(args.steps):
            start, cpu_start = time.perf_counter(), time.process_time()
            widths.append(step())
            sync()
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
        # Pipelined: the same number of steps with one synchronisation at the end, so the host queues step k+1
        # while the device runs step k (what a training loop sees when the memory makes no host sync).
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        sync()
        pipelined = (time.perf_counter() - start) / args.steps
        calls = count_aten_calls(step, 3) if args.count_ops else None
        engrams = engrams_per_row(memory, args.impl)  # (before the steps that count the LTMs scored)
        ltms_scored = count_ltm_candidates(memory, step, 3) if args.impl == "ours" else None
        if args.profile:
            try:
                profile_kernels(step, sync, 5, args.profile, f"{args.impl} {args.config} {device} {ours_options}")
            except Exception as error:  # a profiler failure must not cost the timings above
                print(f"profiling failed: {error!r}", file=sys.stderr)

    result = {
        "impl": args.impl,
        "config": args.config,
        "device": str(device),
        "batch_size": B,
        "warmup": args.warmup,
        "steps": args.steps,
        "threads": torch.get_num_threads(),
        "ms_median": 1000 * statistics.median(times),
        "ms_mean": 1000 * statistics.fmean(times),
        "ms_min": 1000 * min(times),
        "ms_max": 1000 * max(times),
        "ms_pipelined": 1000 * pipelined,
        # CPU time of this process (all its threads): on a shared machine it moves less than wall time.
        "cpu_ms_median": 1000 * statistics.median(cpu_times),
        "reminded_width_mean": statistics.fmean(widths),
        "engrams_per_row": engrams,
        "ltms_scored_per_row": ltms_scored,
        "torch": torch.__version__,
        "options": {k: str(v) for k, v in ours_options.items()},
        "aten_calls_per_step": calls,
    }
    if args.impl == "reference":
        import importlib.metadata

        result["reference_version"] = importlib.metadata.version("memoria-pytorch")
    if device.type == "cuda":
        result["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
        result["peak_kind"] = "cuda max_memory_allocated"
        result["gpu"] = torch.cuda.get_device_name()
    else:
        result["peak_mib"] = peak_rss_mib() - import_rss
        result["peak_kind"] = "peak RSS minus RSS after import"
        result["rss_peak_mib"] = peak_rss_mib()
        result["rss_after_import_mib"] = import_rss
        result["rss_after_torch_import_mib"] = baseline_rss
    return result


# ====================================================================== driver
def worker_command(args: argparse.Namespace, impl: str, config: str, device: str) -> list:
    if impl == "reference":
        python = args.reference_python
        if not os.path.exists(python):
            raise SystemExit(
                f"no reference venv at {python}: run scripts/setup_reference_venv.sh "
                "or pass --reference-python"
            )
    else:
        python = sys.executable
    command = [
        python,
        os.path.abspath(__file__),
        "--worker",
        "--impl",
        impl,
        "--configs",
        config,
        "--device",
        device,
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--seed",
        str(args.seed),
        "--weight-form",
        args.weight_form,
    ]
    for flag, value in (
        ("--batch-size", args.batch_size),
        ("--threads", args.threads),
        ("--ltm-capacity", args.ltm_capacity),
    ):
        if value:
            command += [flag, str(value)]
    if args.static_shape:
        command.append("--static-shape")
    if args.ltm_search != ["hebbian"]:
        command += ["--ltm-search", args.ltm_search[0]]
    if args.score_slots != "auto":
        command += ["--score-slots", args.score_slots]
    if args.profile:
        command += ["--profile", os.path.abspath(args.profile)]
    for flag in ("no_validate", "cuda_graph", "compile", "no_fused_walk", "count_ops", "sync_free_path",
                 "walk_kernel_off_gpu", "add_and_remind"):
        if getattr(args, flag):
            command.append("--" + flag.replace("_", "-"))
    return command


def run_one(args: argparse.Namespace, impl: str, config: str, device: str) -> dict:
    command = worker_command(args, impl, config, device)
    # Run outside the repository so the reference's `import memoria` cannot pick up the repository's package.
    try:
        completed = subprocess.run(
            command, check=False, capture_output=True, text=True, cwd="/", timeout=args.timeout
        )
    except subprocess.TimeoutExpired:
        return {
            "impl": impl,
            "config": config,
            "device": device,
            "error": f"over --timeout {args.timeout:g} s",
        }
    if completed.returncode != 0:
        return {
            "impl": impl,
            "config": config,
            "device": device,
            "error": (completed.stderr.strip().splitlines() or [f"exit code {completed.returncode}"])[-1],
        }
    return json.loads(completed.stdout.strip().splitlines()[-1])


def machine_description() -> dict:
    """CPU model, core count and load, for the record (Linux)."""
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as file:
            cpu = next(line.split(":", 1)[1].strip() for line in file if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"cpu": cpu, "cores": os.cpu_count(), "load_average_at_start": load}


def cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def format_table(results: list) -> str:
    lines = [
        (
            "| config | device | B | impl | steps (warm-up) | ms/step median (mean) | pipelined ms/step | "
            "CPU ms/step | engrams/row | LTMs scored/row | peak MiB | ref/ours time (CPU time) | ref/ours memory | "
            "aten calls/step (not views) |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    # the pairs compared: ours with the walk (the default search), and the reference
    by_key = {(r["config"], r["device"], r["impl"]): r for r in results
              if r.get("options", {}).get("ltm_search", "hebbian") == "hebbian"}
    for r in results:
        if "error" in r:
            lines.append(
                f"| {r['config']} | {r['device']} | | {r['impl']} | failed: {r['error']} | | | | | | | | | |"
            )
            continue
        ratio_t = ratio_m = ""
        ours, ref = (
            by_key.get((r["config"], r["device"], "ours")),
            by_key.get((r["config"], r["device"], "reference")),
        )
        if r["impl"] == "reference" and ours and ref and "error" not in ours:
            ratio_t = (
                f"{ref['ms_median'] / ours['ms_median']:.1f}x "
                f"({ref['cpu_ms_median'] / max(ours['cpu_ms_median'], 1e-9):.1f}x)"
            )
            ratio_m = f"{ref['peak_mib'] / max(ours['peak_mib'], 1e-9):.1f}x"
        counted = r.get("aten_calls_per_step")
        calls = f"{counted['all']:.0f} ({counted['not_views']:.0f})" if counted else ""
        scored = "" if r.get("ltms_scored_per_row") is None else f"{r['ltms_scored_per_row']:.0f}"
        impl = r["impl"] if r["impl"] == "ours" else f"reference {r.get('reference_version', '')}"
        if r["impl"] == "ours" and r["options"]:
            impl += " (" + ", ".join(f"{k}={v}" for k, v in r["options"].items()) + ")"
        lines.append(
            f"| {r['config']} | {r['device']} | {r['batch_size']} | {impl} | {r['steps']} ({r['warmup']}) | "
            f"{r['ms_median']:.2f} ({r['ms_mean']:.2f}) | {r.get('ms_pipelined', float('nan')):.2f} | "
            f"{r['cpu_ms_median']:.2f} | {r['engrams_per_row']:.0f} | {scored} | "
            f"{r['peak_mib']:.0f} | "
            f"{ratio_t} | {ratio_m} | {calls} |"
        )
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    parser.add_argument("--impl", nargs="+", choices=["ours", "reference"], default=["ours", "reference"])
    parser.add_argument("--configs", nargs="+", choices=sorted(CONFIGS), default=["lm"])
    parser.add_argument(
        "--device",
        nargs="+",
        choices=["cpu", "cuda"],
        default=None,
        help="default: cpu, plus cuda when available",
    )
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument(
        "--warmup",
        type=int,
        default=50,
        help="untimed steps first: the store grows for about lambda0 + stm_capacity / W steps",
    )
    parser.add_argument("--batch-size", type=int, default=None, help="override every config's batch size")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in the workers")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--weight-form",
        choices=["exp", "neg_sq"],
        default="exp",
        help="ours only (the reference 1.1.0 always uses neg_sq, 1.0.0 exp)",
    )
    parser.add_argument("--static-shape", action="store_true", help="ours: full-width remind output")
    parser.add_argument("--no-validate", action="store_true", help="ours: skip the value checks (host syncs)")
    parser.add_argument("--cuda-graph", action="store_true",
                        help="ours: replay the step as CUDA graphs (needs --static-shape --no-validate)")
    parser.add_argument("--count-ops", action="store_true",
                        help="also count the top-level aten calls per step (torch.profiler)")
    parser.add_argument("--sync-free-path", action="store_true",
                        help="ours: take the GPU's sync-free path on any device (to count its calls on a CPU)")
    parser.add_argument("--walk-kernel-off-gpu", action="store_true",
                        help="ours, with --sync-free-path: the Triton walk kernel on the CPU, in Triton's "
                             "interpreter (to count the GPU path's calls on a CPU; slow)")
    parser.add_argument("--compile", action="store_true",
                        help="ours: torch.compile the step (needs --static-shape --no-validate; longer warm-up)")
    parser.add_argument("--no-fused-walk", action="store_true",
                        help="ours: the graph walk in torch ops instead of one Triton kernel (GPUs)")
    parser.add_argument(
        "--ltm-capacity", type=int, default=None, help="ours: cap the LTM (default unbounded)"
    )
    parser.add_argument("--add-and-remind", action="store_true",
                        help="ours: add the working memory and remind in one call (Memoria.add_and_remind: one "
                             "device function, one CUDA graph; what the models do)")
    parser.add_argument("--score-slots", choices=["auto", "every", "candidates"], default="auto",
                        help="ours: remind scores every slot of the store once (every) or gathers and scores the "
                             "candidates (candidates); auto = by the store's size (Memoria._scores_every_slot)")
    parser.add_argument("--profile", default=None,
                        help="also profile 5 more steps (torch.profiler, device kernels included) and append the "
                             "kernel table to this file")
    parser.add_argument("--ltm-search", nargs="+", choices=["hebbian", "random", "random_matched", "exhaustive"],
                        default=["hebbian"],
                        help="ours: time each LTM search of the ablation (Memoria(ltm_search=...)); the reference "
                             "runs the walk only")
    parser.add_argument("--reference-python", default=DEFAULT_REFERENCE_PYTHON)
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per worker")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("steps", "warmup"):
        if getattr(args, name) < (1 if name == "steps" else 0):
            parser.error(f"--{name} must be {'positive' if name == 'steps' else 'non-negative'}")
    if args.batch_size is not None and args.batch_size < 1:
        parser.error("--batch-size must be positive")
    if args.ltm_search != ["hebbian"] and "reference" in args.impl:
        parser.error("--ltm-search other than hebbian is ours only: pass --impl ours")
    if len(set(args.ltm_search)) != len(args.ltm_search):
        parser.error("--ltm-search lists a search twice")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        args.impl, args.config = args.impl[0], args.configs[0]
        args.device = args.device[0] if args.device else "cpu"
        print(json.dumps(run_worker(args)))
        return
    devices = args.device or (["cpu", "cuda"] if cuda_available() else ["cpu"])
    machine = machine_description()
    print(json.dumps(machine), file=sys.stderr, flush=True)
    results = []
    for config in args.configs:
        for device in devices:
            for impl in args.impl:
                for search in args.ltm_search:
                    result = run_one(argparse.Namespace(**{**vars(args), "ltm_search": [search]}), impl, config,
                                     device)
                    results.append(result)
                    print(json.dumps(result), file=sys.stderr, flush=True)
    print(format_table(results))
    if args.json:
        with open(args.json, "w") as file:
            json.dump({"argv": sys.argv[1:], "machine": machine, "results": results}, file, indent=1)


if __name__ == "__main__":
    main()
