"""Five-seed summaries of classification runs (experiments.md §c.3 item 8): mean ± std per model and one-tailed
Welch t-tests of each Memoria model against each baseline, as the paper reports (its Table 3).

`summarize_classification(runs)` takes the runs' `results.json` contents (dicts) or paths to them and returns a
`ClassificationSummary`: `.rows` (one dict per model), `.tests` (one dict per Memoria model × baseline × metric) and
`.to_markdown()`. `scripts/classification_summary.py` runs it over a multirun folder; `scripts/collect_results.py`
can call it too. Used by no task (tasks never import each other); needs scipy.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

METRICS = ("test/macro-f1-final", "test/acc-final", "val/macro-f1-final", "val/acc-final")
TESTED_METRICS = ("test/macro-f1-final", "test/acc-final")


@dataclass
class ClassificationSummary:
    rows: list[dict[str, Any]] = field(default_factory=list)
    tests: list[dict[str, Any]] = field(default_factory=list)
    split_sha256: str | None = None

    def to_markdown(self) -> str:
        """The table: model, seeds, then mean ± std (in %) of each metric; then the t-tests."""
        lines = ["| model | seeds | " + " | ".join(METRICS) + " |", "|---|---|" + "---|" * len(METRICS)]
        for row in self.rows:
            cells = []
            for metric in METRICS:
                mean, std = row[metric]
                cells.append("—" if mean is None else f"{100 * mean:.2f} ± {100 * (std or 0.0):.2f}")
            lines.append(f"| {row['model']} | {row['seeds']} | " + " | ".join(cells) + " |")
        if self.tests:
            lines += ["", "| Memoria model | baseline | metric | t | p (one-tailed, Welch) |", "|---|---|---|---|---|"]
            for test in self.tests:
                t = "—" if test["t"] is None else f"{test['t']:.3f}"
                p = "—" if test["p"] is None else f"{test['p']:.4f}"
                lines.append(f"| {test['memoria']} | {test['baseline']} | {test['metric']} | {t} | {p} |")
        if self.split_sha256:
            lines += ["", f"split sha256: {self.split_sha256}"]
        return "\n".join(lines)


def _load(run: dict[str, Any] | str | Path) -> dict[str, Any]:
    if isinstance(run, dict):
        return run
    return json.loads(Path(run).read_text())


def _metric(run: dict[str, Any], metric: str) -> float | None:
    section = metric.split("/", 1)[0]
    value = (run.get(section) or {}).get(metric)
    return None if value is None or not math.isfinite(float(value)) else float(value)


def summarize_classification(runs: list[dict[str, Any] | str | Path], task: str = "hyperpartisan",
                             memoria_prefix: str = "memoria") -> ClassificationSummary:
    """Group the runs of `task` by model (results.json's "model"), one value per seed (the last run of a seed
    wins), and test every model named `memoria_prefix`* against every other model: H1 = the Memoria mean is larger
    (scipy's ttest_ind, equal_var=False, alternative="greater"). ValueError when the runs used different splits
    (results.json's data_source.split.sha256), which would make the comparison meaningless."""
    from scipy import stats

    by_model: dict[str, dict[int, dict[str, Any]]] = {}
    splits: set[str] = set()
    for item in runs:
        run = _load(item)
        if run.get("task") != task or run.get("mode") != "train":
            continue
        sha = ((run.get("data_source") or {}).get("split") or {}).get("sha256")
        if sha:
            splits.add(sha)
        by_model.setdefault(str(run["model"]), {})[int(run.get("seed", 0))] = run
    if len(splits) > 1:
        raise ValueError(f"the runs used {len(splits)} different splits ({', '.join(sorted(s[:12] for s in splits))}); "
                         "summarise runs of one split only")
    summary = ClassificationSummary(split_sha256=next(iter(splits), None))
    values: dict[str, dict[str, list[float]]] = {}
    for model in sorted(by_model, key=lambda name: (not name.startswith(memoria_prefix), name)):
        seeds = by_model[model]
        row: dict[str, Any] = {"model": model, "seeds": len(seeds)}
        values[model] = {}
        for metric in METRICS:
            xs = [v for v in (_metric(run, metric) for _, run in sorted(seeds.items())) if v is not None]
            values[model][metric] = xs
            mean = statistics.fmean(xs) if xs else None
            std = statistics.stdev(xs) if len(xs) > 1 else None  # sample std (ddof 1)
            row[metric] = (mean, std)
        summary.rows.append(row)
    for memoria in (m for m in values if m.startswith(memoria_prefix)):
        for baseline in (m for m in values if not m.startswith(memoria_prefix)):
            for metric in TESTED_METRICS:
                a, b = values[memoria][metric], values[baseline][metric]
                t = p = None
                if len(a) > 1 and len(b) > 1:
                    result = stats.ttest_ind(a, b, equal_var=False, alternative="greater")
                    t, p = float(result.statistic), float(result.pvalue)
                    t, p = (None if math.isnan(t) else t), (None if math.isnan(p) else p)  # zero variance: no test
                summary.tests.append({"memoria": memoria, "baseline": baseline, "metric": metric, "t": t, "p": p,
                                      "n": (len(a), len(b))})
    return summary
