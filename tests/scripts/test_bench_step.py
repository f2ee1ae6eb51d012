"""scripts/bench_step.py: tiny CPU runs of the training-step benchmark (rounds, FLOPs, phases, profile, options)."""

import json

import pytest

from tests.scripts import load_script


def load_bench():
    return load_script("bench_step")


def test_tiny_cpu_run_times_both_models_side_by_side(capsys):
    rows = load_bench().main(["--tiny", "--device", "cpu", "--warmup", "1", "--steps", "2", "--precisions", "fp32"])
    assert [(r["config"], r["precision"]) for r in rows] == [("memoria_gpt2_tiny", "fp32"), ("gpt2_tiny", "fp32")]
    assert all(r["median_ms"] > 0 and r["steps"] == 2 for r in rows)
    assert rows[1]["x_plain"] == 1.0
    table = capsys.readouterr().out
    assert "memoria_gpt2_tiny" in table and "x plain" in table


def test_flops_are_counted_per_model():
    rows = load_bench().main(["--tiny", "--device", "cpu", "--warmup", "2", "--steps", "1", "--precisions", "fp32",
                              "--flops"])
    memoria, plain = (r["gflop_per_step"] for r in rows)
    assert memoria > plain > 0  # the memory paths add matmuls


def test_rounds_time_every_pair_in_turn():
    rows = load_bench().main(["--tiny", "--device", "cpu", "--warmup", "1", "--steps", "2", "--rounds", "3",
                              "--precisions", "fp32", "--models", "memoria_gpt2", "gpt2", "--optimizer", "foreach"])
    assert all(len(r["round_medians_ms"]) == 3 and r["rounds"] == 3 for r in rows)
    assert all(r["optimizer"] == "foreach" for r in rows)


def test_phases_split_the_step_of_every_model(capsys):
    bench = load_bench()
    rows = bench.main(["--tiny", "--device", "cpu", "--warmup", "1", "--steps", "3", "--rounds", "2",
                       "--precisions", "fp32", "--phases"])
    for row in rows:
        phases = row["phases_ms"]
        assert list(phases) == list(bench.PHASES) and all(ms >= 0 for ms in phases.values())
        assert phases["blocks forward"] > 0 and phases["backward"] > 0
    assert "phases of the step" in capsys.readouterr().out


def test_the_phase_clock_wants_one_mark_per_phase_boundary():
    """No phase missing or counted twice: a step with a mark too many or too few is an error (timed sums are no
    test of that on a shared CPU)."""
    bench = load_bench()
    model = bench.build("gpt2_tiny", "lm", [], 50, bench.torch.device("cpu"))
    clock = bench.PhaseClock(model, bench.torch.device("cpu"))
    for extra in (0, 1, -1):
        for _ in range(len(bench.PHASES) + 1 + extra):
            clock.mark()
        if extra:
            with pytest.raises(RuntimeError, match="phase marks per step"):
                clock.end_step(keep=True)
        else:
            clock.end_step(keep=True)
    assert len(clock.per_step) == 1 and len(clock.per_step[0]) == len(bench.PHASES)
    clock.remove()


def test_profile_lists_the_gemms_by_shape(tmp_path):
    bench = load_bench()
    assert bench.gemm_flops("aten::mm", [[4, 5], [5, 6]]) == 2 * 4 * 5 * 6
    assert bench.gemm_flops("aten::addmm", [[6], [4, 5], [5, 6], [], []]) == 2 * 4 * 5 * 6
    assert bench.gemm_flops("aten::baddbmm", [[3, 1, 6], [3, 4, 5], [3, 5, 6], [], []]) == 2 * 3 * 4 * 5 * 6
    assert bench.gemm_flops("aten::bmm", [[3, 4, 5]]) == 0.0  # not what the op takes: no rate
    path = tmp_path / "profile.txt"
    bench.main(["--tiny", "--device", "cpu", "--warmup", "1", "--steps", "1", "--precisions", "fp32",
                "--models", "memoria_gpt2", "--profile", str(path)])
    text = path.read_text()
    assert "GEMMs by shape (host time; per step)" in text
    assert "aten::baddbmm" in text  # the blocks' memory projections, batched over the blocks


def test_pipelined_steps_are_the_same_steps_back_to_back(capsys):
    import torch

    bench = load_bench()
    rows = bench.main(["--tiny", "--device", "cpu", "--warmup", "1", "--steps", "2", "--precisions", "fp32",
                       "--pipelined"])
    assert all(r["pipelined_ms"] > 0 for r in rows) and rows[1]["x_plain_pipelined"] == 1.0
    assert "pipelined ms" in capsys.readouterr().out
    # the same training as the synchronised steps: equal losses from the same start
    batches = bench.make_batches(4, 2, 16, 1000, 0, torch.device("cpu"))
    losses = {}
    for pipelined in (False, True):
        torch.manual_seed(0)
        model = bench.build("memoria_gpt2_tiny", "tiny", [], 1000, torch.device("cpu"))
        optimizer = bench.make_optimizer(model, "task")
        model.reset_memory()
        if pipelined:
            losses[pipelined] = bench.time_pipelined(model, optimizer, batches, torch.device("cpu"), "fp32")[1]
        else:
            losses[pipelined] = []
            bench.time_steps(model, optimizer, batches, torch.device("cpu"), "fp32", warmup=0, losses=losses[False])
    assert losses[True] == losses[False]


def row(model, config, ms, precision="fp32", pipelined=None):
    return {"model": model, "precision": precision, "config": config, "median_ms": ms, "pipelined_ms": pipelined}


def test_ratios_against_the_eager_plain_step_and_the_plain_model_run_alike():
    graphed = "compile=true mode=reduce-overhead loss=compiled"
    rows = [row("memoria_gpt2", f"memoria_gpt2 {graphed}", 45.0, pipelined=44.0), row("gpt2", f"gpt2 {graphed}", 30.0),
            row("memoria_gpt2", "memoria_gpt2", 52.0), row("gpt2", "gpt2", 36.0, pipelined=35.2),
            row("gpt2", "gpt2", 20.0, "bf16"), row("memoria_gpt2", "memoria_gpt2", 18.0, "bf16"),
            row("gpt2", "gpt2 loss=compiled", 31.0)]  # compiled something: never the eager baseline
    by = {(e["settings"], e["precision"]): e for e in load_bench().ratios(rows)}
    assert set(by) == {(graphed, "fp32"), ("eager", "fp32"), ("eager", "bf16")}
    assert by[graphed, "fp32"]["x_plain_eager"] == 45.0 / 36.0 and by[graphed, "fp32"]["x_plain_alike"] == 1.5
    assert by[graphed, "fp32"]["x_plain_eager_pipelined"] == 44.0 / 35.2  # pipelined against pipelined
    assert by["eager", "fp32"]["x_plain_eager_pipelined"] is None  # no pipelined time in that row
    assert by["eager", "fp32"]["x_plain_alike"] == 52.0 / 36.0
    assert by["eager", "bf16"]["x_plain_eager"] == 18.0 / 20.0
    table = load_bench().format_ratios(list(by.values()))
    assert "| met |" in table and "not met (needs <= 46.80 ms)" in table  # 1.25x met; 1.44x not


def test_a_compiled_run_takes_its_baseline_from_an_earlier_runs_json(tmp_path, capsys):
    """The eager plain step of --baseline's file is the ratios' baseline for a run that has none of its own."""
    bench = load_bench()
    eager = tmp_path / "eager.json"
    bench.main(["--tiny", "--device", "cpu", "--warmup", "1", "--steps", "1", "--precisions", "fp32",
                "--json", str(eager)])
    plain_ms = next(r["median_ms"] for r in json.loads(eager.read_text()) if r["model"] == "gpt2")
    capsys.readouterr()
    rows = bench.main(["--tiny", "--device", "cpu", "--warmup", "1", "--steps", "1", "--precisions", "fp32",
                       "--models", "memoria_gpt2", "--loss", "compiled", "--baseline", str(eager)])
    entries = bench.ratios(rows)
    assert entries[0]["plain_eager_ms"] is None  # this run alone has no plain row
    out = capsys.readouterr().out
    assert f"| memoria_gpt2 | fp32 | loss=compiled | {rows[0]['median_ms']:.2f} | {plain_ms:.2f} |" in out
    with pytest.raises(SystemExit):
        bench.main(["--tiny", "--device", "cpu", "--baseline", str(tmp_path / "missing.json")])
    assert "missing.json" in capsys.readouterr().err


def test_the_loss_is_compiled_with_the_blocks_as_the_cli_does(monkeypatch):
    """--loss task (the default) compiles the LM loss with --compile-blocks, as compile=true does in the LM task;
    --loss eager keeps it eager. Traced with the eager backend (fast on a CPU)."""
    import torch

    import experiment.tasks.language_modeling as lm

    bench = load_bench()
    compiled = []
    real_compile = torch.compile

    def eager_compile(fn=None, **kwargs):
        compiled.append(getattr(fn, "__name__", type(fn).__name__))
        return real_compile(fn, **{**kwargs, "backend": "eager"})

    monkeypatch.setattr(torch, "compile", eager_compile)
    lm.compiled_token_nll.cache_clear()
    try:
        args = ["--tiny", "--device", "cpu", "--warmup", "1", "--steps", "1", "--precisions", "fp32", "--models",
                "gpt2", "--compile-blocks"]
        rows = bench.main(args)
        assert rows[0]["loss"] == "compiled" and "token_nll" in compiled and "loss=compiled" in rows[0]["config"]
        compiled.clear()
        rows = bench.main([*args, "--loss", "eager"])
        assert rows[0]["loss"] == "eager" and "token_nll" not in compiled
    finally:
        lm.compiled_token_nll.cache_clear()
        torch._dynamo.reset()
