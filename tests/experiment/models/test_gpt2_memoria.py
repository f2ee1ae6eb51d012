"""GPT-2 with Memoria: wiring, carried memory, lifespan delta, loading, protocol (tiny configs, CPU)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel
from transformers.pytorch_utils import Conv1D

import experiment.models  # noqa: F401  (registers the Auto classes)
from experiment.models import gpt2_memoria
from experiment.models.gpt2_memoria import (
    GPT2WithMemoriaBlock,
    GPT2WithMemoriaConfig,
    GPT2WithMemoriaLMHeadModel,
    GPT2WithMemoriaModel,
    joint_memory_values,
    lifespan_delta,
    memory_attention,
    memory_keys_values,
    memory_source,
    stacked_memory_projections,
)
from experiment.models.protocol import MemoryModelOutput

VOCAB = 37
ALPHA = 8.0

MEMORY_PARTS = ("ln_wm", "ln_mem", "memory_attn", "abstractor")


def tiny_config(**overrides) -> GPT2WithMemoriaConfig:
    kwargs = {
        "vocab_size": VOCAB,
        "n_positions": 32,
        "n_embd": 32,
        "n_layer": 2,
        "n_head": 2,
        "bos_token_id": None,
        "eos_token_id": None,
        "memoria_num_memories": 4,
        "memoria_lifespan_extend_scale": ALPHA,
        "memoria_num_reminded_stm": 4,
        "memoria_num_reminded_ltm": 4,
        "memoria_stm_capacity": 8,
        "memoria_ltm_search_depth": 2,
        "memoria_initial_lifespan": 3,
        "memoria_deterministic": True,
        "memoria_seed": 0,
    }
    kwargs.update(overrides)
    return GPT2WithMemoriaConfig(**kwargs)


def perturb_biases(module: torch.nn.Module) -> None:
    """Fresh models have zero biases and unit LayerNorms; perturb them so tests see every term (e.g. an
    output bias that must be masked)."""
    with torch.no_grad():
        for name, param in module.named_parameters():
            if name.endswith("bias") or "ln" in name:
                param.add_(0.1 * torch.randn_like(param))


def tiny_model(seed: int = 0, **overrides) -> GPT2WithMemoriaLMHeadModel:
    torch.manual_seed(seed)
    model = GPT2WithMemoriaLMHeadModel(tiny_config(**overrides)).eval()
    perturb_biases(model)
    return model


def segments(n: int, B: int = 3, T: int = 10, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (B, T), generator=g) for _ in range(n)]


def run(model, segs) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(x).logits for x in segs]


# ---------------------------------------------------------------- config


def test_config_defaults_are_the_papers_lm_settings():
    cfg = GPT2WithMemoriaConfig()
    assert cfg.model_type == "gpt2_with_memoria"
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_positions) == (12, 768, 12, 1024)
    assert (
        cfg.memoria_num_memories,
        cfg.memoria_lifespan_extend_scale,
        cfg.memoria_num_reminded_stm,
        cfg.memoria_num_reminded_ltm,
        cfg.memoria_stm_capacity,
        cfg.memoria_ltm_search_depth,
        cfg.memoria_initial_lifespan,
        cfg.memoria_reset_period,
        cfg.memoria_device,
    ) == (50, 8.0, 50, 50, 400, 10, 9, 500, None)
    assert (
        cfg.memoria_weight_form,
        cfg.memoria_seed,
        cfg.memoria_deterministic,
        cfg.memoria_ltm_capacity,
    ) == ("exp", 0, False, None)


@pytest.mark.parametrize(
    "field, value",
    [
        ("memoria_stm_capacity", 0),
        ("memoria_initial_lifespan", 0),
        ("memoria_initial_lifespan", -1.5),
        ("memoria_num_reminded_stm", -1),
        ("memoria_lifespan_extend_scale", float("nan")),
        ("memoria_reset_period", 0),
        ("memoria_ltm_capacity", 0),
        ("memoria_num_memories", -2),
        ("memoria_weight_form", "cosine"),
        ("memoria_ltm_search", "dfs"),
        ("memoria_use_working_memory", "no"),
        ("memoria_use_short_term", 0),
        ("memoria_use_long_term", None),
    ],
)
def test_config_rejects_bad_memory_settings(field, value):
    with pytest.raises(ValueError, match=field):
        tiny_config(**{field: value})


def test_config_round_trips_through_json(tmp_path):
    cfg = tiny_config(memoria_weight_form="neg_sq", memoria_ltm_capacity=16)
    cfg.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, GPT2WithMemoriaConfig)
    assert loaded.memoria_weight_form == "neg_sq" and loaded.memoria_ltm_capacity == 16


# ---------------------------------------------------------------- forward / backward


def test_forward_backward_reaches_every_parameter():
    model = tiny_model().train()
    segs = segments(3)
    for x in segs[:2]:
        model(x, labels=x).loss.backward()  # segments 1-2: memory path off, then on with M = 0
    model.zero_grad()
    out = model(segs[2], labels=segs[2])  # segment 3: working and reminded memory both in use
    assert isinstance(out, MemoryModelOutput)
    assert out.logits.shape == (3, 10, VOCAB)
    assert out.hidden_states.shape == (3, 10, 32)
    assert out.aux_loss.shape == () and out.aux_loss.item() == 0.0
    assert torch.isfinite(out.loss)
    out.loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []


ABLATIONS = [
    {"memoria_use_working_memory": False},
    {"memoria_use_short_term": False},
    {"memoria_use_long_term": False},
    {"memoria_ltm_search": "random"},
    {"memoria_ltm_search": "random_matched"},
    {"memoria_ltm_search": "exhaustive"},
]


@pytest.mark.parametrize("ablation", ABLATIONS, ids=lambda a: ",".join(f"{k}={v}" for k, v in a.items()))
def test_ablations_reach_memoria_and_train(ablation):
    """Each ablation: Memoria gets the option, and a forward + backward with working and reminded memory runs
    (after enough segments that long-term memory exists, with a long lifespan so engrams survive)."""
    model = tiny_model(memoria_initial_lifespan=6, **ablation).train()
    mem_options = {"memoria_use_short_term": "use_short_term", "memoria_use_long_term": "use_long_term",
                   "memoria_ltm_search": "ltm_search"}
    segs = segments(9)
    for x in segs[:8]:
        model(x, labels=x).loss.backward()
    memoria = model.transformer.memoria
    for field, name in mem_options.items():
        assert getattr(memoria, name) == getattr(model.config, field)
    assert int((memoria.store.types == 3).sum()) > 0  # long-term memory exists
    model.zero_grad()
    out = model(segs[8], labels=segs[8])
    out.loss.backward()
    assert torch.isfinite(out.loss)
    idx = model.transformer.last_reminded_indices
    width = (4 if model.config.memoria_use_short_term else 0) + (4 if model.config.memoria_use_long_term else 0)
    assert idx.shape == (3, width) and bool((idx >= 0).any())  # something was reminded
    block = model.transformer.h[0]
    assert block.ln_mem.weight.grad is not None and block.ln_mem.weight.grad.abs().sum() > 0  # reminded path


def test_without_working_memory_the_wm_attention_path_is_unused():
    """memoria_use_working_memory=False: ln_wm (and the Abstractor, whose WM only the memory path reads, detached)
    get no gradient and do not change the output, while the working memory is still written to Memoria and the
    reminded path still works; with it on, both do (so the checks can fail)."""
    segs = segments(5)
    for use_wm in (True, False):
        model = tiny_model(memoria_use_working_memory=use_wm).train()
        for x in segs[:4]:
            model.zero_grad()
            model(x, labels=x).loss.backward()
        state = copy.deepcopy(model.get_memory_state())
        blocks = model.transformer.h
        wm_grads = [b.ln_wm.weight.grad for b in blocks] + [p.grad for p in model.transformer.abstractor.parameters()]
        assert all(g is not None for g in wm_grads) == use_wm and any(g is not None for g in wm_grads) == use_wm
        assert all(b.ln_mem.weight.grad is not None and b.ln_mem.weight.grad.abs().sum() > 0 for b in blocks)
        assert int(model.transformer.memoria.type_counts()[:, 2:].sum()) > 0  # WM moved on into STM / LTM
        model.eval()  # (no dropout: the two calls below differ only by ln_wm)
        with torch.no_grad():
            before = model(segs[4]).logits
            model.set_memory_state(state)
            for b in blocks:
                b.ln_wm.weight.mul_(3.0)
            after = model(segs[4]).logits
        assert torch.equal(before, after) != use_wm


@pytest.mark.parametrize("override, field, value", [
    ("memory.use_working_memory=false", "memoria_use_working_memory", False),
    ("memory.use_short_term=false", "memoria_use_short_term", False),
    ("memory.use_long_term=false", "memoria_use_long_term", False),
    ("memory.ltm_search=random", "memoria_ltm_search", "random"),
    ("memory.ltm_search=exhaustive", "memoria_ltm_search", "exhaustive"),
    ("memory.ltm_search=random_matched", "memoria_ltm_search", "random_matched"),
])
def test_ablation_overrides_reach_the_model(override, field, value):
    """`memoria-exp memory.<option>=...` sets the model's field in every memoria_gpt2* model config (each reads
    it from the memory group; every memory group has the option, at the paper's default)."""
    from omegaconf import OmegaConf

    from experiment.models import build_model
    from tests.conftest import REPO_ROOT, compose_config

    defaults = {"use_working_memory": True, "use_short_term": True, "use_long_term": True, "ltm_search": "hebbian"}
    for name in ("lm", "enwik8", "sort", "sort_cpu", "tiny"):  # the memory groups of the GPT-2 models
        memory = OmegaConf.load(REPO_ROOT / "conf" / "memory" / f"{name}.yaml")
        assert {k: memory.get(k) for k in defaults} == defaults, name
    models = sorted(p.stem for p in (REPO_ROOT / "conf" / "model").glob("memoria_gpt2*.yaml"))
    assert "memoria_gpt2_tiny" in models
    for name in models:
        cfg = compose_config([f"model={name}", override])
        assert cfg.model.config[field] == value, name
    model = build_model(compose_config(["model=memoria_gpt2_tiny", "memory=tiny", override]).model, VOCAB)
    assert getattr(model.config, field) == value


def test_loss_is_shifted_mean_cross_entropy_with_ignored_labels():
    model = tiny_model()
    x = segments(1)[0]
    labels = x.clone()
    labels[:, :3] = -100
    out = model(x, labels=labels)
    expected = torch.nn.functional.cross_entropy(
        out.logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), ignore_index=-100
    )
    torch.testing.assert_close(out.loss, expected)


def test_rejects_a_segment_longer_than_the_position_table():
    model = tiny_model()
    assert model.max_segment_length == 32
    with pytest.raises(ValueError, match="n_positions"):
        model(torch.zeros(1, 33, dtype=torch.long))


def test_rejects_a_batch_size_change_without_reset():
    model = tiny_model()
    model(torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="reset_memory"):
        model(torch.zeros(3, 5, dtype=torch.long))
    model.reset_memory()
    model(torch.zeros(3, 5, dtype=torch.long))


# ---------------------------------------------------------------- the memory is really used


def test_first_segment_after_reset_has_no_memory_path_and_equals_stock_gpt2():
    model = tiny_model()
    stock = GPT2LMHeadModel(
        GPT2Config(
            **{
                k: v
                for k, v in model.config.to_dict().items()
                if not k.startswith("memoria_")
                and k not in ("model_type", "architectures", "transformers_version")
            }
        )
    ).eval()
    missing, unexpected = stock.load_state_dict(model.state_dict(), strict=False)
    assert missing == [] and all(any(part in k for part in MEMORY_PARTS) for k in unexpected)
    x = segments(1)[0]
    for _ in range(2):  # also after a reset that followed a segment with memory
        with torch.no_grad():
            torch.testing.assert_close(model(x).logits, stock(x).logits)
        assert model.transformer.memoria is None or model.transformer.memoria.engrams.data.numel() == 0
        model(x)
        model(x)  # now memory exists
        model.reset_memory()


def test_segment_two_depends_on_segment_one_but_not_across_a_reset():
    model = tiny_model()
    s1a, s1b, s2 = segments(3)
    model.reset_memory()
    out_a = run(model, [s1a, s2])[1]
    model.reset_memory()
    out_b = run(model, [s1b, s2])[1]
    assert not torch.allclose(out_a, out_b)  # the working memory carried segment 1 into segment 2

    model.reset_memory()
    run(model, [s1a])
    model.reset_memory()
    after_reset_a = run(model, [s2])[0]
    model.reset_memory()
    run(model, [s1b])
    model.reset_memory()
    after_reset_b = run(model, [s2])[0]
    torch.testing.assert_close(after_reset_a, after_reset_b)


def test_reminded_memories_change_the_output():
    """From the third segment Memoria reminds engrams; hiding them (every index -1) changes the logits."""
    segs = segments(3)
    model = tiny_model()
    ref = run(model, segs)
    assert (model.transformer.last_reminded_indices >= 0).any()

    hidden = tiny_model()
    run(hidden, segs[:1])
    run(hidden, segs[1:2])
    memoria = hidden.transformer.memoria
    original = memoria.add_and_remind

    def remind_nothing(*args, **kwargs):
        memories, indices = original(*args, **kwargs)
        return memories, torch.full_like(indices, -1)

    memoria.add_and_remind = remind_nothing
    out = run(hidden, segs[2:])[0]
    assert torch.isfinite(out).all()
    assert not torch.allclose(out, ref[2], atol=1e-4)


def test_second_segment_reminds_nothing_and_stays_finite():
    model = tiny_model()
    s1, s2 = segments(2)
    run(model, [s1])
    logits = run(model, [s2])[0]
    assert torch.isfinite(logits).all()
    assert bool((model.transformer.last_reminded_indices < 0).all())  # static width, all padding


# ---------------------------------------------------------------- memory attention and the lifespan delta


def _attention_module(attn_pdrop: float = 0.0):
    from transformers.models.gpt2.modeling_gpt2 import GPT2Attention

    torch.manual_seed(0)
    attn = GPT2Attention(
        tiny_config(attn_pdrop=attn_pdrop, resid_pdrop=0.0), is_cross_attention=True, layer_idx=0
    )
    perturb_biases(attn)
    return attn


@pytest.mark.parametrize("fused", [True, False])
def test_memory_attention_row_without_valid_memory_is_exactly_zero(fused):
    attn = _attention_module().eval()
    hidden = torch.randn(3, 5, 32)
    memory = torch.randn(3, 4, 32)
    valid = torch.tensor([[True, True, False, False], [False, False, False, False], [True, True, True, True]])
    row_valid = valid.any(1)
    weights = torch.full((3, 5), 1 / 5)
    out, probs = memory_attention(attn, hidden, memory_source(memory, valid, row_valid, weights, attn.num_heads),
                                  fused=fused)
    assert torch.isfinite(out).all() and torch.isfinite(probs).all()
    assert out[1].abs().max().item() == 0.0  # output bias included
    assert probs[1].abs().max().item() == 0.0
    assert probs[0, 2:].abs().max().item() == 0.0  # -1 slots get no attention
    torch.testing.assert_close(probs[[0, 2]].sum(-1), torch.ones(2))
    # a whole batch with M = 0
    empty = memory_source(memory[:, :0], valid[:, :0], torch.zeros(3, dtype=torch.bool), weights, attn.num_heads)
    out0, probs0 = memory_attention(attn, hidden, empty, fused=fused)
    assert out0.abs().max().item() == 0.0 and probs0.shape == (3, 0)


@pytest.mark.parametrize("fused", [True, False])
def test_memory_attention_equals_explicit_masked_softmax_attention(fused):
    attn = _attention_module().eval()
    hidden, memory = torch.randn(3, 5, 32), torch.randn(3, 4, 32)
    valid = torch.tensor([[True, False, True, False], [True, True, True, True], [False, False, False, False]])
    rows = valid.any(1)
    weights = torch.rand(3, 5).softmax(-1)  # query weights: probs averaged over heads and weighted queries
    source = memory_source(memory, valid, rows, weights, attn.num_heads)
    out, mean_probs = memory_attention(attn, hidden, source, fused=fused)
    # by hand: per head, softmax over the valid slots of q.k / sqrt(d), times v, then c_proj; zero without memory
    B, T, H, nh = 3, 5, 32, attn.num_heads
    q = attn.q_attn(hidden).view(B, T, nh, -1).transpose(1, 2)
    k, v = (t.view(B, 4, nh, -1).transpose(1, 2) for t in attn.c_attn(memory).split(H, dim=2))
    scores = (q @ k.transpose(-1, -2)) / (H // nh) ** 0.5
    expect_probs = scores.masked_fill(~valid[:, None, None, :], float("-inf")).softmax(-1).nan_to_num(0.0)
    expect = attn.c_proj((expect_probs @ v).transpose(1, 2).reshape(B, T, H)) * rows[:, None, None]
    torch.testing.assert_close(out, expect)
    torch.testing.assert_close(mean_probs, (expect_probs.mean(1) * weights[:, :, None]).sum(1))
    # no mask and no query weights: plain attention over every slot, no probabilities
    unmasked, no_probs = memory_attention(attn, hidden, memory_source(memory, None, torch.ones(3, dtype=torch.bool)),
                                          fused=fused)
    full = attn.c_proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, H))
    torch.testing.assert_close(unmasked, full)
    assert no_probs is None


@pytest.mark.parametrize("fused", [True, False])
def test_lifespan_probabilities_are_taken_before_attention_dropout(fused):
    attn = _attention_module(attn_pdrop=0.9)
    hidden, memory = torch.randn(2, 5, 32), torch.randn(2, 4, 32)
    valid = torch.tensor([[True, True, True, False], [True, True, True, True]])
    source = memory_source(memory, valid, valid.any(1), torch.full((2, 5), 1 / 5), attn.num_heads)
    torch.manual_seed(1)
    train_out, train_probs = memory_attention(attn.train(), hidden, source, fused=fused)
    eval_out, eval_probs = memory_attention(attn.eval(), hidden, source, fused=fused)
    assert not torch.allclose(train_out, eval_out)  # dropout really acted on the output
    torch.testing.assert_close(train_probs, eval_probs)  # ... but not on the probabilities used for Δ


def test_memory_attention_written_out_equals_the_fused_kernel_with_gradients():
    """fused=False (what a compiled block runs) gives the fused kernel's output, probabilities and gradients, with
    and without a mask (the working memory has a mask but no probabilities)."""
    attn = _attention_module().eval()
    hidden, memory = torch.randn(3, 5, 32), torch.randn(3, 4, 32)
    valid = torch.tensor([[True, False, True, False], [True, True, True, True], [False, False, False, False]])
    for weights in (torch.rand(3, 5).softmax(-1), None):
        source = memory_source(memory, valid, valid.any(1), weights, attn.num_heads)
        results = []
        for fused in (True, False):
            attn.zero_grad()
            h = hidden.clone().requires_grad_()
            out, probs = memory_attention(attn, h, source, fused=fused)
            (out * torch.linspace(-1, 1, 32)).sum().backward()
            results.append((out, probs, h.grad, attn.q_attn.weight.grad.clone(), attn.c_attn.weight.grad.clone()))
        for a, b in zip(*results):
            torch.testing.assert_close(a, b)
        assert (results[0][1] is None) == (weights is None)


def test_memory_attention_writes_itself_out_while_compiling_in_float32(monkeypatch):
    attn = _attention_module().eval()
    hidden, memory = torch.randn(2, 5, 32), torch.randn(2, 4, 32)
    source = memory_source(memory, None, torch.ones(2, dtype=torch.bool))
    calls = []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    memory_attention(attn, hidden, source)
    assert calls == [1]  # eager: the fused kernel
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    memory_attention(attn, hidden, source)
    assert calls == [1]  # while compiling, in float32: written out
    with torch.autocast("cpu", dtype=torch.bfloat16):
        memory_attention(attn, hidden, source)
    assert calls == [1, 1]  # in bf16: the fused kernel (flash kernels on a GPU)


def test_lifespan_delta_hand_checked():
    probs = torch.tensor([[0.5, 0.25, 0.25, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    valid = torch.tensor(
        [[True, True, True, False], [True, False, False, False], [False, False, False, False]]
    )
    delta = lifespan_delta(probs, valid, 8.0)
    # row 0: M_b = 3 -> 0.5*3*8 = 12, 0.25*3*8 = 6; row 1: M_b = 1 -> 8; row 2: nothing
    torch.testing.assert_close(delta, torch.tensor([[12.0, 6.0, 6.0, 0.0], [8.0, 0, 0, 0], [0.0, 0, 0, 0]]))


def _uniform_memory_attention(model):
    with torch.no_grad():
        for block in model.transformer.h:  # zero queries: every valid engram gets the same attention
            block.memory_attn.q_attn.weight.zero_()
            block.memory_attn.q_attn.bias.zero_()


def test_uniform_reminded_attention_extends_every_engram_by_alpha():
    model = tiny_model()
    _uniform_memory_attention(model)
    recorded = []
    segs = segments(6, B=2)
    run(model, segs[:2])
    memoria = model.transformer.memoria
    original = memoria.adjust_lifespan_and_memories

    def spy(indices, delta):
        recorded.append((indices.clone(), delta.clone()))
        return original(indices, delta)

    memoria.adjust_lifespan_and_memories = spy
    model.reset_memory(torch.tensor([False, True]))  # row 1 restarts: it has fewer memories for a while
    run(model, segs[2:])
    assert len(recorded) == 4
    saw_padding = False
    for indices, delta in recorded:
        valid = indices >= 0
        torch.testing.assert_close(delta[valid], torch.full_like(delta[valid], ALPHA))
        assert (delta[~valid] == 0).all()
        saw_padding |= bool((~valid).any())
    assert saw_padding  # some step had rows of different widths (−1 padding), which must not change Δ


def test_dropout_setting_does_not_change_delta_in_eval():
    deltas = []
    for pdrop in (0.0, 0.5):
        model = tiny_model(attn_pdrop=pdrop, resid_pdrop=pdrop, embd_pdrop=pdrop)
        run(model, segments(4))
        deltas.append(model.transformer.last_lifespan_delta)
    assert deltas[0].numel() > 0
    torch.testing.assert_close(deltas[0], deltas[1])


def test_attention_padding_queries_do_not_count_in_delta():
    model = tiny_model()
    segs = segments(3, B=1)
    run(model, segs[:2])
    state = model.get_memory_state()
    x = segs[2]
    padded = torch.cat([x, torch.zeros(1, 4, dtype=torch.long)], 1)
    mask = torch.cat([torch.ones(1, 10), torch.zeros(1, 4)], 1).long()
    with torch.no_grad():
        model(x)
        plain = model.transformer.last_lifespan_delta
        model.set_memory_state(state)
        model(padded, attention_mask=mask)
        with_padding = model.transformer.last_lifespan_delta
    torch.testing.assert_close(with_padding, plain, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------- saving and loading


def test_save_pretrained_round_trip_gives_identical_logits(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, GPT2WithMemoriaLMHeadModel)
    assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()
    segs = segments(4)
    for a, b in zip(run(model, segs), run(loaded, segs)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_stock_gpt2_checkpoint_loads_with_only_memory_parts_new(tmp_path):
    torch.manual_seed(3)
    stock = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=VOCAB,
            n_positions=32,
            n_embd=32,
            n_layer=2,
            n_head=2,
            bos_token_id=None,
            eos_token_id=None,
        )
    ).eval()
    stock.save_pretrained(tmp_path)
    model, info = GPT2WithMemoriaLMHeadModel.from_pretrained(
        tmp_path,
        output_loading_info=True,
        memoria_num_memories=4,
        memoria_stm_capacity=8,
        memoria_num_reminded_stm=4,
        memoria_num_reminded_ltm=4,
        memoria_deterministic=True,
    )
    model.eval()
    assert info["unexpected_keys"] == set() or not info["unexpected_keys"]
    assert not info["mismatched_keys"]
    missing = set(info["missing_keys"])
    assert missing, "the memory parts must be reported as newly initialised"
    assert all(any(part in k for part in MEMORY_PARTS) for k in missing)
    expected_new = {n for n, _ in model.named_parameters() if any(part in n for part in MEMORY_PARTS)}
    assert missing == expected_new
    stock_params = dict(stock.named_parameters())
    for name, param in model.named_parameters():
        if name in stock_params:
            torch.testing.assert_close(param, stock_params[name])
        else:
            assert torch.isfinite(param).all()
    # the new parts got a real initialisation (not leftover memory): LayerNorms at 1/0, small normal weights
    block = model.transformer.h[0]
    assert (block.ln_mem.weight == 1).all() and (block.ln_wm.bias == 0).all()
    query = model.transformer.abstractor.query_embeddings
    assert 0.005 < query.std().item() < 0.05
    assert model.transformer.abstractor.key_transform.bias.abs().max().item() == 0.0
    x = segments(1)[0]
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, stock(x).logits)  # first segment: stock GPT-2 exactly


def test_auto_classes_build_from_config():
    cfg = AutoConfig.for_model(
        "gpt2_with_memoria",
        vocab_size=VOCAB,
        n_positions=16,
        n_embd=16,
        n_layer=1,
        n_head=2,
        bos_token_id=None,
        eos_token_id=None,
        memoria_num_memories=2,
    )
    assert isinstance(cfg, GPT2WithMemoriaConfig)
    assert isinstance(AutoModelForCausalLM.from_config(cfg), GPT2WithMemoriaLMHeadModel)
    base = AutoModel.from_config(cfg)
    assert isinstance(base, GPT2WithMemoriaModel)
    out = base(torch.zeros(1, 4, dtype=torch.long))
    assert out.logits is None and out.hidden_states.shape == (1, 4, 16)
    with pytest.raises(ValueError, match="LMHeadModel"):
        base(torch.zeros(1, 4, dtype=torch.long), labels=torch.zeros(1, 4, dtype=torch.long))
    assert base.memoria is None  # the refused call did not advance the memory


def test_raw_hidden_states_as_working_memory_when_num_memories_is_zero():
    model = tiny_model(memoria_num_memories=0)
    assert model.transformer.abstractor is None
    logits = run(model, segments(3, T=6))
    assert torch.isfinite(logits[-1]).all()
    assert model.transformer.memoria.engrams.data.shape[1] >= 6  # T engrams per step


# ---------------------------------------------------------------- protocol


def test_memory_state_round_trip_continues_identically(tmp_path):
    model = tiny_model()
    segs = segments(6)
    run(model, segs[:3])
    state = model.get_memory_state()
    assert state["memory_kind"] == "gpt2_with_memoria"
    torch.save(state, tmp_path / "state.pt")
    expected = run(model, segs[3:])

    other = copy.deepcopy(model)
    other.reset_memory()
    run(other, segs[:1])  # some unrelated memory that the restore must replace
    other.set_memory_state(torch.load(tmp_path / "state.pt", weights_only=True))
    for a, b in zip(expected, run(other, segs[3:])):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # the snapshot was a copy: restoring it into the original model again replays the same outputs
    model.set_memory_state(state)
    for a, b in zip(expected, run(model, segs[3:])):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_memory_state_of_a_fresh_model_round_trips():
    model = tiny_model()
    state = model.get_memory_state()
    model.set_memory_state(state)
    assert model.transformer.prev_hidden is None


def test_set_memory_state_refuses_foreign_states():
    model = tiny_model()
    with pytest.raises(ValueError, match="kind"):
        model.set_memory_state({"memory_kind": "none"})
    with pytest.raises(ValueError):
        model.set_memory_state({"mems": []})
    with pytest.raises(ValueError):
        model.set_memory_state([1, 2])


def test_memory_stats_counts_engrams_per_type():
    model = tiny_model()
    assert model.memory_stats()["memory/short_term"] == 0.0
    run(model, segments(5))
    stats = model.memory_stats()
    assert stats["memory/short_term"] == 8.0  # the tiny STM capacity is full
    assert stats["memory/long_term"] > 0
    assert stats["memory/working"] == 0.0  # between steps every WM has become STM
    assert stats["memory/reminded"] > 0


def test_per_row_reset_forgets_only_that_row():
    model = tiny_model()
    segs = segments(4, B=2)
    ref = copy.deepcopy(model)
    run(model, segs[:2])
    run(ref, segs[:2])
    model.reset_memory(torch.tensor([False, True]))
    out = run(model, segs[2:])
    ref_out = run(ref, segs[2:])
    for a, b in zip(out, ref_out):
        torch.testing.assert_close(a[0], b[0], atol=1e-5, rtol=1e-4)  # row 0 untouched

    fresh = copy.deepcopy(model)
    fresh.reset_memory()
    alone = run(fresh, [x[1:] for x in segs[2:]])  # row 1 from scratch, on its own
    for a, b in zip(out, alone):
        torch.testing.assert_close(a[1:], b, atol=1e-5, rtol=1e-4)


def test_per_row_reset_validates_its_mask():
    model = tiny_model()
    run(model, segments(1, B=2))
    with pytest.raises(ValueError, match="bool"):
        model.reset_memory(torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="rows"):
        model.reset_memory(torch.tensor([True, False, True]))


def test_batch_rows_are_independent():
    model = tiny_model()
    segs = segments(5, B=3)
    batched = run(model, segs)
    for row in range(3):
        model.reset_memory()
        alone = run(model, [x[row : row + 1] for x in segs])
        for a, b in zip(batched, alone):
            torch.testing.assert_close(a[row : row + 1], b, atol=1e-5, rtol=1e-4)


def test_memory_survives_inference_mode_then_trains():
    """Lightning validates under inference_mode; state carried out of it must not break a backward."""
    model = tiny_model().train()
    segs = segments(4)
    with torch.inference_mode():
        model(segs[0])
        model(segs[1])
    loss = model(segs[2], labels=segs[2]).loss
    loss.backward()
    assert torch.isfinite(loss)


def test_gradient_checkpointing_runs_memoria_once_per_segment():
    model = tiny_model().train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert all(block.gradient_checkpointing for block in model.transformer.h)
    segs = segments(4)
    for x in segs:
        model(x, labels=x).loss.backward()
    memoria = model.transformer.memoria
    assert memoria.timestep == 3  # one add per segment with memory, none replayed by the recomputation
    reference = tiny_model().train()
    for x in segs:
        reference(x)
    assert reference.transformer.memoria.timestep == 3


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_training_with_autocast_and_a_device_move():
    model = tiny_model().train()
    segs = segments(4)
    run(model, segs[:2])  # memory written on the CPU, then the model moves
    model.cuda()
    for x in segs:
        x = x.cuda()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(x, labels=x)
        out.loss.backward()
        assert torch.isfinite(out.loss)
    assert model.transformer.prev_hidden.is_cuda
    assert model.transformer.memoria.store.data.is_cuda
    state = model.get_memory_state()
    model.set_memory_state(state)
    assert model(segs[0].cuda()).logits.is_cuda


def test_zero_init_memory_output_makes_memory_silent_until_trained(tmp_path):
    torch.manual_seed(0)
    model = GPT2WithMemoriaLMHeadModel(tiny_config(memoria_zero_init_memory_output=True)).eval()
    for block in model.transformer.h:
        assert block.memory_attn.c_proj.weight.abs().max() == 0 and block.memory_attn.c_proj.bias.abs().max() == 0
        assert block.attn.c_proj.weight.abs().max() > 0  # only the memory path's output starts at zero
    s1, s2 = segments(2)
    model.reset_memory()
    with_memory = run(model, [s1, s2])[1]
    model.reset_memory()
    without_memory = run(model, [s2])[0]
    torch.testing.assert_close(with_memory, without_memory)  # memory read, but it adds nothing yet
    # the default (the paper's model) starts with a live memory path
    default = tiny_model()
    assert all(b.memory_attn.c_proj.weight.abs().max() > 0 for b in default.transformer.h)
    # the option is saved with the config
    model.save_pretrained(tmp_path)
    assert GPT2WithMemoriaConfig.from_pretrained(tmp_path).memoria_zero_init_memory_output is True


def test_memory_speed_options_reach_memoria_and_change_nothing_on_the_cpu():
    segs = segments(6)
    plain = run(tiny_model(memoria_cuda_graph=False), segs)
    fast = tiny_model(memoria_cuda_graph=True)  # a no-op off a GPU (and the default)
    got = run(fast, segs)
    assert fast.transformer.memoria.cuda_graph
    for a, b in zip(plain, got):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    compiled = tiny_model(memoria_compile=True).transformer._new_memoria()
    assert compiled.compile and compiled.static_shape and not compiled.validate
    assert compiled.fused_walk and not tiny_model(memoria_fused_walk=False).transformer._new_memoria().fused_walk


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_memory_trains_like_the_eager_memory():
    segs = [x.cuda() for x in segments(8)]
    losses = {}
    for graphed in (False, True):
        model = tiny_model(memoria_cuda_graph=graphed).train().cuda()
        model.config.attn_pdrop = model.config.resid_pdrop = model.config.embd_pdrop = 0.0
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        losses[graphed] = []
        for x in segs:
            loss = model(x, labels=x).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses[graphed].append(loss.item())
        if graphed:
            assert len(model.transformer.memoria._graphs.graphs) == 2  # add + remind, adjust: replayed
    torch.testing.assert_close(torch.tensor(losses[True]), torch.tensor(losses[False]))


def sync_free_model(graph_backend=None, **overrides) -> GPT2WithMemoriaLMHeadModel:
    """A tiny model whose Memoria takes the GPU's sync-free path on any device (with `graph_backend`: replays its
    steps through it)."""
    model = tiny_model(**overrides)
    build = model.transformer._new_memoria

    def sync_free_memoria():
        memoria = build()
        memoria._force_sync_free = True
        if graph_backend is not None:
            memoria._graph_backend = graph_backend
        return memoria

    model.transformer._new_memoria = sync_free_memoria
    return model


def test_graphed_memory_gives_the_model_the_same_outputs_with_emulated_graphs():
    """memoria_cuda_graph through the model (its calls, clones and state) with CUDA graphs emulated on the CPU."""
    from tests.memoria.test_graphs import EmulatedGraphs

    segs = segments(8)
    eager = run(tiny_model(memoria_cuda_graph=False), segs)
    backend = EmulatedGraphs()
    model = sync_free_model(graph_backend=backend, memoria_cuda_graph=True)
    for a, b in zip(eager, run(model, segs)):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert backend.replays >= 2 * 4  # the last segments were replayed (add + remind, adjust)


class RecordHostSyncs(TorchDispatchMode):
    """Records the aten calls that read a device value back to the host (each a host-device sync on a GPU)."""

    SYNCS = ("aten._local_scalar_dense", "aten.is_nonzero", "aten.item", "aten.nonzero", "aten.masked_select")

    def __init__(self) -> None:
        super().__init__()
        self.syncs: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func).startswith(self.SYNCS):
            self.syncs.append(str(func))
        return func(*args, **(kwargs or {}))


def test_a_warm_training_step_reads_nothing_back_to_the_host():
    """Without padding, a training step (forward with the memory read and write, backward) makes no host sync:
    on a GPU the host queues the blocks while the memory step runs. A capped memory (fixed store), on the
    memory's sync-free path; the steps before fill the STM and start the LTM."""
    model = sync_free_model(memoria_ltm_capacity=16).train()
    segs = segments(6)
    for x in segs[:5]:
        model(x, labels=x).loss.backward()
    assert model.transformer.memoria.type_counts()[:, 3].min() > 0  # long-term memory in use
    with RecordHostSyncs() as recorder:
        model(segs[5], labels=segs[5]).loss.backward()
    assert recorder.syncs == []


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_training_step_makes_no_host_sync():
    """The same on a GPU, through the real memory step (CUDA graphs) and a fused Adam step, checked by CUDA's
    own sync detection."""
    model = tiny_model(memoria_ltm_capacity=16).train().cuda()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    segs = [x.cuda() for x in segments(7)]

    def step(x):
        model(x, labels=x).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()

    for x in segs[:6]:
        step(x)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step(segs[6])
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_block_projects_both_memories_in_one_gemm_with_the_same_result():
    """Keys and values of the working and the reminded memory come from one c_attn call on the two side by
    side; the block's output and probabilities equal those of projecting each memory on its own."""
    torch.manual_seed(0)
    config = tiny_config()
    block = GPT2WithMemoriaBlock(config, layer_idx=0).eval()
    perturb_biases(block)
    hidden, wm, remembered = torch.randn(3, 5, 32), torch.randn(3, 4, 32), torch.randn(3, 6, 32)
    valid = torch.rand(3, 6) < 0.6
    valid[2] = False  # a row with nothing reminded
    rows = torch.ones(3, dtype=torch.bool)
    working = memory_source(wm, None, rows)
    reminded = memory_source(remembered, valid, valid.any(1), torch.rand(3, 5).softmax(-1), config.n_head)
    calls = []
    block.memory_attn.c_attn.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape))
    out, probs = block(hidden, None, working, reminded)
    assert calls == [(3, 10, 32)]  # one projection of W + M rows

    # the same block, each memory projected on its own
    attn = block.memory_attn
    h = hidden + block.attn(block.ln_1(hidden))[0]
    h = h + memory_attention(attn, block.ln_wm(h), working)[0]
    mem_out, expect_probs = memory_attention(attn, block.ln_mem(h), reminded)
    h = h + mem_out
    expect = h + block.mlp(block.ln_2(h))
    torch.testing.assert_close(out, expect)
    torch.testing.assert_close(probs, expect_probs)
    # the model hands every block the joint values, made once per segment
    assert torch.equal(joint_memory_values(working, reminded), torch.cat([wm, remembered], 1))
    assert joint_memory_values(working, reminded._replace(values=remembered[:, :0])) is wm
    assert joint_memory_values(None, None) is None


def test_stacked_projection_equals_each_blocks_own_and_steps_aside_for_hooks():
    """One batched GEMM per memory for every block's memory keys and values gives each block's c_attn output
    (only a memory that needs a gradient gets an input gradient); a c_attn with a hook (or not a stock Conv1D)
    makes the model fall back to per-block projections."""
    torch.manual_seed(0)
    model = GPT2WithMemoriaModel(tiny_config(n_layer=3))
    perturb_biases(model)
    wm, remembered = torch.randn(2, 4, 32, requires_grad=True), torch.randn(2, 7, 32)
    stacked = stacked_memory_projections(model.h, [wm, remembered])
    assert len(stacked) == 3
    nh, hd = model.h[0].memory_attn.num_heads, model.h[0].memory_attn.head_dim
    for block_kv, block in zip(stacked, model.h):
        assert [k.shape for k, _ in block_kv] == [v.shape for _, v in block_kv] == [(2, nh, 4, hd), (2, nh, 7, hd)]
        assert all(t.is_contiguous() for kv in block_kv for t in kv)  # heads-major: no copy in the blocks
        for (k, v), values in zip(block_kv, (wm, remembered)):
            attn = block.memory_attn
            [(k_own, v_own)] = memory_keys_values(attn, attn.c_attn(values), [values.shape[1]])
            torch.testing.assert_close(k, k_own)
            torch.testing.assert_close(v, v_own)
    assert all(t.requires_grad for t in stacked[0][1])  # through the weights
    sum((t * torch.rand_like(t)).sum() for block_kv in stacked for kv in block_kv for t in kv).backward()
    assert wm.grad is not None and remembered.grad is None
    assert all(block.memory_attn.c_attn.weight.grad.count_nonzero() > 0 for block in model.h)
    handle = model.h[1].memory_attn.c_attn.register_forward_hook(lambda *args: None)
    assert stacked_memory_projections(model.h, [wm]) is None
    handle.remove()
    c_attn = model.h[0].memory_attn.c_attn
    c_attn.forward = c_attn.forward  # a forward of its own (accelerate's device hooks replace it so)
    assert stacked_memory_projections(model.h, [wm]) is None
    del c_attn.forward
    model.h[1].memory_attn.c_attn.double()  # blocks in different dtypes (or on different devices)
    assert stacked_memory_projections(model.h, [wm]) is None
    model.h[1].memory_attn.c_attn.float()
    assert stacked_memory_projections(model.h, [wm]) is not None
    model.h[2].memory_attn.c_attn = torch.nn.Linear(32, 64)  # e.g. what an adapter library puts in its place
    assert stacked_memory_projections(model.h, [wm]) is None


def test_model_with_one_stacked_projection_trains_like_per_block_projections(monkeypatch):
    """Over carried segments, losses and every parameter's gradient are the same whether the model projects all
    blocks' memories in one GEMM or each block projects its own (the stacked path really runs: c_attn's forward
    is never called)."""
    segs = segments(4)

    def train(stacked: bool):
        model = tiny_model(n_layer=3)  # in eval mode: no dropout, gradients all the same
        calls = []
        if not stacked:
            monkeypatch.setattr(gpt2_memoria, "stackable_memory_projections", lambda blocks, device: False)
        memory_projections = {id(block.memory_attn.c_attn) for block in model.transformer.h}
        forward = Conv1D.forward  # counted on the class: a forward of the instance's own turns stacking off

        def counting_forward(module, x):
            if id(module) in memory_projections:
                calls.append(1)
            return forward(module, x)

        monkeypatch.setattr(Conv1D, "forward", counting_forward)
        losses, grads = [], []
        for x in segs:
            out = model(x, labels=x)
            out.loss.backward()
            losses.append(out.loss.detach())
            grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
            model.zero_grad()
        monkeypatch.undo()
        return losses, grads, len(calls)

    losses_stacked, grads_stacked, calls_stacked = train(stacked=True)
    losses_blocks, grads_blocks, calls_blocks = train(stacked=False)
    assert calls_stacked == 0 and calls_blocks == 3 * 3  # 3 blocks x the 3 segments that have memory
    torch.testing.assert_close(torch.stack(losses_stacked), torch.stack(losses_blocks))
    assert any("memory_attn.c_attn" in name for name in grads_stacked[-1])
    for a, b in zip(grads_stacked, grads_blocks):
        assert a.keys() == b.keys()
        for name in a:
            torch.testing.assert_close(a[name], b[name], msg=name)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_stacked_projection_on_cuda_equals_per_block_with_gradients(precision):
    """The batched GEMMs over blocks (an expanded, uncopied input) on the GPU, in float32 and under bf16
    autocast: each block's output and every gradient as its own c_attn gives them."""
    torch.manual_seed(0)
    model = GPT2WithMemoriaModel(tiny_config(n_layer=4, n_embd=64)).cuda()
    perturb_biases(model)
    wm = torch.randn(3, 5, 64, device="cuda", requires_grad=True)
    remembered = torch.randn(3, 9, 64, device="cuda")
    weights = [torch.randn(3, 5 + 9, 128, device="cuda") for _ in model.h]
    results = []
    def own(block):  # each block's keys and values from its own projection, as the stacked path lays them out
        joint = block.memory_attn.c_attn(torch.cat([wm, remembered], 1))
        return memory_keys_values(block.memory_attn, joint, [5, 9])

    def side_by_side(block_kv):  # (B, W + M, 2H), to weigh every output
        return torch.cat([torch.cat([k, v], -1).transpose(1, 2).flatten(2) for k, v in block_kv], 1)

    for fn in (lambda: [side_by_side(kv) for kv in stacked_memory_projections(model.h, [wm, remembered])],
               lambda: [side_by_side(own(block)) for block in model.h]):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16"):
            outs = fn()
            loss = sum((out.float() * w).sum() for out, w in zip(outs, weights))
        loss.backward()
        results.append([*(o.detach().float() for o in outs), wm.grad.clone(),
                        *(p.grad.clone() for p in model.parameters() if p.grad is not None)])
        model.zero_grad(set_to_none=True)
        wm.grad = None
    assert len(results[0]) == len(results[1]) == 4 + 1 + 2 * 4  # outputs, wm, c_attn weights and biases
    for a, b in zip(*results):
        # bf16 rounds products and sums at 2^-8 of the operands' size, not of the element's: an element that
        # cancels to near zero differs by a rounding step of its terms (measured on an H100: a weight gradient's
        # element is ~0.04 in one path and 0 in the other), so the bound scales with the tensor's largest element
        tol = {"atol": 1e-2 * b.abs().max().item(), "rtol": 3e-2} if precision == "bf16" else {}
        torch.testing.assert_close(a, b, **tol)


def test_gradient_checkpointing_gives_the_same_gradients_to_the_memory_parts():
    """With activation checkpointing (transformers' default, non-reentrant) the memory projections made before
    the blocks and the working memory handed to them still carry their gradients: every parameter's gradient
    equals the run without checkpointing."""
    no_dropout = {"attn_pdrop": 0.0, "resid_pdrop": 0.0, "embd_pdrop": 0.0}
    grads = []
    for checkpointing in (False, True):
        model = tiny_model(**no_dropout).train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        for x in segments(3):
            model(x, labels=x).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    assert any("abstractor" in n for n in grads[1]) and any("memory_attn.c_attn" in n for n in grads[1])
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], msg=name)
