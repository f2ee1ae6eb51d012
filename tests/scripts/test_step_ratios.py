"""scripts/step_ratios.py: Memoria's step against the eager plain step, across bench_step runs' JSON files."""

import json

from tests.scripts import load_script


def row(model, config, ms, precision="fp32", pipelined=None):
    return {"model": model, "precision": precision, "config": config, "median_ms": ms, "pipelined_ms": pipelined}


def test_ratios_against_the_eager_plain_step_and_the_plain_model_run_alike(tmp_path, capsys):
    graphed = 'compile=true mode=reduce-overhead options={"a": {"b": 2}}'  # JSON with spaces, as bench_step writes
    runs = {
        "graphed.json": [row("memoria_gpt2_graphed", f"memoria_gpt2 memory.cuda_graph=true {graphed}", 45.0,
                             pipelined=44.0),
                         row("memoria_gpt2_eager_reader",
                             f"memoria_gpt2 memory.cuda_graph=true (reader eager) {graphed}", 46.0),
                         row("gpt2", f"gpt2 {graphed}", 30.0)],
        "eager.json": [row("memoria_gpt2_graphed", "memoria_gpt2 memory.cuda_graph=true", 52.0),
                       row("gpt2", "gpt2", 36.0, pipelined=35.2), row("gpt2", "gpt2", 20.0, "bf16"),
                       row("memoria_gpt2_graphed", "memoria_gpt2 memory.cuda_graph=true", 18.0, "bf16")],
    }
    for name, rows in runs.items():
        (tmp_path / name).write_text(json.dumps(rows))
    entries = load_script("step_ratios").main([str(tmp_path / n) for n in runs] + [str(tmp_path / "missing.json")])
    by = {(e["model"], e["settings"], e["precision"]): e for e in entries}
    by = {key[1:]: e for key, e in by.items() if key[0] == "memoria_gpt2_graphed"}
    reader_eager = next(e for e in entries if e["model"] == "memoria_gpt2_eager_reader")
    assert reader_eager["settings"] == graphed and reader_eager["x_plain_alike"] == 46.0 / 30.0
    assert set(by) == {(graphed, "fp32"), ("eager", "fp32"), ("eager", "bf16")}
    assert by[graphed, "fp32"]["x_plain_eager"] == 45.0 / 36.0 and by[graphed, "fp32"]["x_plain_alike"] == 1.5
    assert by[graphed, "fp32"]["x_plain_eager_pipelined"] == 44.0 / 35.2  # pipelined against pipelined
    assert by["eager", "fp32"]["x_plain_eager_pipelined"] is None  # no pipelined time in that row
    assert by["eager", "fp32"]["x_plain_alike"] == 52.0 / 36.0
    assert by["eager", "bf16"]["x_plain_eager"] == 18.0 / 20.0
    out = capsys.readouterr()
    assert "| met |" in out.out and "not met (needs ≤ 46.80 ms)" in out.out  # 1.25x met; 1.44x not
    assert "skipping" in out.err and "missing.json" in out.err


def test_reads_what_bench_step_writes(tmp_path, capsys):
    path = tmp_path / "step.json"
    load_script("bench_step").main(["--tiny", "--device", "cpu", "--warmup", "1", "--steps", "1", "--precisions",
                                    "fp32", "--json", str(path)])
    [entry] = load_script("step_ratios").main([str(path)])
    assert entry["model"] == "memoria_gpt2" and entry["settings"] == "eager"
    assert entry["x_plain_eager"] == entry["x_plain_alike"] > 0


def test_a_plain_step_with_its_loss_compiled_is_no_eager_baseline(tmp_path):
    """bench_step --loss compiled without compiled blocks: the plain row compiled something, so it is compared
    like for like, never taken as the eager plain step."""
    rows = [row("gpt2", "gpt2 loss=compiled", 31.0), row("memoria_gpt2", "memoria_gpt2 loss=compiled", 40.0),
            row("gpt2", "gpt2", 33.0)]
    (tmp_path / "runs.json").write_text(json.dumps(rows))
    [entry] = load_script("step_ratios").main([str(tmp_path / "runs.json")])
    assert entry["settings"] == "loss=compiled"
    assert entry["plain_eager_ms"] == 33.0 and entry["x_plain_alike"] == 40.0 / 31.0
