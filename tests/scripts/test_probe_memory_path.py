"""scripts/probe_memory_path.py: a few real training steps of the tiny Memoria GPT-2, with the memory path recorded."""

from __future__ import annotations

import math

import pytest

from tests.scripts import load_script

probe = load_script("probe_memory_path")

TINY = ["--model", "memoria_gpt2_tiny", "--memory", "tiny", "--length", "40", "--segment", "32",
        "--batch-size", "4", "--steps", "3", "--every", "1"]


def test_records_both_memory_paths_per_layer(capsys):
    rows = probe.main(TINY)
    assert [r["step"] for r in rows] == [0, 1, 2]
    for row in rows:
        assert math.isfinite(row["loss"]) and row["hidden_spread"] > 0
        assert len(row["wm"]) == 2 and len(row["mem"]) == 2  # one entry per layer of the 2-layer model
    assert "hidden spread" in capsys.readouterr().out


def test_zero_init_silences_the_memory_output_at_the_start():
    (first,) = probe.main([*TINY[:-4], "--steps", "1", "--every", "1", "--zero-init-memory-output"])
    assert all(norm == 0.0 for norm, _ in first["wm"] + first["mem"])


def test_answer_must_lie_in_the_last_segment():
    with pytest.raises(SystemExit, match="last segment"):
        probe.main(["--model", "gpt2_tiny", "--memory", "tiny", "--length", "40", "--segment", "50", "--steps", "1"])
