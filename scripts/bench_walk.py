#!/usr/bin/env python
"""Time remind's graph walk alone on a GPU: the torch ops (what runs without Triton) against the Triton kernels of
memoria/kernels.py — mode "rows" (one launch, a program per batch row) at several tile sizes and warp counts, mode
"hops" (a launch per hop, programs over blocks of chains) at several chains per program — all replayed as CUDA
graphs (as the models run the step), at the sizes of the paper's three configurations. Checks that every variant
gives the torch walk's result. The defaults in memoria/kernels.py (_MODE, _TILE, _NUM_WARPS, _HOP_CHAINS) should
be the fastest row here (or MEMORIA_WALK, which the script prints, set in the environment).

    python scripts/bench_walk.py                       # lm enwik8 sort, the default sweep
    python scripts/bench_walk.py --configs lm --tiles 4096 --warps 8 --hop-chains 4 --json walk.json
    TRITON_INTERPRET=1 python scripts/bench_walk.py --smoke  # the script's own check on a CPU (tiny, untimed)

The walk's cost does not depend on the counts' values (every hop reads whole count rows, stopped chains read the
all-zero sink row), so the inputs are random: sparse counts, 70% of the slots long-term, a few chains without a seed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from memoria import Memoria, kernels  # noqa: E402

# batch, store capacity (slots per row; about what the stores reach in bench_memoria), chains (num_reminded_stm),
# hops (ltm_search_depth + 1)
CONFIGS = {
    "lm": (8, 1024, 50, 11),
    "enwik8": (8, 2560, 192, 11),
    "sort": (32, 4096, 256, 11),
    "smoke": (2, 40, 6, 4),  # --smoke: a CPU run of the script through Triton's interpreter
}


def inputs(B: int, C: int, R: int, device: torch.device, seed: int = 0):
    g = torch.Generator(device=device).manual_seed(seed)
    counts = torch.randint(0, 5, (B, C + 1, C), generator=g, device=device, dtype=torch.int32)
    counts *= torch.rand(B, C + 1, C, generator=g, device=device) < 0.05
    counts[:, C] = 0
    is_ltm = torch.rand(B, C, generator=g, device=device) < 0.7
    open_ = torch.full((B, C + 1), -math.inf, dtype=torch.float64, device=device)
    open_[:, :C] = torch.where(is_ltm, torch.rand(B, C, generator=g, device=device, dtype=torch.float64) * 0.49,
                               -math.inf)
    src = torch.randint(0, C, (B, R), generator=g, device=device)
    src[:, -3:] = C  # chains without a seed
    return counts, src, open_


def time_graphed(fn, open_init: torch.Tensor, replays: int) -> tuple[float, torch.Tensor]:
    """fn(open_) captured (after a warm-up) with a reset of open_ in front; ms per replay (median of 5 rounds).
    Off a GPU (--smoke) one eager call, timed by the clock."""
    open_ = open_init.clone()
    if not open_.is_cuda:
        start = time.perf_counter()
        fn(open_)
        return 1e3 * (time.perf_counter() - start), open_
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm-up (Triton compiles here)
            open_.copy_(open_init)
            fn(open_)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        open_.copy_(open_init)
        fn(open_)
    rounds = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        rounds.append(start.elapsed_time(end) / replays)
    return sorted(rounds)[len(rounds) // 2], open_.clone()


def fastest_setting(results: list[dict], configs: list[str]) -> str | None:
    """The kernel variant with the smallest geometric mean time over `configs` (only variants that ran and matched
    the torch walk at every one), as a MEMORIA_WALK value."""
    keys = ("mode", "tile", "num_warps", "hop_chains")
    times: dict[tuple, dict[str, float]] = {}
    for r in results:
        if "mode" in r and r["same"]:
            times.setdefault(tuple((k, r[k]) for k in keys if k in r), {})[r["config"]] = r["us"]
    complete = {v: t for v, t in times.items() if set(t) == set(configs)}
    if not complete:
        return None
    best = min(complete, key=lambda v: sum(math.log(us) for us in complete[v].values()))
    return ",".join(f"{k}={value}" for k, value in best)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", choices=sorted(CONFIGS), default=["lm", "enwik8", "sort"])
    parser.add_argument("--tiles", nargs="+", type=int, default=[2048, 4096, 8192])
    parser.add_argument("--warps", nargs="+", type=int, default=[4, 8, 16])
    parser.add_argument("--hop-chains", nargs="+", type=int, default=[2, 4, 8, 16],
                        help='chains per program in mode "hops" (at tile 4096, warps 4 and 8)')
    parser.add_argument("--replays", type=int, default=50)
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--best-to", help="write the fastest variant here, as a MEMORIA_WALK value")
    parser.add_argument("--smoke", action="store_true",
                        help="a tiny CPU run of the script itself (needs TRITON_INTERPRET=1; times mean nothing)")
    args = parser.parse_args(argv)
    if args.smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":
            print("--smoke runs the kernel in Triton's interpreter: set TRITON_INTERPRET=1")
            return 1
        args.configs, args.tiles, args.warps, args.hop_chains, args.replays = ["smoke"], [64], [4], [2], 1
        device = torch.device("cpu")
    elif not torch.cuda.is_available():
        print("bench_walk.py needs a CUDA GPU (the kernel's CPU check is tests/memoria/test_kernels.py; "
              "TRITON_INTERPRET=1 ... --smoke checks this script on a CPU)")
        return 1
    else:
        device = torch.device("cuda")
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (Triton's interpreter)"
    print(f"{device_name} | torch {torch.__version__} | triton {kernels.triton.__version__}")
    results = []
    for name in args.configs:
        B, C, R, hops = CONFIGS[name]
        counts, src, open_init = inputs(B, C, R, device)
        base_ms, want = time_graphed(lambda o: Memoria._torch_walk(counts, src, o, hops), open_init, args.replays)
        how = "graphed" if device.type == "cuda" else "eager, interpreted"
        print(f"{name} (B {B}, C {C}, chains {R}, hops {hops}): torch walk, {how} {base_ms * 1000:8.1f} us")
        results.append({"config": name, "variant": "torch", "us": base_ms * 1000})
        variants = [dict(mode="rows", tile=t, num_warps=w) for t in args.tiles for w in args.warps]
        variants += [dict(mode="hops", tile=4096, num_warps=w, hop_chains=c) for c in args.hop_chains
                     for w in ((4, 8) if not args.smoke else (4,))]
        for variant in variants:
            label = " ".join(f"{k.replace('num_', '')} {v}" for k, v in variant.items())
            try:
                ms, got = time_graphed(lambda o, v=variant: kernels.walk(counts, src, o, hops, **v), open_init,
                                       args.replays)
            except Exception as error:  # noqa: BLE001  (a variant that does not build: report, go on)
                print(f"  {label:42s} failed ({type(error).__name__}: {str(error)[:200]})")
                continue
            same = torch.equal(got, want)
            print(f"  {label:42s} {ms * 1000:8.1f} us  ({base_ms / ms:4.1f}x)"
                  f"{'' if same else '  RESULT DIFFERS FROM THE TORCH WALK'}")
            results.append({"config": name, **variant, "us": ms * 1000, "same": same})
        default_ms, _ = time_graphed(lambda o: kernels.walk(counts, src, o, hops), open_init, args.replays)
        print(f"  {'defaults of memoria/kernels.py':42s} {default_ms * 1000:8.1f} us  ({base_ms / default_ms:4.1f}x)")
        results.append({"config": name, "variant": "defaults", "us": default_ms * 1000})
    best = fastest_setting(results, args.configs)
    if best:
        print(f"fastest over {' '.join(args.configs)} (geometric mean): MEMORIA_WALK={best}")
        if args.best_to:
            Path(args.best_to).write_text(best + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": device_name, "results": results, "fastest": best},
                                              indent=1))
    return 0 if all(r.get("same", True) for r in results) else 2


if __name__ == "__main__":
    sys.exit(main())
