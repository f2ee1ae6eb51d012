"""Plain GPT-2 baseline: stock transformers GPT-2 behind the memory protocol, nothing carried over."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config
from transformers import GPT2LMHeadModel as HFGPT2LMHeadModel

from experiment.models.gpt2 import GPT2LMHeadModel, causal_lm_loss
from experiment.models.protocol import MemoryModelOutput

VOCAB = 29


def tiny_config(**overrides) -> GPT2Config:
    kwargs = {
        "vocab_size": VOCAB,
        "n_positions": 16,
        "n_embd": 32,
        "n_layer": 2,
        "n_head": 2,
        "bos_token_id": None,
        "eos_token_id": None,
    }
    kwargs.update(overrides)
    return GPT2Config(**kwargs)


def tiny_model(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(tiny_config()).eval()


def test_no_memory_modules_and_stock_parameter_names():
    model = tiny_model()
    names = [n for n, _ in model.named_parameters()]
    assert not any("memory" in n or "abstractor" in n or "ln_wm" in n for n in names)
    assert set(names) == {n for n, _ in HFGPT2LMHeadModel(tiny_config()).named_parameters()}
    assert model.lm_head.weight is model.transformer.wte.weight


def test_logits_and_loss_match_transformers_gpt2():
    model = tiny_model()
    stock = HFGPT2LMHeadModel(tiny_config()).eval()
    stock.load_state_dict(model.state_dict())
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, VOCAB, (3, 12), generator=g)
    labels = x.clone()
    labels[0, :4] = -100
    out = model(x, labels=labels)
    ref = stock(x, labels=labels)
    assert isinstance(out, MemoryModelOutput)
    torch.testing.assert_close(out.logits, ref.logits)
    torch.testing.assert_close(out.loss, ref.loss)
    assert out.aux_loss.item() == 0.0
    assert out.hidden_states.shape == (3, 12, 32)


def test_segments_are_independent_and_positions_restart():
    model = tiny_model()
    g = torch.Generator().manual_seed(1)
    a, b = torch.randint(0, VOCAB, (2, 2, 10), generator=g)
    with torch.no_grad():
        alone = model(b).logits
        model(a)
        after = model(b).logits
    torch.testing.assert_close(alone, after, rtol=0, atol=0)


def test_protocol_is_a_no_op_and_refuses_foreign_states():
    model = tiny_model()
    assert model.memory_kind == "none"
    assert model.max_segment_length == 16
    state = model.get_memory_state()
    assert state == {"memory_kind": "none"}
    model.set_memory_state(state)
    model.reset_memory()
    model.reset_memory(torch.tensor([True, False]))
    assert model.memory_stats() == {}
    with pytest.raises(ValueError, match="kind"):
        model.set_memory_state({"memory_kind": "gpt2_with_memoria"})
    with pytest.raises(ValueError, match="bool"):
        model.reset_memory(torch.tensor([1, 0]))


def test_rejects_segments_longer_than_the_position_table():
    with pytest.raises(ValueError, match="n_positions"):
        tiny_model()(torch.zeros(1, 17, dtype=torch.long))


def test_save_and_reload(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    loaded = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    x = torch.randint(0, VOCAB, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, loaded(x).logits, rtol=0, atol=0)
    # a stock checkpoint: the Auto classes give transformers' own GPT-2 with the same weights
    stock = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, stock(x).logits, rtol=0, atol=0)


def test_causal_lm_loss_checks_shapes_and_shifts():
    logits = torch.zeros(1, 3, 4)
    logits[0, 0, 2] = 10.0  # position 0 predicts token 2 at position 1
    logits[0, 1, 3] = 10.0
    good = causal_lm_loss(logits, torch.tensor([[0, 2, 3]]))
    bad = causal_lm_loss(logits, torch.tensor([[0, 3, 2]]))
    assert good.item() < 1e-3 < bad.item()
    with pytest.raises(ValueError, match="labels"):
        causal_lm_loss(logits, torch.tensor([[0, 2]]))


def test_causal_lm_loss_equals_the_mean_over_the_shifted_predictions_with_gradients():
    """The last position scores nothing and -100 labels are skipped: the same mean cross-entropy, and the same
    gradient, as slicing the T - 1 predicting positions out of the logits."""
    torch.manual_seed(0)
    logits = torch.randn(3, 6, 11, requires_grad=True)
    labels = torch.randint(0, 11, (3, 6))
    labels[1, 2:4] = -100
    loss = causal_lm_loss(logits, labels)
    (grad,) = torch.autograd.grad(loss, logits)
    sliced = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1))
    (sliced_grad,) = torch.autograd.grad(sliced, logits)
    torch.testing.assert_close(loss, sliced)
    torch.testing.assert_close(grad, sliced_grad)
    assert grad[:, -1].abs().max() == 0  # the last position predicts nothing in the segment
