"""scripts/collect_results.py: the table of finished runs and the results report (seeds averaged per setting,
interrupted and failed runs listed apart, figures), read from results.json + config_resolved.yaml + metrics.csv."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import yaml

from tests.scripts import load_script

collect_results = load_script("collect_results")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_run(folder: Path, results: dict | None, config: dict, curve: list[tuple[int, str, float]] = (),
              age_s: float = 0.0) -> None:
    folder.mkdir(parents=True)
    if results is not None:
        (folder / "results.json").write_text(json.dumps(results))
    (folder / "config_resolved.yaml").write_text(yaml.safe_dump(config))
    if curve:
        metrics = sorted({name for _, name, _ in curve})
        lines = ["epoch,step," + ",".join(metrics)]
        for step, name, value in curve:
            lines.append(f"0,{step}," + ",".join(str(value) if m == name else "" for m in metrics))
        (folder / "metrics.csv").write_text("\n".join(lines) + "\n")
    if age_s:
        old = time.time() - age_s
        for path in [folder, *folder.rglob("*")]:
            os.utime(path, (old, old))


def sorting_config(length: int, segment: int, lifespan: int = 3) -> dict:
    return {"seed": 1, "task": {"name": "sorting", "data": {"length": length, "num_train": 6000, "seed": 1},
                                "module": {"segment_size": segment}},
            "memory": {"initial_lifespan": lifespan, "seed": 1},
            "trainer": {"max_epochs": 3, "max_steps": -1, "precision": "32-true"}}


def sorting_results(model: str, seed: int, acc: float, free: float = 0.25) -> dict:
    return {"mode": "train", "task": "sorting", "model": model, "seed": seed, "global_step": 100,
            "test": {"test/loss": 2.0, "test/acc-final": acc, "test/memoryless-acc": free},
            "monitor": "val/acc-final", "best_score": acc, "wall_time_s": 60.0}


def lm_config() -> dict:
    return {"task": {"name": "wikitext103", "data": {"segment_length": 150, "lanes": 8}, "module": {}},
            "trainer": {"max_steps": 1000, "precision": "bf16-mixed"}}


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
    (tmp_path / "outputs" / "unfinished").mkdir()  # neither results.json nor a run's files: not a run

    rows = collect_results.main([str(tmp_path / "multirun"), str(tmp_path / "outputs"),
                                 "--json", str(tmp_path / "rows.json"), "--out", str(tmp_path / "results")])
    table = capsys.readouterr().out
    assert [(r["task"], r["setting"]) for r in rows] == [
        ("sorting", "L 1000, segment 256"), ("wikitext103", "segment 150, 8 lanes")]
    assert rows[1]["test"] == {"test/ppl": 30.5, "test/ppl_mean_of_batches": 31.25}  # headline metrics only
    assert "acc-final 31.25%" in table and "ppl 30.500, ppl_mean_of_batches 31.250" in table
    saved = json.loads((tmp_path / "rows.json").read_text())
    assert [(r["task"], r["seed"], r["test"]) for r in saved] == [(r["task"], r["seed"], r["test"]) for r in rows]
    assert "Runs without results" not in (tmp_path / "results" / "report.md").read_text()


def test_no_runs_says_where_it_looked(tmp_path, capsys):
    assert collect_results.main([str(tmp_path)]) == []
    assert f"no results.json under {tmp_path}" in capsys.readouterr().err


def test_report_averages_seeds_lists_unfinished_runs_and_draws_figures(tmp_path, capsys):
    runs = tmp_path / "multirun"
    for seed, acc in ((1, 0.30), (2, 0.32), (3, 0.34)):  # mean 32.00%, sample std 2.00 points
        write_run(runs / "mem" / str(seed), sorting_results("memoria_gpt2_sort", seed, acc), sorting_config(1000, 256))
    write_run(runs / "mem5" / "0", sorting_results("memoria_gpt2_sort", 1, 0.5), sorting_config(1000, 256, 5))
    for length, acc in ((1000, 0.26), (2000, 0.24)):
        for seed in (1, 2):
            write_run(runs / f"gpt2-{length}" / str(seed), sorting_results("gpt2_sort", seed, acc, free=0.27),
                      sorting_config(length, 256))
    for seed, ppl in ((1, 30.0), (2, 32.0)):
        results = {"mode": "train", "task": "wikitext103", "model": "memoria_gpt2", "seed": seed,
                   "global_step": 1000, "test": {"test/ppl": ppl, "test/ppl_mean_of_batches": ppl + 1.0},
                   "monitor": "val/ppl", "best_score": ppl, "wall_time_s": 3600.0}
        write_run(tmp_path / "outputs" / f"wt{seed}", results, lm_config(),
                  curve=[(99, "val/ppl", 80.0), (199, "val/ppl", 50.0), (150, "train/loss", 4.0)])
    # interrupted: started, a checkpoint and logged steps, no results.json; failed: Hydra's folder only
    interrupted = tmp_path / "outputs" / "killed"
    write_run(interrupted, None, sorting_config(4000, 256), curve=[(7, "train/loss", 3.0), (12, "train/loss", 2.9)])
    (interrupted / "checkpoints").mkdir()
    (interrupted / "checkpoints" / "last.ckpt").write_bytes(b"x")
    stopped = tmp_path / "outputs" / "stopped"  # Ctrl-C: partial results.json, status interrupted, resume command
    write_run(stopped, {**sorting_results("memoria_gpt2_sort", 4, 0.0), "status": "interrupted", "test": {},
                        "global_step": 33, "resume_command": "memoria-exp ckpt_path=last.ckpt"},
              sorting_config(1000, 256))
    failed = runs / "mem" / "9"
    (failed / ".hydra").mkdir(parents=True)
    (failed / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(["seed=9", "task.data.length=9"]))
    analysis = tmp_path / "outputs" / "analyze"  # a mode=analyze invocation: no results of its own, not a run
    (analysis / ".hydra").mkdir(parents=True)
    (analysis / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(["mode=analyze", "ckpt_path=x.ckpt"]))
    for folder in (interrupted, failed, analysis):  # old enough not to look like runs still going
        for path in [folder, *folder.rglob("*")]:
            os.utime(path, (time.time() - 3600,) * 2)

    out = tmp_path / "results"
    rows = collect_results.main([str(runs), str(tmp_path / "outputs"), "--out", str(out)])
    assert len(rows) == 3 + 1 + 4 + 2
    report = (out / "report.md").read_text()
    sorting_rows = [line for line in report.splitlines() if line.startswith("| memoria_gpt2_sort | 1000 | 256 |")]
    # the seeds of one setting in one row; the run that differs in memory.initial_lifespan in its own, named
    assert len(sorting_rows) == 2
    three = next(line for line in sorting_rows if "initial_lifespan=3" in line)
    assert "| 3 | 32.00 ± 2.00% | 25.00 ± 0.00% | +7.00 pts |" in three
    assert "| 6000 | 3 epochs | 32-true |" in three
    assert "memory.initial_lifespan=5" in next(line for line in sorting_rows if line is not three)
    gpt2 = [line for line in report.splitlines() if line.startswith("| gpt2_sort |")]
    assert len(gpt2) == 2 and all("| 2 | " in line for line in gpt2)
    # language modelling: both perplexity forms, the paper's number, which form it is compared with
    wt = next(line for line in report.splitlines() if line.startswith("| memoria_gpt2 | 150 | 8 |"))
    assert "| 2 | 31.000 ± 1.414 | 32.000 ± 1.414 | 23.471 |" in wt and "bf16-mixed" in wt
    assert "The paper's column is compared with the second" in report
    # runs without results: listed with what they were and how far they got; the analysis folder is not one
    unfinished = report[report.index("## Runs without results"):report.index("## Every finished run")]
    assert str(interrupted) in unfinished and "interrupted (checkpoint kept) | 12 |" in unfinished
    assert str(failed) in unfinished and "failed before it started" in unfinished and "seed=9" in unfinished
    assert str(analysis) not in report
    assert str(stopped) in unfinished
    assert "| interrupted; resume: `memoria-exp ckpt_path=last.ckpt` | 33 |" in unfinished
    # figures: one per segment size, learning curves per LM dataset; real PNGs the report links
    for name in ("sorting_segment256.png", "learning_curves_wikitext103.png"):
        assert (out / "figures" / name).read_bytes().startswith(PNG_MAGIC)
        assert f"(figures/{name})" in report
    assert "paper (approx.)" in report


def test_report_of_classification_runs_has_mean_std_and_t_tests(tmp_path):
    config = {"task": {"name": "hyperpartisan", "data": {"segment_length": 512}, "module": {}}, "trainer": {}}
    for model, f1s in (("memoria_roberta", (0.96, 0.97, 0.95)), ("roberta", (0.93, 0.94, 0.92))):
        for seed, f1 in enumerate(f1s):
            write_run(tmp_path / "multirun" / model / str(seed),
                      {"mode": "train", "task": "hyperpartisan", "model": model, "seed": seed, "global_step": 10,
                       "test": {"test/macro-f1-final": f1, "test/acc-final": f1}, "monitor": "val/macro-f1-final",
                       "best_score": f1, "wall_time_s": 1.0}, config)
    collect_results.main([str(tmp_path / "multirun"), "--out", str(tmp_path / "results")])
    report = (tmp_path / "results" / "report.md").read_text()
    section = report[report.index("## Classification: hyperpartisan"):report.index("## Every finished run")]
    assert "| memoria_roberta | 3 | 96.00 ± 1.00 |" in section and "| roberta | 3 | 93.00 ± 1.00 |" in section
    assert "| memoria_roberta | roberta | test/macro-f1-final |" in section  # the one-tailed Welch t-test
