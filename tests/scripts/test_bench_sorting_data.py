"""scripts/bench_sorting_data.py runs end to end on tiny lengths."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.scripts import load_script

REPO = Path(__file__).resolve().parents[2]


def rows_of(output: str) -> list[list[str]]:
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in output.splitlines()[2:]]


def test_tiny_run_prints_one_row_per_length(capsys):
    load_script("bench_sorting_data").main(["--lengths", "30", "50", "--examples", "5"])
    rows = rows_of(capsys.readouterr().out)
    assert [row[:2] for row in rows] == [["v2 (this)", "30"], ["v2 (this)", "50"]]
    # the cache holds 7 rows of L + 21 bytes plus the metadata file: a little over (L + 21) bytes per example
    assert 0.051 <= float(rows[0][3]) < 0.2 and 0.071 <= float(rows[1][3]) < 0.25


def test_the_old_generator_is_measured_from_its_commit(capsys):
    if subprocess.run(["git", "-C", str(REPO), "cat-file", "-e", "e0eac83"], capture_output=True).returncode:
        pytest.skip("commit e0eac83 is not in this checkout's history")
    load_script("bench_sorting_data").main(["--lengths", "30", "--examples", "5", "--old-commit", "e0eac83"])
    rows = rows_of(capsys.readouterr().out)
    assert [row[0] for row in rows] == ["v2 (this)", "e0eac83"]
    assert float(rows[1][3]) > float(rows[0][3])  # the JSON cache is larger
