"""The results report: every run under the given folders (default `outputs` and `multirun`) into
`results/report.md` with its figures in `results/figures/`, and the table of finished runs on stdout.

    python scripts/collect_results.py                       # what `make results` runs
    python scripts/collect_results.py multirun/sorting-*    # one sweep
    python scripts/collect_results.py --out docs/report --json all.json

A run is a folder with `config_resolved.yaml` (written when the run starts) or Hydra's `.hydra/` (written before
it); it is finished when it holds `results.json` whose `status` is "finished" (or has none: older runs). The
report:
- groups finished runs by setting (everything in the resolved config but the seeds, paths and logging/speed
  switches; mode=eval runs apart from training runs) and averages the seeds: mean ± std (sample) and n. The setting
  columns: length and segment (sorting) or segment length and lanes (language modelling), training size, training
  length, precision; where runs of one model differ in anything else, a `variant` column names it;
- sorting: a table of accuracy beside the memory-less line (test/memoryless-acc) and the paper's approximate
  numbers, and one figure per segment size: accuracy against length per model, the memory-less line dashed, the
  paper's points (experiments.md §e.2) as markers labelled "paper (approx.)";
- language modelling: a table per dataset with our perplexity (both forms: `ppl`, exp of the token-weighted mean
  NLL, and `ppl_mean_of_batches`, the reference's mean of per-batch perplexities, the form the paper's numbers
  probably are: experiments.md §c.1) or bpc beside the paper's (§e.1), and the learning curves (validation metric
  against step, from each run's metrics.csv) per dataset;
- classification: mean ± std over seeds per model and the one-tailed Welch t-tests
  (experiment/tasks/classification_stats.py);
- runs without a finished results.json listed apart (interrupted: partial results with the resume command, or a
  checkpoint without results; failed: none; possibly still running: written to in the last 10 minutes), with
  their last logged step, never silently dropped;
- every finished run, one row each.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

HEADLINE = {  # task name -> test metrics to show, in order
    "sorting": ["test/acc-final", "test/memoryless-acc"],
    "wikitext103": ["test/ppl", "test/ppl_mean_of_batches"],
    "pg19": ["test/ppl", "test/ppl_mean_of_batches"],
    "enwik8": ["test/bpc"],
    "hyperpartisan": ["test/macro-f1-final", "test/acc-final"],
}
LM_TASKS = ("wikitext103", "pg19", "enwik8")
# config keys that do not change what a run measures: never split a group
IGNORED_SUFFIXES = ("seed", "cache_dir", "num_workers", "cuda_graph", "compile", "compile_mode", "compile_options",
                    "compile_loss", "fused_walk", "enable_progress_bar", "enable_model_summary", "log_every_n_steps",
                    "default_root_dir", "tokenizer", "path", "data_file")
IGNORED_KEYS = {"run_name", "print_summary", "progress_refresh_rate", "ckpt_path", "mode", "analysis"}
RECENT_S = 600  # a folder written to this recently may belong to a run still going


# --------------------------------------------------------------------------------------------------------------
# reading runs
def setting(task: str, config: dict) -> str:
    task_cfg = config.get("task", {})
    data, module = task_cfg.get("data", {}), task_cfg.get("module", {})
    if task == "sorting":
        return f"L {data.get('length')}, segment {module.get('segment_size')}"
    return f"segment {data.get('segment_length')}, {data.get('lanes')} lanes"


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: node}


def fingerprint(config: dict) -> dict[str, Any]:
    """The config keys that define what a run measures (seeds, paths, logging and speed switches left out; a null
    value counts as unset, so a run from before an option existed matches one that leaves it at null)."""
    flat = flatten(config or {})
    return {key: value for key, value in flat.items()
            if value is not None and key.split(".")[0] not in IGNORED_KEYS and not key.startswith("logger.")
            and not key.rsplit(".", 1)[-1].endswith(IGNORED_SUFFIXES)}


def learning_curve(run_dir: Path, metric: str | None) -> list[tuple[int, float]]:
    """(step, value) of `metric` from the run's metrics.csv (the csv logger), [] without one."""
    path = run_dir / "metrics.csv"
    if not metric or not path.is_file():
        return []
    points = []
    with path.open(newline="") as handle:
        for row in csv.DictReader(handle):
            value, step = row.get(metric), row.get("step")
            if value not in (None, "") and step not in (None, ""):
                points.append((int(float(step)), float(value)))
    return points


def last_step(run_dir: Path) -> int | None:
    path = run_dir / "metrics.csv"
    if not path.is_file():
        return None
    steps = []
    with path.open(newline="") as handle:
        for row in csv.DictReader(handle):
            if row.get("step") not in (None, ""):
                steps.append(int(float(row["step"])))
    return max(steps) if steps else None


def read_run(results_path: Path) -> dict:
    from experiment.figures import setting_of

    results = json.loads(results_path.read_text())
    run_dir = results_path.parent
    config_path = run_dir / "config_resolved.yaml"
    config = (yaml.safe_load(config_path.read_text()) if config_path.is_file() else {}) or {}
    task = results.get("task", "?")
    metrics = results.get("test") or {}
    return {
        "task": task,
        "model": results.get("model", "?"),
        "setting": setting(task, config),
        "setting_columns": setting_of(config),
        "fingerprint": fingerprint(config),
        "seed": results.get("seed"),
        "mode": results.get("mode"),
        "steps": results.get("global_step"),
        "test": {key: metrics[key] for key in HEADLINE.get(task, sorted(metrics)) if key in metrics},
        "val": results.get("val") or {},
        "monitor": results.get("monitor"),
        "best": results.get("best_score"),
        "wall_time_s": results.get("wall_time_s"),
        "run_dir": str(run_dir),
        "curve": learning_curve(run_dir, results.get("monitor")),
        "results": results,
    }


def read_unfinished(run_dir: Path, now: float) -> dict | None:
    """A run folder without results.json: what it was and how far it got; None for an analysis folder."""
    overrides_path = run_dir / ".hydra" / "overrides.yaml"
    overrides = (yaml.safe_load(overrides_path.read_text()) or []) if overrides_path.is_file() else []
    if any(str(o).startswith("mode=") and str(o) != "mode=train" for o in overrides):
        return None  # an analysis (or evaluation) invocation writes no results.json of its own
    config_path = run_dir / "config_resolved.yaml"
    config = (yaml.safe_load(config_path.read_text()) if config_path.is_file() else {}) or {}
    checkpoints = sorted((run_dir / "checkpoints").glob("*.ckpt")) if (run_dir / "checkpoints").is_dir() else []
    newest = max((p.stat().st_mtime for p in run_dir.rglob("*") if p.is_file()), default=run_dir.stat().st_mtime)
    if now - newest < RECENT_S:
        status = "possibly still running"
    elif checkpoints:
        status = "interrupted (checkpoint kept)"
    else:
        status = "failed (no checkpoint)" if config else "failed before it started"
    return {"run_dir": str(run_dir), "task": (config.get("task") or {}).get("name", "?"),
            "model": (config.get("model") or {}).get("name", "?"), "status": status, "last_step": last_step(run_dir),
            "overrides": " ".join(map(str, overrides)),
            "modified": time.strftime("%Y-%m-%d %H:%M", time.gmtime(newest))}


def find_runs(folders: list[str]) -> tuple[list[Path], list[Path]]:
    """(results.json paths, folders of runs without one)."""
    finished: set[Path] = set()
    candidates: set[Path] = set()
    for folder in folders:
        root = Path(folder)
        if not root.is_dir():
            continue
        finished |= set(root.rglob("results.json"))
        candidates |= {p.parent for p in root.rglob("config_resolved.yaml")}
        candidates |= {p.parent for p in root.rglob(".hydra") if p.is_dir()}
    done = {p.parent for p in finished}
    return sorted(finished), sorted(d for d in candidates if d not in done)


# --------------------------------------------------------------------------------------------------------------
# grouping
def mean_std(values: list[float]) -> tuple[float | None, float | None, int]:
    xs = [v for v in values if v is not None and math.isfinite(v)]
    if not xs:
        return None, None, 0
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else None), len(xs)


def group_runs(rows: list[dict]) -> list[dict]:
    """Finished runs grouped by (task, model, mode, full setting); seeds averaged. Each group: the keys, `runs`,
    `variant` (what sets it apart from the model's other groups with the same setting columns) and per metric
    (mean, std, n)."""
    groups: dict[str, dict] = {}
    for row in rows:
        key = json.dumps([row["task"], row["model"], row["mode"], row["fingerprint"]], sort_keys=True, default=str)
        group = groups.setdefault(key, {"task": row["task"], "model": row["model"], "mode": row["mode"],
                                        "setting_columns": row["setting_columns"], "fingerprint": row["fingerprint"],
                                        "runs": []})
        group["runs"].append(row)
    out = list(groups.values())
    for group in out:
        metrics = sorted({k for run in group["runs"] for k in run["test"]})
        group["metrics"] = {k: mean_std([run["test"].get(k) for run in group["runs"]]) for k in metrics}
        group["seeds"] = sorted({run["seed"] for run in group["runs"]}, key=str)
        group["variant"] = ""
    # a variant column where groups of one model share their setting columns but differ elsewhere
    by_columns: dict[str, list[dict]] = {}
    for group in out:
        key = json.dumps([group["task"], group["model"], group["mode"], group["setting_columns"]], sort_keys=True,
                         default=str)
        by_columns.setdefault(key, []).append(group)
    for siblings in by_columns.values():
        if len(siblings) < 2:
            continue
        for group in siblings:
            group["variant"] = variant_text(group, siblings)
    out.sort(key=lambda g: (g["task"], *(_order(v) for v in g["setting_columns"].values()), g["model"],
                            -len(g["runs"]), g["variant"]))
    return out


def _order(value: Any) -> tuple:
    """Numbers in numeric order, before text."""
    return (0, value, "") if isinstance(value, (int, float)) else (1, 0, str(value))


def variant_text(group: dict, siblings: list[dict]) -> str:
    """What sets `group` apart from its siblings (same model and setting columns): the keys with two or more values
    among them, and options set in some but not others (`unset` where not set). Memory options set in some runs
    only (options added after older runs, left at their defaults) are named only where values differ, and
    model.config.memoria_<x> not where memory.<x> already is (the model's copy of the memory group)."""
    keys = sorted({k for g in siblings for k in g["fingerprint"]})
    shown = []
    for key in keys:
        values = [g["fingerprint"].get(key) for g in siblings]
        distinct = {json.dumps(v, default=str) for v in values if v is not None}
        partly_set = None in values and not key.startswith(("memory.", "model.config.memoria_"))
        if len(distinct) > 1 or (partly_set and distinct):
            shown.append(key)
    shown = [k for k in shown if not (k.startswith("model.config.memoria_")
                                      and f"memory.{k.removeprefix('model.config.memoria_')}" in shown)]
    return ", ".join(f"{k}={group['fingerprint'].get(k, 'unset')}" for k in shown)


# --------------------------------------------------------------------------------------------------------------
# formatting
def format_value(key: str, value) -> str:
    if value is None:
        return "—"
    if "acc" in key or "f1" in key:
        return f"{100 * value:.2f}%"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def format_mean(key: str, stats: tuple | None) -> str:
    if not stats or stats[0] is None:
        return "—"
    mean, std, n = stats
    scale, unit, digits = (100, "%", 2) if ("acc" in key or "f1" in key) else (1, "", 3)
    std_text = f" ± {scale * std:.{digits}f}" if std is not None else ""
    return f"{scale * mean:.{digits}f}{std_text}{unit}"


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


def _setting_cells(group: dict, columns: list[str]) -> list[str]:
    return [str(group["setting_columns"].get(c, "—")) for c in columns]


def _columns(groups: list[dict]) -> list[str]:
    columns: list[str] = []
    for group in groups:
        columns += [c for c in group["setting_columns"] if c not in columns]
    return columns


# --------------------------------------------------------------------------------------------------------------
# report sections
def sorting_section(groups: list[dict], figures: Path, rel: str) -> list[str]:
    from experiment.figures import PAPER, PAPER_LABEL, base_model, save_figure, sorting_figure

    groups = [g for g in groups if g["task"] == "sorting"]
    if not groups:
        return []
    columns = _columns(groups)
    paper = {(m, length, seg): (lo, hi) for m, length, seg, lo, hi in PAPER["sorting"]}
    lines = ["## Sorting", "", "Test accuracy on the 20 target tokens (mean ± std over seeds, n seeds); the "
             "memory-less line is what a perfect counter that sees only the target's segment scores on the same "
             "examples (experiments.md §e.2): everything above it came through memory. A figure's line joins the "
             "settings of a model that differ only in L; per model it draws the lines that span the most lengths "
             "(single-length variants are in this table only).", "",
             f"| model | {' | '.join(columns)} | variant | mode | n | accuracy | memory-less line | above it | "
             f"{PAPER_LABEL} |", "|---|" + "---|" * (len(columns) + 7)]
    for g in groups:
        acc, free = g["metrics"].get("test/acc-final"), g["metrics"].get("test/memoryless-acc")
        above = "—"
        if acc and free and acc[0] is not None and free[0] is not None:
            above = f"{100 * (acc[0] - free[0]):+.2f} pts"
        cols = g["setting_columns"]
        ref = paper.get((base_model(g["model"]), cols.get("length"), cols.get("segment")))
        ref_text = "—" if ref is None else f"{100 * ref[0]:.0f}–{100 * ref[1]:.0f}%"
        lines.append(f"| {g['model']} | {' | '.join(_setting_cells(g, columns))} | {g['variant'] or '—'} | "
                     f"{g['mode']} | {acc[2] if acc else 0} | {format_mean('acc', acc)} | "
                     f"{format_mean('acc', free)} | {above} | {ref_text} |")
    lines.append("")
    train = [g for g in groups if g["mode"] == "train"]
    segments = sorted({g["setting_columns"].get("segment") for g in train}, key=lambda s: (s is None, s))
    for segment in segments:
        points = []
        mine = [g for g in train if g["setting_columns"].get("segment") == segment and "test/acc-final" in g["metrics"]]

        # A line joins the settings of a model that differ only in the length; per model the lines that span the
        # most lengths are drawn (single-length ablations stay in the table), named by what sets them apart.
        by_line: dict[str, list[dict]] = {}
        for g in mine:
            rest = {k: v for k, v in g["fingerprint"].items() if k != "task.data.length"}
            by_line.setdefault(json.dumps([g["model"], rest], sort_keys=True, default=str), []).append(g)
        for model in sorted({g["model"] for g in mine}):
            candidates = [line for line in by_line.values() if line[0]["model"] == model]
            most = max(len(line) for line in candidates)
            drawn = [line for line in candidates if len(line) == most]
            heads = [{"fingerprint": {k: v for k, v in line[0]["fingerprint"].items() if k != "task.data.length"}}
                     for line in drawn]
            for line, head in zip(drawn, heads):
                label = model if len(drawn) == 1 else f"{model} ({variant_text(head, heads)})"
                for g in line:
                    mean, std, n = g["metrics"]["test/acc-final"]
                    free = g["metrics"].get("test/memoryless-acc")
                    points.append({"model": label, "length": g["setting_columns"].get("length"), "mean": mean,
                                   "std": std, "n": n, "memoryless": free[0] if free else None})
        if not points:
            continue
        name = f"sorting_segment{segment}.png"
        save_figure(sorting_figure(points, segment), figures / name)
        lines += [f"![sorting, segment {segment}]({rel}/{name})", ""]
    paper_rows = [f"| {m} | {length} | {seg} | {100 * lo:.2f}–{100 * hi:.2f}% |"
                  for m, length, seg, lo, hi in PAPER["sorting"]]
    lines += [f"The paper's points ({PAPER_LABEL}, experiments.md §e.2; its full grid is missing): ", "",
              "| model | L | segment | accuracy |", "|---|---|---|---|", *paper_rows, ""]
    return lines


def lm_section(groups: list[dict], rows: list[dict], figures: Path, rel: str) -> list[str]:
    from experiment.figures import PAPER, PAPER_LABEL, base_model, learning_curve_figure, save_figure

    lines: list[str] = []
    for task in LM_TASKS:
        mine = [g for g in groups if g["task"] == task]
        if not mine:
            continue
        columns = _columns(mine)
        is_bpc = task == "enwik8"
        headline = ["test/bpc"] if is_bpc else ["test/ppl", "test/ppl_mean_of_batches"]
        lines += [f"## Language modelling: {task}", ""]
        if is_bpc:
            lines.append("Test bits per character (mean ± std over seeds) beside the paper's (experiments.md §e.1).")
        else:
            lines.append("Test perplexity on GPT-2 tokens (mean ± std over seeds) in both forms: `ppl` = exp of the "
                         "token-weighted mean NLL over the split (the standard one), `ppl_mean_of_batches` = the "
                         "reference's mean of per-batch perplexities, the form the paper's numbers probably are "
                         "(experiments.md §c.1; it is ≥ ppl). The paper's column is compared with the second.")
        lines += ["", f"| model | {' | '.join(columns)} | variant | mode | n | "
                  + " | ".join(h.removeprefix("test/") for h in headline) + f" | {PAPER_LABEL} |",
                  "|---|" + "---|" * (len(columns) + 4 + len(headline))]
        for g in mine:
            segment = g["setting_columns"].get("segment")
            table = PAPER.get(f"{task}_seg50" if task == "wikitext103" and segment == 50 else task, {})
            ref = table.get(base_model(g["model"]))
            n = max((g["metrics"].get(h) or (None, None, 0))[2] for h in headline)
            cells = " | ".join(format_mean(h, g["metrics"].get(h)) for h in headline)
            lines.append(f"| {g['model']} | {' | '.join(_setting_cells(g, columns))} | {g['variant'] or '—'} | "
                         f"{g['mode']} | {n} | {cells} | {'—' if ref is None else ref} |")
        curves = {f"{r['model']} seed {r['seed']}": r["curve"] for r in rows
                  if r["task"] == task and r["mode"] == "train" and r["curve"]}
        if curves:
            metric = next(r["monitor"] for r in rows if r["task"] == task and r["curve"])
            name = f"learning_curves_{task}.png"
            save_figure(learning_curve_figure(curves, metric, f"{task}: {metric} during training"), figures / name)
            lines += ["", f"![{task} learning curves]({rel}/{name})"]
        lines.append("")
    return lines


def classification_section(rows: list[dict]) -> list[str]:
    tasks = sorted({r["task"] for r in rows if r["task"] == "hyperpartisan"})
    lines: list[str] = []
    for task in tasks:
        runs = [r["results"] for r in rows if r["task"] == task]
        lines += [f"## Classification: {task}", "",
                  "Mean ± std over seeds per model (in %), and one-tailed Welch t-tests of each Memoria model "
                  "against each baseline (experiments.md §e.3: the paper reports Memoria RoBERTa test macro-F1 "
                  "96.51, RoBERTa 95.24, approx.).", ""]
        try:
            from experiment.tasks.classification_stats import summarize_classification

            lines.append(summarize_classification(runs, task=task).to_markdown())
        except (ImportError, ValueError) as error:
            lines.append(f"(no t-tests: {error})")
        lines.append("")
    return lines


def other_section(groups: list[dict]) -> list[str]:
    known = {"sorting", "hyperpartisan", *LM_TASKS}
    mine = [g for g in groups if g["task"] not in known]
    if not mine:
        return []
    columns = _columns(mine)
    lines = ["## Other tasks", "", f"| task | model | {' | '.join(columns)} | variant | mode | test metrics |",
             "|---|---|" + "---|" * (len(columns) + 3)]
    for g in mine:
        metrics = ", ".join(f"{k.removeprefix('test/')} {format_mean(k, v)} (n {v[2]})"
                            for k, v in g["metrics"].items())
        lines.append(f"| {g['task']} | {g['model']} | {' | '.join(_setting_cells(g, columns))} | "
                     f"{g['variant'] or '—'} | {g['mode']} | {metrics or '—'} |")
    return [*lines, ""]


def unfinished_section(unfinished: list[dict]) -> list[str]:
    if not unfinished:
        return []
    lines = ["## Runs without results", "", "Interrupted, failed or still running: not in the tables above.", "",
             "| run | task | model | status | last logged step | last written (UTC) | overrides |",
             "|---|---|---|---|---|---|---|"]
    for u in unfinished:
        step = "—" if u["last_step"] is None else u["last_step"]
        lines.append(f"| {u['run_dir']} | {u['task']} | {u['model']} | {u['status']} | {step} | {u['modified']} | "
                     f"{u['overrides'] or '—'} |")
    return [*lines, ""]


def write_report(rows: list[dict], unfinished: list[dict], out: Path, folders: list[str]) -> Path:
    """results/report.md and results/figures/*.png; returns the report's path."""
    figures = out / "figures"
    groups = group_runs(rows)
    lines = ["# Results report", "",
             f"Generated by `python scripts/collect_results.py {' '.join(folders)}` on "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: {len(rows)} finished run(s) in {len(groups)} "
             f"setting(s), {len(unfinished)} without results. Seeds are averaged within a setting (mean ± sample "
             "std, n); the paper's numbers are approximate (experiments.md §e).", ""]
    lines += sorting_section(groups, figures, "figures")
    lines += lm_section(groups, rows, figures, "figures")
    lines += classification_section(rows)
    lines += other_section(groups)
    lines += unfinished_section(unfinished)
    lines += ["## Every finished run", "", format_table(rows), ""]
    out.mkdir(parents=True, exist_ok=True)
    path = out / "report.md"
    tmp = path.with_name(".report.md.tmp")
    tmp.write_text("\n".join(lines))
    tmp.replace(path)
    return path


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folders", nargs="*", default=["outputs", "multirun"])
    parser.add_argument("--json", help="also write the finished runs' rows to this file")
    parser.add_argument("--out", default="results", help="folder of report.md and figures/ (default: results)")
    parser.add_argument("--no-report", action="store_true", help="only print the table")
    args = parser.parse_args(argv)
    paths, unfinished_dirs = find_runs(args.folders)
    now = time.time()
    unfinished = [u for u in (read_unfinished(d, now) for d in unfinished_dirs) if u is not None]
    if not paths and not unfinished:
        print(f"no results.json under {', '.join(args.folders)}: finished runs write one in their run folder",
              file=sys.stderr)
        return []
    rows = []
    for path in paths:
        try:
            row = read_run(path)
        except (OSError, ValueError, yaml.YAMLError) as error:
            print(f"skipped {path}: {error}", file=sys.stderr)
            unfinished.append({"run_dir": str(path.parent), "task": "?", "model": "?", "last_step": None,
                               "status": f"unreadable results.json ({error})", "overrides": "", "modified": "—"})
            continue
        status = row["results"].get("status", "finished")  # results.json before the status field: finished
        if status != "finished":  # e.g. an interrupted run's partial results (with the command that resumes it)
            u = read_unfinished(path.parent, now) or {"run_dir": str(path.parent), "overrides": "", "modified": "—"}
            resume = row["results"].get("resume_command")
            u.update(task=row["task"], model=row["model"], last_step=row["steps"],
                     status=f"{status}" + (f"; resume: `{resume}`" if resume else ""))
            unfinished.append(u)
            continue
        rows.append(row)
    rows.sort(key=lambda r: (r["task"], r["setting"], r["model"], str(r["seed"])))
    print(format_table(rows))
    if not args.no_report:
        report = write_report(rows, unfinished, Path(args.out), args.folders)
        print(f"\nreport: {report} ({len(rows)} finished, {len(unfinished)} without results)", file=sys.stderr)
    if args.json:
        keep = ("task", "model", "setting", "seed", "mode", "steps", "test", "monitor", "best", "wall_time_s",
                "run_dir")
        Path(args.json).write_text(json.dumps([{k: r[k] for k in keep} for r in rows], indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
