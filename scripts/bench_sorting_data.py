"""Sorting data (experiments.md §a.4): generation time and cache size per length, and the cost of opening a cache.

    python scripts/bench_sorting_data.py                                  # L = 1000, 4000, 32000; 600 examples
    python scripts/bench_sorting_data.py --old-commit e0eac83             # also generator v1 and its JSON cache

Per length: the cache entry written from scratch (generate + write, ms per example), its size per example, the data
module's setup on it (open, check every token), and reading one example (`dataset[i]`). With --old-commit the
sorting module of that commit (generator v1, JSON cache) is measured the same way. Also prints the extrapolation to
`sort_paper`'s 81,600 examples (80,000 + 800 + 800).
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from experiment.data import sorting  # noqa: E402

PAPER_EXAMPLES = 80_000 + 800 + 800


def old_module(commit: str):
    """experiment/data/sorting.py of `commit`, importable on its own."""
    source = subprocess.run(["git", "-C", str(REPO), "show", f"{commit}:experiment/data/sorting.py"],
                            check=True, capture_output=True, text=True).stdout
    source = source.replace("from .tokenized_cache", "from experiment.data.tokenized_cache")
    source = source.replace("from .transfer", "from experiment.data.transfer")
    path = Path(tempfile.mkdtemp()) / "sorting_old.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("sorting_old", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def measure(module, length: int, examples: int, folder: str) -> dict[str, float]:
    count = examples + 2
    started = time.perf_counter()
    path = module.load_or_generate(length, examples, 1, 1, 0, cache_dir=folder)
    generate = time.perf_counter() - started
    size = sum(p.stat().st_size for p in Path(folder).iterdir())
    if hasattr(module, "_VALIDATED"):
        module._VALIDATED.clear()  # as a new process would open it
    started = time.perf_counter()
    dm = module.SortingDataModule(length=length, num_train=examples, num_dev=1, num_test=1, seed=0, cache_dir=folder)
    dm.setup("fit")
    setup = time.perf_counter() - started
    split = dm.splits["train"]
    started = time.perf_counter()
    for index in range(examples):
        split[index]
    read = time.perf_counter() - started
    del path
    return {"ms": generate / count * 1e3, "kb": size / count / 1e3, "setup_ms": setup / count * 1e3,
            "read_ms": read / examples * 1e3}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1000, 4000, 32000])
    parser.add_argument("--examples", type=int, default=600, help="training examples per length (+1 dev, +1 test)")
    parser.add_argument("--old-commit", default=None, help="also measure the sorting module of this git commit")
    args = parser.parse_args(argv)
    versions = [(f"v{sorting.GENERATOR_VERSION} (this)", sorting)]
    if args.old_commit:
        versions.append((f"{args.old_commit}", old_module(args.old_commit)))
    print("| generator | L | generate + write (ms/example) | cache (KB/example) | setup (ms/example) | "
          "dataset[i] (ms) | sort_paper (81,600 examples): time, size |")
    print("|---|---|---|---|---|---|---|")
    for length in args.lengths:
        for name, module in versions:
            with tempfile.TemporaryDirectory() as folder:
                m = measure(module, length, args.examples, folder)
            total_s = m["ms"] * PAPER_EXAMPLES / 1e3
            print(f"| {name} | {length} | {m['ms']:.3f} | {m['kb']:.2f} | {m['setup_ms']:.3f} | {m['read_ms']:.3f} | "
                  f"{total_s / 60:.1f} min, {m['kb'] * PAPER_EXAMPLES / 1e6:.2f} GB |", flush=True)


if __name__ == "__main__":
    main()
