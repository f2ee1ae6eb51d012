"""scripts/bench_memoria.py: argument checks, the table, and one tiny real run of our implementation."""

from __future__ import annotations

import json

import pytest

from tests.scripts import load_script


def load_bench():
    return load_script("bench_memoria")


def fake_result(impl: str, ms: float, peak: float) -> dict:
    return {
        "impl": impl,
        "config": "lm",
        "device": "cpu",
        "batch_size": 8,
        "warmup": 5,
        "steps": 10,
        "ms_median": ms,
        "ms_mean": ms,
        "cpu_ms_median": ms / 2,
        "engrams_per_row": 1000.0,
        "peak_mib": peak,
        "options": {} if impl == "reference" else {"weight_form": "exp"},
        "reference_version": "1.1.0",
    }


def test_table_shows_reference_over_ours_ratios() -> None:
    bench = load_bench()
    table = bench.format_table([fake_result("ours", 10.0, 50.0), fake_result("reference", 250.0, 400.0)])
    reference_line = next(line for line in table.splitlines() if "reference 1.1.0" in line)
    assert "| 25.0x (25.0x) | 8.0x |" in reference_line
    ours_line = next(line for line in table.splitlines() if "| ours" in line)
    assert ours_line.endswith("|  |  |  |")


def test_failed_worker_is_reported_in_the_table() -> None:
    bench = load_bench()
    table = bench.format_table([{"impl": "reference", "config": "sort", "device": "cpu", "error": "boom"}])
    assert "failed: boom" in table


@pytest.mark.parametrize(
    "argv", [["--steps", "0"], ["--warmup", "-1"], ["--batch-size", "0"], ["--configs", "nope"]]
)
def test_bad_arguments_are_refused(argv: list) -> None:
    bench = load_bench()
    with pytest.raises(SystemExit):
        bench.parse_args(argv)


def test_missing_reference_venv_names_the_fix(tmp_path) -> None:
    bench = load_bench()
    args = bench.parse_args(["--impl", "reference", "--reference-python", str(tmp_path / "none" / "python")])
    with pytest.raises(SystemExit, match="setup_reference_venv"):
        bench.run_one(args, "reference", "lm", "cpu")


def test_tiny_run_of_ours(tmp_path, capsys) -> None:
    """One real worker subprocess: LM shapes at batch size 1, two timed steps."""
    bench = load_bench()
    out = tmp_path / "bench.json"
    bench.main(
        [
            "--impl",
            "ours",
            "--configs",
            "lm",
            "--device",
            "cpu",
            "--batch-size",
            "1",
            "--warmup",
            "1",
            "--steps",
            "2",
            "--threads",
            "1",
            "--json",
            str(out),
        ]
    )
    record = json.loads(out.read_text())
    (result,) = record["results"]
    assert "error" not in result, result
    assert result["impl"] == "ours" and result["batch_size"] == 1 and result["steps"] == 2
    assert result["ms_median"] > 0 and result["peak_mib"] >= 0
    # Step 1 has no STM, step 2 recalls all 50 STMs (W = 50 = r_stm), step 3 recalls 50 of 100.
    assert result["reminded_width_mean"] == 50
    # 1 warm-up + 2 timed + 2 pipelined steps x W 50, none expired yet (lambda0 = 9)
    assert result["engrams_per_row"] == 250
    assert result["ms_pipelined"] > 0
    assert "| lm | cpu | 1 | ours" in capsys.readouterr().out


def test_counts_the_calls_of_the_gpu_path(tmp_path) -> None:
    bench = load_bench()
    pytest.importorskip("triton", reason="the walk kernel needs Triton")
    counts = {}
    for kernel in ([], ["--walk-kernel-off-gpu"]):
        out = tmp_path / f"bench{len(kernel)}.json"
        bench.main(["--impl", "ours", "--configs", "lm", "--device", "cpu", "--batch-size", "1", "--warmup", "12",
                    "--steps", "1", "--threads", "1", "--static-shape", "--no-validate", "--sync-free-path",
                    "--count-ops", *kernel, "--json", str(out)])
        (result,) = json.loads(out.read_text())["results"]
        counts[bool(kernel)] = calls = result["aten_calls_per_step"]
        assert 0 < calls["not_views"] < calls["all"]
        assert result["reminded_width_mean"] == 100  # static width: r_stm + r_ltm
    # the walk kernel replaces the walk's per-hop gathers and row maxima (11 hops here); the totals also hold the
    # interpreter's own copies, so they are not compared
    assert counts[False]["by_kind"]["max"] - counts[True]["by_kind"]["max"] == 11
    assert counts[False]["by_kind"]["gather"] - counts[True]["by_kind"]["gather"] == 11


def test_profile_appends_a_table_per_run(tmp_path) -> None:
    bench = load_bench()
    profile = tmp_path / "profile.txt"
    bench.main(["--impl", "ours", "--configs", "lm", "--device", "cpu", "--batch-size", "1", "--warmup", "1",
                "--steps", "1", "--threads", "1", "--profile", str(profile)])
    text = profile.read_text()
    assert text.count("==== ours lm cpu") == 1 and "per step" in text and "aten::" in text


def test_score_slots_forces_remind_s_scoring_and_runs_alike(tmp_path) -> None:
    """--score-slots every / candidates: the same run (same store at the end), told apart by the calls it makes
    (one distance matmul a step over the whole store, or one per candidate set)."""
    bench = load_bench()
    results = {}
    for mode in ("every", "candidates"):
        out = tmp_path / f"{mode}.json"
        bench.main(["--impl", "ours", "--configs", "lm", "--device", "cpu", "--batch-size", "1", "--warmup", "12",
                    "--steps", "1", "--threads", "1", "--static-shape", "--no-validate", "--count-ops",
                    "--score-slots", mode, "--json", str(out)])
        (results[mode],) = json.loads(out.read_text())["results"]
        assert results[mode]["options"]["score_slots"] == mode
    every, candidates = results["every"], results["candidates"]
    assert every["engrams_per_row"] == candidates["engrams_per_row"]
    assert every["reminded_width_mean"] == candidates["reminded_width_mean"]
    matmuls = {mode: r["aten_calls_per_step"]["by_kind"]["baddbmm"] for mode, r in results.items()}
    assert (matmuls["every"], matmuls["candidates"]) == (1, 2)


def test_add_and_remind_runs_the_models_one_call(tmp_path) -> None:
    bench = load_bench()
    results = {}
    for flags in ([], ["--add-and-remind"]):
        out = tmp_path / f"bench{len(flags)}.json"
        bench.main(["--impl", "ours", "--configs", "lm", "--device", "cpu", "--batch-size", "1", "--warmup", "12",
                    "--steps", "1", "--threads", "1", "--static-shape", "--no-validate", *flags, "--json", str(out)])
        (results[bool(flags)],) = json.loads(out.read_text())["results"]
    assert results[True]["options"]["add_and_remind"] == "True" and "add_and_remind" not in results[False]["options"]
    assert results[True]["engrams_per_row"] == results[False]["engrams_per_row"]


def test_ltm_search_times_each_search_and_counts_the_ltms_it_scores(tmp_path, capsys) -> None:
    """--ltm-search: one worker per search, each with its Memoria(ltm_search=...); the exhaustive search ranks
    every LTM, so at least as many as the random search's draws, which are at least the walk's finds."""
    bench = load_bench()
    out = tmp_path / "search.json"
    bench.main(["--impl", "ours", "--configs", "lm", "--device", "cpu", "--batch-size", "1", "--warmup", "14",
                "--steps", "1", "--threads", "1", "--static-shape", "--no-validate",
                "--ltm-search", "hebbian", "random", "exhaustive", "--json", str(out)])
    results = json.loads(out.read_text())["results"]
    assert [r.get("options", {}).get("ltm_search", "hebbian") for r in results] == ["hebbian", "random", "exhaustive"]
    scored = {r.get("options", {}).get("ltm_search", "hebbian"): r["ltms_scored_per_row"] for r in results}
    assert scored["exhaustive"] >= scored["random"] >= scored["hebbian"] and scored["exhaustive"] > 0
    assert scored["random"] <= 50 * 11  # at most the 50 recalled STMs' chains of depth + 1
    table = capsys.readouterr().out
    assert "LTMs scored/row" in table and "ltm_search=random" in table


@pytest.mark.parametrize("argv, match", [
    (["--ltm-search", "random"], "ours only"),
    (["--impl", "ours", "--ltm-search", "random", "random"], "twice"),
])
def test_bad_ltm_search_arguments_are_refused(argv: list, match: str, capsys) -> None:
    bench = load_bench()
    with pytest.raises(SystemExit):
        bench.parse_args(argv)
    assert match in capsys.readouterr().err
