"""scripts/bench_walk.py runs end to end (on a CPU: its --smoke mode, the kernel in Triton's interpreter)."""

from __future__ import annotations

import json
import os

import pytest

from tests.scripts import load_script


def load_bench():
    return load_script("bench_walk")


def test_smoke_run_checks_every_variant_against_the_torch_walk(tmp_path, capsys):
    pytest.importorskip("triton", reason="the walk kernel needs Triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the smoke run needs Triton's interpreter (tests/conftest.py sets it without a GPU)")
    out, best = tmp_path / "walk.json", tmp_path / "best.txt"
    assert load_bench().main(["--smoke", "--json", str(out), "--best-to", str(best)]) == 0
    data = json.loads(out.read_text())
    results = data["results"]
    kernels = [r for r in results if "mode" in r]
    assert {r["mode"] for r in kernels} == {"rows", "hops"} and all(r["same"] for r in kernels)
    assert "defaults of memoria/kernels.py" in capsys.readouterr().out
    # the fastest variant, as a MEMORIA_WALK value the kernels module accepts
    fastest = min((r for r in kernels), key=lambda r: r["us"])
    assert data["fastest"] == best.read_text().strip() and f"mode={fastest['mode']}" in data["fastest"]
