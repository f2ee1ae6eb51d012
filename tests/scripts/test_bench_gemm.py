"""scripts/bench_gemm.py: the GEMMs of a training step recorded and timed shape by shape (a tiny CPU run)."""

import torch

from tests.scripts import load_script


def test_tiny_cpu_run_records_and_times_every_gemm_of_both_models():
    bench = load_script("bench_gemm")
    result = bench.main(["--tiny", "--device", "cpu", "--reps", "2", "--rounds", "1"])
    assert result["settings"] == ["default"]  # one library off a GPU
    memoria, plain = result["models"]["memoria_gpt2"], result["models"]["gpt2"]
    assert memoria["calls"] > plain["calls"] > 0 and memoria["gflop"] > plain["gflop"] > 0
    assert memoria["ms_per_step"]["default"] > 0
    assert sum(s["calls"] for s in memoria["shapes"]) == memoria["calls"]
    # the memory keys and values of every block: one batched GEMM per memory over rows shared by the blocks
    assert any(s["gemm"].startswith("baddbmm") and "(bcast)" in s["gemm"] for s in memoria["shapes"])


def test_a_recorded_call_is_replayed_with_its_shapes_and_strides():
    bench = load_script("bench_gemm")
    a, b = torch.randn(6, 4), torch.randn(5, 4).t()  # b: a transposed view
    with bench.GemmRecorder() as recorder:
        expected = torch.mm(a, b)
    [(signature, count)] = recorder.calls.items()
    assert count == 1 and signature[0] == "mm" and bench.flops_of(signature) == 2 * 6 * 4 * 5
    assert bench.describe(signature) == "mm 6x4 @ 4x5ᵀ float32"
    inputs = bench.make_inputs(signature, torch.device("cpu"), torch.Generator().manual_seed(0))
    assert [(t.shape, t.stride()) for t in inputs] == [(a.shape, a.stride()), (b.shape, b.stride())]
    assert bench.run_call(signature, inputs).shape == expected.shape


def test_products_are_also_timed_the_other_way_round():
    bench = load_script("bench_gemm")
    a, b, bias = torch.randn(6, 4), torch.randn(4, 5), torch.randn(5)
    with bench.GemmRecorder() as recorder:
        torch.addmm(bias, a, b)
        torch.bmm(torch.randn(2, 3, 4), torch.randn(2, 4, 5))
    addmm, bmm = sorted(recorder.calls, key=lambda s: s[0])[0], sorted(recorder.calls, key=lambda s: s[0])[1]
    signature, args = bench.transposed_call(addmm, [bias, a, b])
    assert signature[0] == "mm" and bench.flops_of(signature) == bench.flops_of(addmm)
    torch.testing.assert_close(bench.run_call(signature, args).t() + bias, torch.addmm(bias, a, b))
    assert bench.transposed_call(bmm, bench.make_inputs(bmm, torch.device("cpu"), torch.Generator())) is None
    split = bench.split_k_call(addmm, [bias, a, b], 2)
    torch.testing.assert_close(split() + bias, torch.addmm(bias, a, b))
    b_t = torch.randn(5, 4).t()  # a transposed operand: the slices follow its strides
    torch.testing.assert_close(bench.split_k_call(addmm, [bias, a, b_t], 4)(), a @ b_t)
    assert bench.split_k_call(addmm, [bias, a, b], 3) is None  # 3 does not divide K = 4
    result = bench.main(["--tiny", "--device", "cpu", "--reps", "1", "--rounds", "1", "--models", "gpt2",
                         "--transposed", "--split-k", "2"])
    assert result["settings"] == ["default", "transposed", "split-K 2", "best"]
    step = result["models"]["gpt2"]["ms_per_step"]
    assert step["best"] <= min(step["default"], step["transposed"], step["split-K 2"]) + 1e-9
