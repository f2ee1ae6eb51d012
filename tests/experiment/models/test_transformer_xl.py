import io

import pytest
import torch

from experiment.models.transformer_xl import (
    TransformerXLConfig,
    TransformerXLLMHeadModel,
    attention_allowed,
    rel_shift,
)


def tiny_config(**overrides) -> TransformerXLConfig:
    kwargs = {
        "vocab_size": 21,
        "d_model": 32,
        "n_layer": 2,
        "n_head": 2,
        "d_head": 8,
        "d_inner": 64,
        "mem_len": 12,
        "max_segment_length": 16,
        "dropout": 0.0,
        "dropatt": 0.0,
        "clamp_len": 1000,
    }
    kwargs.update(overrides)
    return TransformerXLConfig(**kwargs)


def tiny_model(**overrides) -> TransformerXLLMHeadModel:
    torch.manual_seed(0)
    return TransformerXLLMHeadModel(tiny_config(**overrides)).eval()


def segments(batch=2, length=8, n=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 21, (batch, length), generator=g) for _ in range(n)]


def test_rel_shift_matches_naive_relative_scores():
    torch.manual_seed(0)
    B, H, Q, M, Dh = 2, 3, 5, 4, 6
    K = M + Q
    q = torch.randn(B, Q, H, Dh)
    r_k = torch.randn(K, H, Dh)  # row c embeds distance K-1-c
    shifted = rel_shift(torch.einsum("bqhd,khd->bhqk", q, r_k))
    for i in range(Q):
        for j in range(M + i + 1):  # every key query i may see
            distance = (M + i) - j
            naive = torch.einsum("bhd,hd->bh", q[:, i], r_k[K - 1 - distance])
            torch.testing.assert_close(shifted[:, :, i, j], naive)


def test_attention_allowed_causal_and_same_length_window():
    allowed = attention_allowed(query_len=3, mem_len_now=2, window=None, device=torch.device("cpu"))
    expected = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(allowed, expected)
    windowed = attention_allowed(query_len=3, mem_len_now=2, window=2, device=torch.device("cpu"))
    expected = torch.tensor([[0, 1, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 0, 1, 1]], dtype=torch.bool)
    assert torch.equal(windowed, expected)


@pytest.mark.parametrize("projections", [False, True])
def test_forward_backward_reaches_every_parameter(projections):
    model = tiny_model(projections=projections).train()
    for x in segments():
        out = model(x, labels=x)
        assert out.logits.shape == (2, 8, 21) and out.hidden_states.shape == (2, 8, 32)
        assert torch.isfinite(out.loss) and out.aux_loss.item() == 0.0
        model.zero_grad()
        out.loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing


@pytest.mark.parametrize("untie_r", [True, False])
def test_memory_equals_attending_over_the_concatenation(untie_r):
    # Memory holds each layer's inputs, which do not depend on later tokens: running seg1 then seg2 must give
    # the same seg2 logits as one pass over [seg1; seg2] (same_length off, memory long enough).
    model = tiny_model(untie_r=untie_r, same_length=False, mem_len=8)
    seg1, seg2 = segments()
    model(seg1)
    carried = model(seg2).logits
    model.reset_memory()
    whole = model(torch.cat([seg1, seg2], dim=1)).logits
    torch.testing.assert_close(carried, whole[:, 8:], atol=1e-5, rtol=1e-5)


def test_memory_is_carried_and_reset_forgets_it():
    model = tiny_model()
    seg1, seg2 = segments()
    other1 = (seg1 + 1) % 21
    fresh = model(seg2).logits
    model.reset_memory()
    model(seg1)
    after_seg1 = model(seg2).logits
    model.reset_memory()
    model(other1)
    after_other = model(seg2).logits
    assert not torch.allclose(after_seg1, after_other)
    assert not torch.allclose(after_seg1, fresh)
    model.reset_memory()
    torch.testing.assert_close(model(seg2).logits, fresh)


def test_per_row_reset_only_forgets_that_row():
    model = tiny_model()
    seg1, seg2 = segments()
    fresh = model(seg2).logits
    model.reset_memory()
    model(seg1)
    state = model.get_memory_state()
    carried = model(seg2).logits
    model.set_memory_state(state)
    model.reset_memory(rows=torch.tensor([True, False]))
    mixed = model(seg2).logits
    torch.testing.assert_close(mixed[0], fresh[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[1], carried[1])
    with pytest.raises(ValueError, match="bool mask"):
        model.reset_memory(rows=torch.tensor([1, 0]))


def test_padding_keys_are_never_read():
    model = tiny_model()
    seg1, seg2 = segments()
    mask = torch.ones_like(seg1, dtype=torch.bool)
    mask[:, 5:] = False
    model(seg1, attention_mask=mask)
    a = model(seg2).logits
    model.reset_memory()
    changed = seg1.clone()
    changed[:, 5:] = (changed[:, 5:] + 3) % 21
    model(changed, attention_mask=mask)
    torch.testing.assert_close(model(seg2).logits, a)


def test_get_set_state_continues_identically_and_refuses_foreign_state():
    model = tiny_model()
    seg1, seg2, seg3 = segments(n=3)
    model(seg1)
    state = model.get_memory_state()
    expected = [model(seg2).logits, model(seg3).logits]
    model.reset_memory()
    # a checkpoint stores the state with torch.save; it must load back safely (weights_only)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    state = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    model.set_memory_state(state)
    got = [model(seg2).logits, model(seg3).logits]
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e)
    with pytest.raises(ValueError, match="kind"):
        model.set_memory_state({"memory_kind": "compressive"})
    with pytest.raises(ValueError, match="not a memory state"):
        model.set_memory_state([1, 2])
    bad = dict(state, mems=[m[..., :4] for m in state["mems"]])
    with pytest.raises(ValueError, match="does not fit"):
        model.set_memory_state(bad)
    with pytest.raises(ValueError, match="layers"):
        model.set_memory_state(dict(state, mems=state["mems"][:1]))


def test_projections_stop_the_tied_head_from_scoring_the_input_token():
    """Without the reference's projections, the post-LN stack hands the (scaled) input embedding to the tied head,
    which then favours the current input token from the start; with them the start is near uniform."""

    def probability_of_the_input(model):
        x = torch.randint(0, 21, (8, 16), generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            probs = model(x).logits.softmax(-1)
        return probs.gather(-1, x[..., None]).mean().item()

    # the width of experiment=sort_cpu's model (the bias grows with it: the logit is ~ init std^2 x width x scale)
    assert probability_of_the_input(tiny_model(d_model=128, d_head=32)) > 0.2  # 1/21 = 0.048 would be uniform
    assert probability_of_the_input(tiny_model(d_model=128, d_head=32, projections=True)) < 0.07
    model = tiny_model(projections=True)
    assert model.lm_head.weight.data_ptr() == model.transformer.word_emb.weight.data_ptr()  # still tied
    assert not torch.equal(model.out_proj.weight, model.transformer.emb_proj.weight)  # projections not tied


@pytest.mark.parametrize("projections", [False, True])
def test_save_load_round_trip_gives_same_logits(tmp_path, projections):
    from transformers import AutoModelForCausalLM

    model = tiny_model(projections=projections)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, TransformerXLLMHeadModel)
    for x in segments():
        torch.testing.assert_close(loaded(x).logits, model(x).logits)


def test_bad_input_raises_before_compute():
    model = tiny_model()
    with pytest.raises(ValueError, match="longer than"):
        model(torch.zeros(1, 17, dtype=torch.long))
    model(torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="reset_memory"):
        model(torch.zeros(3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="mem_len"):
        tiny_config(mem_len=0)
    with pytest.raises(ValueError, match="n_head"):
        tiny_config(n_head=0)


def test_conf_entries_have_the_paper_shapes():
    from pathlib import Path

    from omegaconf import OmegaConf

    conf = Path(__file__).resolve().parents[3] / "conf" / "model"
    expected = {  # experiments.md §b.1: layers x width x heads, d_head, d_inner, mem_len
        "transformer_xl": (12, 768, 12, 64, 3072, 150),
        "transformer_xl_enwik8": (12, 512, 8, 64, 2048, 512),
        "transformer_xl_sort": (4, 512, 4, 128, 2048, 1024),
    }
    for name, shape in expected.items():
        entry = OmegaConf.load(conf / f"{name}.yaml")
        assert entry.name == name and entry.class_path.endswith("TransformerXLLMHeadModel")
        config = TransformerXLConfig(vocab_size=21, **entry.config)
        got = (config.n_layer, config.d_model, config.n_head, config.d_head, config.d_inner, config.mem_len)
        assert got == shape, name
        assert config.same_length and config.clamp_len == 1000 and config.untie_r and config.dropatt == 0.0
        assert config.projections  # the reference's adaptive embedding (div_val 4) projects its one cluster


def test_malformed_segments_are_refused():
    model = tiny_model()
    x = torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="non-empty"):
        model(torch.zeros(2, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask must have the shape"):
        model(x, attention_mask=torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="labels must have the shape"):
        model(x, labels=torch.zeros(2, 3, dtype=torch.long))
    assert model.memory_stats()["mem_length"] == 0.0  # refused before any compute: nothing was written


@pytest.mark.cuda
def test_runs_on_cuda_like_on_cpu():
    model = tiny_model()
    seg1, seg2, *_ = segments()
    on_cpu = [model(seg1).logits, model(seg2).logits]
    model.reset_memory()
    model.cuda()
    on_gpu = [model(seg1.cuda()).logits.cpu(), model(seg2.cuda()).logits.cpu()]
    for gpu, cpu in zip(on_gpu, on_cpu):
        torch.testing.assert_close(gpu, cpu, atol=2e-3, rtol=2e-3)
    state = model.get_memory_state()
    model.cpu()
    model.set_memory_state(state)  # a CUDA state restored onto a CPU model lands on the model's device
    assert model(seg1).logits.device.type == "cpu"


def test_memory_written_under_inference_mode_can_be_trained_on():
    model = tiny_model().train()
    seg1, seg2, *_ = segments()
    with torch.inference_mode():  # Lightning's evaluation default
        model(seg1)
    model(seg2, labels=seg2).loss.backward()
    model.reset_memory(rows=torch.tensor([True, False]))
    model(seg1, labels=seg1).loss.backward()


@pytest.mark.slow
def test_learns_to_recall_the_previous_segment():
    # segment 1: random symbols; segment 2: separators only. The last position of segment 2 must name
    # the first symbol of segment 1, which only the carried memory holds (chance: 0.1).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread is fastest and spares a shared machine
    try:
        model = tiny_model(mem_len=16).train()
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
        g = torch.Generator().manual_seed(0)

        def example(batch):
            seg1 = torch.randint(0, 10, (batch, 8), generator=g)
            return seg1, torch.full((batch, 8), 20), seg1[:, 0]

        for _ in range(300):
            seg1, seg2, target = example(32)
            model.reset_memory()
            with torch.no_grad():
                model(seg1)
            out = model(seg2)
            loss = torch.nn.functional.cross_entropy(out.logits[:, -1], target) + out.aux_loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

        model.eval()
        seg1, seg2, target = example(256)
        with torch.no_grad():
            model.reset_memory()
            model(seg1)
            recalled = (model(seg2).logits[:, -1].argmax(-1) == target).float().mean().item()
            model.reset_memory()  # without the memory the answer is a guess
            guessed = (model(seg2).logits[:, -1].argmax(-1) == target).float().mean().item()
    finally:
        torch.set_num_threads(threads)
    assert recalled > 0.9, recalled
    assert guessed < 0.2, guessed
