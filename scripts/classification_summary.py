"""Five-seed summary of Hyperpartisan runs: mean ± std per model and one-tailed Welch t-tests of each Memoria model
against each baseline (experiments.md §c.3 item 8; `experiment/tasks/classification_stats.py`).

    memoria-exp -m experiment=hyperpartisan model=memoria_roberta,roberta,bert,longformer,bigbird seed=1,2,3,4,5
    python scripts/classification_summary.py multirun/           # every results.json below, task hyperpartisan
    python scripts/classification_summary.py runs/ --json summary.json

Runs made on different splits (results.json's split checksum) are refused: their numbers do not compare.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from experiment.tasks.classification_stats import summarize_classification


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="*", default=["outputs", "multirun"], help="folders holding results.json")
    parser.add_argument("--task", default="hyperpartisan", help="task name in results.json (default hyperpartisan)")
    parser.add_argument("--json", help="also write the summary as JSON here")
    args = parser.parse_args(argv)
    files = sorted({path for folder in args.folders for path in Path(folder).rglob("results.json")})
    summary = summarize_classification(files, task=args.task)
    if not summary.rows:
        print(f"no finished {args.task} training runs under {', '.join(args.folders)}", file=sys.stderr)
        return 1
    print(summary.to_markdown())
    if args.json:
        Path(args.json).write_text(json.dumps(dataclasses.asdict(summary), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
