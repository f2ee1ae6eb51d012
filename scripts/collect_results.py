"""Collect finished runs into one Markdown table: every `results.json` under the given folders (default `outputs`
and `multirun`), with the setting read from the `config_resolved.yaml` beside it.

    python scripts/collect_results.py                       # everything under outputs/ and multirun/
    python scripts/collect_results.py multirun/sorting-*    # one sweep
    python scripts/collect_results.py --json all.json       # also the rows as JSON

Columns: task, model, setting (sorting: L and segment; language modelling: segment length and lanes), seed,
optimizer steps, the headline test metric (sorting: acc-final; WikiText-103 / PG-19: ppl, and the reference's mean
of per-batch perplexities beside it; enwik8: bpc), the best validation score, wall time and the run folder. Runs
with several seeds are not averaged here: the rows are sorted so that they stand together.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

HEADLINE = {  # task name -> test metrics to show, in order
    "sorting": ["test/acc-final"],
    "wikitext103": ["test/ppl", "test/ppl_mean_of_batches"],
    "pg19": ["test/ppl", "test/ppl_mean_of_batches"],
    "enwik8": ["test/bpc"],
}


def setting(task: str, config: dict) -> str:
    task_cfg = config.get("task", {})
    data, module = task_cfg.get("data", {}), task_cfg.get("module", {})
    if task == "sorting":
        return f"L {data.get('length')}, segment {module.get('segment_size')}"
    return f"segment {data.get('segment_length')}, {data.get('lanes')} lanes"


def read_run(results_path: Path) -> dict:
    results = json.loads(results_path.read_text())
    config_path = results_path.parent / "config_resolved.yaml"
    config = yaml.safe_load(config_path.read_text()) if config_path.is_file() else {}
    task = results.get("task", "?")
    metrics = results.get("test") or {}
    return {
        "task": task,
        "model": results.get("model", "?"),
        "setting": setting(task, config or {}),
        "seed": results.get("seed"),
        "mode": results.get("mode"),
        "steps": results.get("global_step"),
        "test": {key: metrics[key] for key in HEADLINE.get(task, sorted(metrics)) if key in metrics},
        "monitor": results.get("monitor"),
        "best": results.get("best_score"),
        "wall_time_s": results.get("wall_time_s"),
        "run_dir": str(results_path.parent),
    }


def format_value(key: str, value) -> str:
    if value is None:
        return "—"
    if "acc" in key:
        return f"{100 * value:.2f}%"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def format_table(rows: list[dict]) -> str:
    lines = [
        "| task | model | setting | seed | steps | test | best val | wall time | run |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        test = ", ".join(f"{key.removeprefix('test/')} {format_value(key, v)}" for key, v in row["test"].items())
        best = f"{row['monitor']} {format_value(row['monitor'] or '', row['best'])}" if row["best"] is not None else "—"
        wall = f"{row['wall_time_s']:.0f} s" if row["wall_time_s"] is not None else "—"
        lines.append(
            f"| {row['task']} | {row['model']} | {row['setting']} | {row['seed']} | {row['steps']} | {test or '—'} | "
            f"{best} | {wall} | {row['run_dir']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folders", nargs="*", default=["outputs", "multirun"])
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    paths = sorted({p for folder in args.folders for p in Path(folder).rglob("results.json")})
    if not paths:
        print(f"no results.json under {', '.join(args.folders)}: finished runs write one in their run folder",
              file=sys.stderr)
        return []
    rows = []
    for path in paths:
        try:
            rows.append(read_run(path))
        except (OSError, ValueError, yaml.YAMLError) as error:
            print(f"skipped {path}: {error}", file=sys.stderr)
    rows.sort(key=lambda r: (r["task"], r["setting"], r["model"], str(r["seed"])))
    print(format_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
