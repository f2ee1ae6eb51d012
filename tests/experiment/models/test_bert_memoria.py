"""Memoria BERT / RoBERTa (algorithm.md §e.2): the wiring, equality with transformers' own encoders when the memory
path is off, the save/load round trips and loading a plain checkpoint."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    BertForSequenceClassification,
    RobertaForSequenceClassification,
)

from experiment.models import bert_memoria
from experiment.models.bert_memoria import (
    MemoriaBertConfig,
    MemoriaBertForSequenceClassification,
    MemoriaRobertaConfig,
    MemoriaRobertaForSequenceClassification,
)

TINY = dict(vocab_size=60, hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=40, memory_layer_index=1, memoria_num_memories=4, memoria_num_reminded_stm=4,
            memoria_num_reminded_ltm=4, memoria_stm_capacity=8, memoria_ltm_search_depth=2,
            memoria_initial_lifespan=3, memoria_deterministic=True)
FAMILIES = {
    "bert": (MemoriaBertConfig, MemoriaBertForSequenceClassification, BertForSequenceClassification, 0),
    "roberta": (MemoriaRobertaConfig, MemoriaRobertaForSequenceClassification, RobertaForSequenceClassification, 1),
}


def make(family: str, **overrides):
    config_class, model_class, _, pad = FAMILIES[family]
    torch.manual_seed(0)
    return model_class(config_class(**{**TINY, "pad_token_id": pad, **overrides})).eval()


def trunk(model):
    return model.bert if hasattr(model, "bert") else model.roberta


def batch(pad: int, B: int = 2, T: int = 12, pad_from: int | None = 7, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, TINY["vocab_size"], (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    if pad_from is not None:
        ids[-1, pad_from:], mask[-1, pad_from:] = pad, 0  # the last row ends in padding
    return ids, mask


@pytest.mark.parametrize("family", FAMILIES)
def test_memory_attention_only_above_memory_layer_index(family):
    model = make(family)
    has_memory = [hasattr(layer, "memory_attention") for layer in trunk(model).encoder.layer]
    assert has_memory == [False, False, True, True]  # index 1: layers 2 and 3 read memory


@pytest.mark.parametrize("family", FAMILIES)
def test_equal_to_transformers_own_model_when_the_memory_path_is_off(family, tmp_path):
    model = make(family)
    model.save_pretrained(tmp_path)
    stock = FAMILIES[family][2].from_pretrained(tmp_path).eval()  # the memory parts are ignored by it
    ids, mask = batch(FAMILIES[family][3])
    with torch.no_grad():
        ours = model(ids, attention_mask=mask, use_memory=False).logits
        theirs = stock(ids, attention_mask=mask).logits
    assert torch.equal(ours, theirs)
    assert trunk(model).memoria is None  # nothing was written


@pytest.mark.parametrize("family", FAMILIES)
def test_layers_up_to_the_index_ignore_memory_and_the_abstractor_reads_the_current_segment(family):
    model = make(family)
    layers = trunk(model).encoder.layer
    seen: dict[str, list[torch.Tensor]] = {"layer": [], "abstractor": []}
    hooks = [
        layers[1].register_forward_hook(lambda m, i, o: seen["layer"].append(o.detach().clone())),
        trunk(model).abstractor.register_forward_hook(lambda m, i, o: seen["abstractor"].append(i[0].detach().clone())),
    ]
    ids, mask = batch(FAMILIES[family][3])
    with torch.no_grad():
        model(ids, attention_mask=mask)  # segment 1
        model(ids.flip(1), attention_mask=mask)  # segment 2, memory now holds segment 1
        model(ids.flip(1), attention_mask=mask, use_memory=False)
    for h in hooks:
        h.remove()
    # the Abstractor summarised this segment's layer-1 output (not the previous segment's)
    assert torch.equal(seen["abstractor"][0], seen["layer"][0])
    assert torch.equal(seen["abstractor"][1], seen["layer"][1])
    # up to the index, the memory changes nothing
    assert torch.equal(seen["layer"][1], seen["layer"][2])


@pytest.mark.parametrize("family", FAMILIES)
def test_first_segment_has_an_empty_reminded_set_but_reads_working_memory(family):
    model = make(family)
    ids, mask = batch(FAMILIES[family][3])
    with torch.no_grad():
        first = model(ids, attention_mask=mask).logits
        plain = model(ids, attention_mask=mask, use_memory=False).logits
    t = trunk(model)
    assert bool((t.last_reminded_indices == -1).all())
    assert bool((t.last_lifespan_delta == 0).all())
    assert not torch.allclose(first, plain)  # the working-memory path is active on the first segment
    model.reset_memory()
    with torch.no_grad():
        model(ids, attention_mask=mask)
        model(ids, attention_mask=mask)
    assert bool((t.last_reminded_indices >= 0).any())  # the second segment recalls the first
    assert float(t.last_lifespan_delta.sum()) > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_lifespan_delta_averages_over_non_padding_queries_only(family, monkeypatch):
    model = make(family)
    captured = []
    original = bert_memoria.memory_source

    def spy(memory, memory_valid, row_valid, query_weights=None, num_heads=1):
        if query_weights is not None:
            captured.append(query_weights.clone())
        return original(memory, memory_valid, row_valid, query_weights, num_heads)

    monkeypatch.setattr(bert_memoria, "memory_source", spy)
    ids, mask = batch(FAMILIES[family][3], pad_from=7)
    with torch.no_grad():
        model(ids, attention_mask=mask)
        model(ids, attention_mask=mask)
    weights = captured[-1]  # (B, T) the query weights of the reminded attention (hence of Δ)
    assert torch.allclose(weights[0], torch.full((12,), 1 / 12))
    assert torch.allclose(weights[1, :7], torch.full((7,), 1 / 7)) and bool((weights[1, 7:] == 0).all())
    # uniform attention over the valid reminded engrams would give α each: Δ sums to α·M_b per row at most
    delta, valid = trunk(model).last_lifespan_delta, trunk(model).last_reminded_indices >= 0
    alpha = model.config.memoria_lifespan_extend_scale
    assert torch.allclose(delta.sum(1), alpha * valid.sum(1).float(), rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_an_all_padding_segment_writes_nothing_unless_asked(family):
    pad = FAMILIES[family][3]
    for write_empty, expected in ((False, 0), (True, 4)):
        model = make(family, memoria_write_empty_segments=write_empty)
        ids, mask = batch(pad, pad_from=0)  # the last row is all padding
        with torch.no_grad():
            model(ids, attention_mask=mask)
        counts = trunk(model).memoria.type_counts()[:, 1:].sum(1)  # live engrams per row (column 0: free slots)
        assert counts.tolist() == [4, expected]


@pytest.mark.parametrize("family", FAMILIES)
def test_memory_state_round_trip_gives_the_same_next_segment(family):
    model = make(family)
    ids, mask = batch(FAMILIES[family][3])
    with torch.no_grad():
        model(ids, attention_mask=mask)
        model(ids.flip(1), attention_mask=mask)
        state = model.get_memory_state()
        expected = model(ids, attention_mask=mask).logits
        model.reset_memory()
        model.set_memory_state(state)
        again = model(ids, attention_mask=mask).logits
    assert torch.equal(expected, again)
    with pytest.raises(ValueError, match="kind"):
        model.set_memory_state({"memory_kind": "gpt2_with_memoria", "memoria": None})


@pytest.mark.parametrize("family", FAMILIES)
def test_save_pretrained_round_trip_and_auto_classes(family, tmp_path):
    model = make(family)
    model.save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).model_type == f"memoria_{family}"
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert type(loaded) is type(model) and loaded.new_parameters == []
    ids, mask = batch(FAMILIES[family][3])
    with torch.no_grad():
        assert torch.equal(model(ids, attention_mask=mask).logits, loaded(ids, attention_mask=mask).logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_plain_checkpoint_loads_with_only_the_memory_parts_new(family, tmp_path):
    config_class, model_class, stock_class, pad = FAMILIES[family]
    plain = {k: v for k, v in TINY.items() if not k.startswith("memor")}
    torch.manual_seed(3)
    stock = stock_class(stock_class.config_class(**plain, pad_token_id=pad))  # BertConfig / RobertaConfig
    stock.save_pretrained(tmp_path)
    config = config_class.from_pretrained(tmp_path, memory_layer_index=1, memoria_num_memories=4)
    model = model_class.from_pretrained(tmp_path, config=config)
    prefix = family
    assert model.new_parameters
    assert all(name.startswith(f"{prefix}.abstractor.") or ".memory_attention." in name
               for name in model.new_parameters)
    assert any(name.startswith(f"{prefix}.abstractor.") for name in model.new_parameters)
    stock_state = stock.state_dict()
    for name, tensor in model.state_dict().items():
        if name in stock_state:
            assert torch.equal(tensor, stock_state[name]), name


def test_bad_memory_settings_are_one_line_errors():
    with pytest.raises(ValueError, match="memory_layer_index"):
        MemoriaBertForSequenceClassification(MemoriaBertConfig(**{**TINY, "memory_layer_index": 3}))  # none above
    with pytest.raises(ValueError, match="memoria_stm_capacity"):
        MemoriaRobertaConfig(**{**TINY, "memoria_stm_capacity": 0})
    with pytest.raises(ValueError, match="memoria_num_memories"):
        MemoriaRobertaConfig(**{**TINY, "memoria_num_memories": 0})


@pytest.mark.parametrize("family", FAMILIES)
def test_ablations_reach_the_encoder_and_its_memoria(family):
    """memoria_use_working_memory=False: no working-memory attention (the first segment equals the memory-less
    model, the WM is still written and recalled later); the other three go to Memoria."""
    model = make(family, memoria_use_working_memory=False)
    ids, mask = batch(FAMILIES[family][3])
    with torch.no_grad():
        first = model(ids, attention_mask=mask).logits
        plain = model(ids, attention_mask=mask, use_memory=False).logits
    torch.testing.assert_close(first, plain)  # no WM path, nothing reminded yet
    model.reset_memory()
    with torch.no_grad():
        model(ids, attention_mask=mask)
        model(ids, attention_mask=mask)
    assert bool((trunk(model).last_reminded_indices >= 0).any())  # the written WM is recalled
    model = make(family, memoria_use_long_term=False, memoria_use_short_term=False, memoria_ltm_search="exhaustive")
    with torch.no_grad():
        model(ids, attention_mask=mask)
    memoria = trunk(model).memoria
    assert (memoria.use_short_term, memoria.use_long_term, memoria.ltm_search) == (False, False, "exhaustive")
    with pytest.raises(ValueError, match="memoria_ltm_search"):
        make(family, memoria_ltm_search="bfs")
