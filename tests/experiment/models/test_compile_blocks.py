"""compile=true: every model's repeated blocks compile in place and compute what the eager model computes, with
the memory carried between segments as before (backend "eager" here: the tracing, not the code generation)."""

from __future__ import annotations

import copy

import pytest
import torch

from experiment.models import build_model, compile_blocks
from tests.conftest import compose_config

MODELS = ["memoria_gpt2_tiny", "gpt2_tiny", "transformer_xl_tiny", "compressive_tiny", "infinity_former_tiny"]


def losses(model, segments) -> list[torch.Tensor]:
    out = []
    for x in segments:
        loss = model(x, labels=x).loss
        loss.backward()
        out.append(loss.detach())
    return out


@pytest.mark.parametrize("name", MODELS)
def test_compiled_blocks_compute_what_the_eager_model_computes(name):
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = build_model(compose_config([f"model={name}", "memory=tiny"]).model, vocab_size=40).eval()
    compiled = copy.deepcopy(eager)
    count = compile_blocks(compiled, backend="eager")
    assert count == compiled.config.n_layer
    assert compiled.state_dict().keys() == eager.state_dict().keys()  # checkpoints are interchangeable
    g = torch.Generator().manual_seed(1)
    segments = [torch.randint(0, 40, (2, 12), generator=g) for _ in range(4)]  # carried memory across them
    for a, b in zip(losses(eager, segments), losses(compiled, segments)):
        torch.testing.assert_close(a, b)
    for (name_a, p), (_, q) in zip(eager.named_parameters(), compiled.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name_a)
    torch._dynamo.reset()


def test_compile_refuses_a_model_without_blocks():
    with pytest.raises(ValueError, match="declares no transformer blocks"):
        compile_blocks(torch.nn.Linear(2, 2))


def test_compile_settings_merge_the_modes_options_with_the_given_ones():
    from experiment.models import compile_settings, graphs_replayed

    assert compile_settings() == {} and not graphs_replayed({})
    assert compile_settings("reduce-overhead") == {"mode": "reduce-overhead"}
    assert graphs_replayed({"mode": "reduce-overhead"}) and not graphs_replayed({"mode": "default"})
    merged = compile_settings("max-autotune", {"coordinate_descent_tuning": False})
    assert merged["options"]["max_autotune"] and not merged["options"]["coordinate_descent_tuning"]  # given ones win
    assert graphs_replayed(merged)
    assert not graphs_replayed(compile_settings(None, {"max_autotune": True}))
