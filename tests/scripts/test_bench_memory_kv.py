"""scripts/bench_memory_kv.py: a small CPU run, and the equality check it makes before timing."""

import pytest

from tests.scripts import load_script


def load_bench():
    return load_script("bench_memory_kv")


def test_small_cpu_run_checks_and_times_both_forms(capsys):
    rows = load_bench().main(["--device", "cpu", "--layers", "3", "--width", "24", "--batch-size", "2",
                              "--working", "3", "--reminded", "5", "--warmup", "1", "--steps", "2", "--rounds", "1"])
    assert [r["precision"] for r in rows] == ["fp32", "bf16"]
    assert all(r["per_block_ms"] > 0 and r["batched_ms"] > 0 and r["wide_ms"] > 0 for r in rows)
    # no input gradient for the reminded rows in the batched and the wide forms
    assert all(r["batched_gflop"] == r["wide_gflop"] < r["per_block_gflop"] for r in rows)
    assert "same outputs and gradients" in capsys.readouterr().out


def test_a_wrong_batched_projection_is_caught(monkeypatch):
    bench = load_bench()
    real = bench.stacked_memory_projections

    def off_by_a_bit(blocks, memories):
        return [[(k * 1.01, v) for k, v in block_kv] for block_kv in real(blocks, memories)]

    monkeypatch.setattr(bench, "stacked_memory_projections", off_by_a_bit)
    with pytest.raises(AssertionError):
        bench.main(["--device", "cpu", "--layers", "2", "--width", "24", "--batch-size", "2", "--working", "3",
                    "--reminded", "5", "--warmup", "0", "--steps", "1", "--rounds", "1", "--precisions", "fp32"])


def test_a_wrong_wide_projection_is_caught(monkeypatch):
    bench = load_bench()
    real = bench.wide

    def swapped(blocks, wm, remembered):
        return [[(v, k) for k, v in block_kv] for block_kv in real(blocks, wm, remembered)]

    monkeypatch.setattr(bench, "wide", swapped)
    with pytest.raises(AssertionError, match="wide"):
        bench.main(["--device", "cpu", "--layers", "2", "--width", "24", "--batch-size", "2", "--working", "3",
                    "--reminded", "5", "--warmup", "0", "--steps", "1", "--rounds", "1", "--precisions", "fp32"])
