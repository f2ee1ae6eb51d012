import importlib.util

from tests.conftest import REPO_ROOT


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_step", REPO_ROOT / "scripts" / "bench_step.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
