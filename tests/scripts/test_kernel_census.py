"""scripts/kernel_census.py: inductor's GPU-style code for the compiled step, counted on a CPU.

Run in a subprocess: the script switches inductor to its Triton backend and stubs kernel compilation for the
whole process."""

import json
import subprocess
import sys

import pytest

from tests.scripts import SCRIPTS

pytest.importorskip("triton", reason="the census makes inductor write Triton code")


def census(tmp_path, *args: str) -> dict:
    out = tmp_path / "census.json"
    completed = subprocess.run([sys.executable, str(SCRIPTS / "kernel_census.py"), "--warmup", "3", "--batch-size",
                                "2", "--json", str(out), *args], capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "| call | Triton kernels |" in completed.stdout
    return json.loads(out.read_text())


def test_counts_the_kernels_of_each_compiled_call(tmp_path):
    result = census(tmp_path)
    assert result["capacity"] == 400 + 1024 + 50 and result["score_every_slot"]
    rows = {row["call"]: row for row in result["rows"]}
    assert list(rows) == ["add_remind", "adjust"]
    add_remind = rows["add_remind"]
    # outside inductor's kernels only: the walk (one kernel) and one matmul scoring the store; both rankings by
    # counting, the picks of free slots and candidates (a running count and a search) and every write into the
    # store are fused kernels
    assert add_remind["calls_by_op"] == {"baddbmm": 1, "walk": 1}
    assert add_remind["triton_kernels"] > 10 and rows["adjust"]["triton_kernels"] > 2
    assert sum(add_remind["kernels"].values()) == add_remind["triton_kernels"]


def test_two_calls_and_gathered_candidates(tmp_path):
    rows = {row["call"]: row for row in census(tmp_path, "--two-calls", "--score-slots", "candidates")["rows"]}
    assert list(rows) == ["add", "remind", "adjust"]
    assert rows["remind"]["calls_by_op"]["baddbmm"] == 2  # the STM candidates, then the found LTMs


def test_counts_a_models_compiled_blocks(tmp_path):
    """--blocks: Memoria GPT-2's blocks compile twice (the first segment has no memory); with memory a block runs
    8 linear GEMMs forward (its memory keys and values come projected, heads-major, from before the blocks) and
    copies for its attentions' layouts only: q and the output of each attention (a block that laid out its own
    memory keys and values had 13)."""
    rows = {row["call"]: row for row in census(tmp_path, "--blocks", "memoria_gpt2", "--tiny")["rows"]}
    reader = {name.split()[1].split("_")[1]: rows.pop(name) for name in list(rows) if name.startswith("MemoryReader")}
    abstractor = {name.split()[1].split("_")[1]: rows.pop(name) for name in list(rows) if name.startswith("Abstractor")}
    assert list(rows) == ["block 0_forward", "block 0_backward", "block 1_forward", "block 1_backward"]
    # the Abstractor, compiled with the blocks too: its GEMMs and a few fused kernels (softmax over the segment)
    assert set(abstractor) == {"forward", "backward"}
    assert abstractor["forward"]["calls_by_op"].get("bmm", 0) + abstractor["forward"]["calls_by_op"]["mm"] >= 4
    # the memory reader: both memories' batched projections, and its stacks (the blocks' weights and biases;
    # backward, the keys' and values' gradients) as one kernel each (without its inductor options, 2 + 4 more)
    assert reader["forward"]["calls_by_op"] == {"baddbmm": 2} and reader["forward"]["triton_kernels"] <= 7
    assert reader["backward"]["calls_by_op"] == {"bmm": 3} and reader["backward"]["triton_kernels"] <= 6
    forward = rows["block 1_forward"]
    assert forward["calls_by_op"] == {"addmm": 8, "bmm": 6}
    assert sum(n for kernel, n in forward["kernels"].items() if "clone" in kernel) <= 8
    assert rows["block 1_backward"]["triton_kernels"] > rows["block 0_backward"]["triton_kernels"]
