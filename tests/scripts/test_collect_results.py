"""scripts/collect_results.py: the table of finished runs, read from results.json + config_resolved.yaml."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from tests.scripts import load_script

collect_results = load_script("collect_results")


def write_run(folder: Path, results: dict, config: dict) -> None:
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps(results))
    (folder / "config_resolved.yaml").write_text(yaml.safe_dump(config))


def test_table_of_sorting_and_lm_runs(tmp_path, capsys):
    write_run(
        tmp_path / "multirun" / "sort" / "0",
        {"mode": "train", "task": "sorting", "model": "memoria_gpt2_sort", "seed": 1, "global_step": 400,
         "test": {"test/loss": 2.0, "test/acc-final": 0.3125}, "monitor": "val/acc-final", "best_score": 0.32,
         "wall_time_s": 12.3},
        {"task": {"data": {"length": 1000}, "module": {"segment_size": 256}}},
    )
    write_run(
        tmp_path / "outputs" / "wt",
        {"mode": "eval", "task": "wikitext103", "model": "gpt2", "seed": 42, "global_step": 10,
         "test": {"test/ppl": 30.5, "test/ppl_mean_of_batches": 31.25, "test/loss": 3.4}, "monitor": "val/ppl",
         "best_score": None, "wall_time_s": None},
        {"task": {"data": {"segment_length": 150, "lanes": 8}, "module": {}}},
    )
    (tmp_path / "outputs" / "unfinished").mkdir()  # no results.json: not a row

    rows = collect_results.main([str(tmp_path / "multirun"), str(tmp_path / "outputs"),
                                 "--json", str(tmp_path / "rows.json")])
    table = capsys.readouterr().out
    assert [(r["task"], r["setting"]) for r in rows] == [
        ("sorting", "L 1000, segment 256"), ("wikitext103", "segment 150, 8 lanes")]
    assert rows[1]["test"] == {"test/ppl": 30.5, "test/ppl_mean_of_batches": 31.25}  # headline metrics only
    assert "acc-final 31.25%" in table and "ppl 30.500, ppl_mean_of_batches 31.250" in table
    assert json.loads((tmp_path / "rows.json").read_text()) == rows


def test_no_runs_says_where_it_looked(tmp_path, capsys):
    assert collect_results.main([str(tmp_path)]) == []
    assert f"no results.json under {tmp_path}" in capsys.readouterr().err
