"""Memoria GPT-2's training step against plain GPT-2's, across the JSON files of several `bench_step.py` runs.

`gpu_checks.sh` times the step in separate runs (graphed blocks, eager, autotuned GEMMs, ...), each writing its
rows with `--json`. The language-modelling issue's target compares Memoria GPT-2 with the plain step as users run
it (eager, plain ≈ 34 ms fp32 on an H100): this prints every Memoria row's median against the eager plain step of
the same precision (the eager run without compiled blocks), and against the plain model run alike (the same
compile settings), with the verdict on the target (≤ 1.3×, fp32). Use files from one machine and one call only.

    python scripts/step_ratios.py gpu_out/bench_step_reduce_overhead.json gpu_out/bench_step_fused.json
"""

from __future__ import annotations

import argparse
import json
import sys

TARGET = 1.3  # Memoria GPT-2's step at most 1.3x the plain step (issue 5), fp32


def _settings(config: str) -> str:
    """The compile/BLAS settings of a row's config string: what bench_step writes after the model and its
    overrides ("compile=true mode=... options={...} loss=compiled blas=..."), "" for an eager step with the
    default library."""
    words = config.split()
    starts = [i for i, word in enumerate(words) if word.startswith(("compile=", "loss=", "blas="))]
    return " ".join(words[starts[0]:]) if starts else ""


def ratios(rows: list[dict]) -> list[dict]:
    """One entry per Memoria row: its median, the eager plain median of its precision and the ratio, and the
    like-for-like plain median (same settings) and ratio where such a plain row exists."""
    eager_plain, eager_plain_pipelined, plain_alike = {}, {}, {}
    for row in rows:
        if row["model"] != "gpt2":
            continue
        settings = _settings(row["config"])
        if "compile=true" not in settings and "loss=compiled" not in settings:  # nothing compiled
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
            # steps back to back, one sync at the end (as a training loop runs them), against the eager plain
            # step run so: where the host's time per step no longer adds to the device's
            "pipelined_ms": pipelined,
            "x_plain_eager_pipelined": pipelined / eager_pipelined if pipelined and eager_pipelined else None,
        })
    return out


def format_ratios(entries: list[dict]) -> str:
    def ms(value):
        return "–" if value is None else f"{value:.2f}"

    def times(value):
        return "–" if value is None else f"{value:.3f}×"

    lines = ["| Memoria GPT-2 | precision | settings | ms/step | plain eager ms | × plain eager | plain alike ms "
             f"| × plain alike | target ≤ {TARGET}× (fp32) | pipelined: ms/step, × plain eager |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for e in entries:
        verdict = ""
        if e["precision"] == "fp32" and e["x_plain_eager"] is not None:
            needs = TARGET * e["plain_eager_ms"]
            verdict = "met" if e["x_plain_eager"] <= TARGET else f"not met (needs ≤ {needs:.2f} ms)"
        lines.append(f"| {e['model']} | {e['precision']} | {e['settings']} | {ms(e['median_ms'])} | "
                     f"{ms(e['plain_eager_ms'])} | {times(e['x_plain_eager'])} | {ms(e['plain_alike_ms'])} | "
                     f"{times(e['x_plain_alike'])} | {verdict} | "
                     f"{ms(e['pipelined_ms'])}, {times(e['x_plain_eager_pipelined'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+", help="JSON files written by bench_step.py --json")
    args = parser.parse_args(argv)
    rows = []
    for path in args.files:
        try:
            with open(path) as handle:
                rows += json.load(handle)
        except (OSError, ValueError) as error:  # a part that did not run (time limit) leaves no file
            print(f"skipping {path}: {error}", file=sys.stderr)
    entries = ratios(rows)
    if not any(e["plain_eager_ms"] for e in entries):
        print("no eager plain GPT-2 row in these files: run bench_step.py with --models ... gpt2 without "
              "--compile-blocks too", file=sys.stderr)
    print(format_ratios(entries))
    return entries


if __name__ == "__main__":
    main()
