import io

import pytest
import torch

from experiment.models.compressive import CompressiveConfig, CompressiveLMHeadModel


def tiny_config(**overrides) -> CompressiveConfig:
    kwargs = {
        "vocab_size": 21,
        "d_model": 32,
        "n_layer": 2,
        "n_head": 2,
        "d_inner": 64,
        "mem_len": 8,
        "cmem_len": 4,
        "compression_ratio": 4,
        "max_segment_length": 16,
        "dropout": 0.0,
        "attn_dropout": 0.0,
    }
    kwargs.update(overrides)
    return CompressiveConfig(**kwargs)


def tiny_model(**overrides) -> CompressiveLMHeadModel:
    torch.manual_seed(0)
    model = CompressiveLMHeadModel(tiny_config(**overrides)).eval()
    with torch.no_grad():  # a non-zero position table, so positions matter in the tests
        for layer in model.transformer.layers:
            layer.attn.rel_pos_bias.normal_(0.0, 0.5)
    return model


def segments(batch=2, length=8, n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 21, (batch, length), generator=g) for _ in range(n)]


def test_forward_backward_reaches_every_parameter_and_aux_loss_is_included():
    model = tiny_model().train()
    model.zero_grad()
    for x in segments():
        out = model(x, labels=x)
        assert out.logits.shape == (2, 8, 21) and out.hidden_states.shape == (2, 8, 32)
        assert torch.isfinite(out.loss) and torch.isfinite(out.aux_loss)
        out.loss.backward()
    # from the second segment on, states are evicted and compressed, so the reconstruction loss is live
    assert out.aux_loss.item() > 0
    lm_only = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 21), x[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, lm_only + out.aux_loss)
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing


def test_reconstruction_loss_trains_only_the_compression_and_freezes_nothing():
    model = tiny_model()
    seg1, seg2 = segments(n=2)
    model(seg1)
    out = model(seg2)
    model.zero_grad()
    out.aux_loss.backward()
    for name, p in model.named_parameters():
        assert p.requires_grad, f"{name} was frozen"
        has_grad = p.grad is not None and p.grad.abs().sum() > 0
        assert has_grad == (".compress." in name), name
    # a training step on the LM loss still moves the key/value projections (the reference froze them)
    model.zero_grad()
    model.set_memory_state(model.get_memory_state())
    model(seg1, labels=seg1).loss.backward()
    assert model.transformer.layers[0].attn.kv_proj.weight.grad.abs().sum() > 0


def test_memory_without_compression_equals_attending_over_the_concatenation():
    # memory holds each layer's inputs (no enhanced recurrence) and nothing is compressed yet
    model = tiny_model(enhanced_recurrence=False, mem_len=8)
    seg1, seg2, _ = segments()
    model(seg1)
    carried = model(seg2).logits
    model.reset_memory()
    whole = model(torch.cat([seg1, seg2], dim=1)).logits
    torch.testing.assert_close(carried, whole[:, 8:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("enhanced_recurrence", [True, False])
def test_memory_is_carried_through_the_compressed_memory_and_reset_forgets_it(enhanced_recurrence):
    model = tiny_model(enhanced_recurrence=enhanced_recurrence)
    seg1, seg2, seg3 = segments()
    fresh = model(seg3).logits

    def run(first):
        model.reset_memory()
        model(first)
        model(seg2)  # pushes `first` out of mem (mem_len 8) into cmem
        assert model.memory_stats()["cmem_length"] == 2.0
        return model(seg3).logits

    a, b = run(seg1), run((seg1 + 1) % 21)
    assert not torch.allclose(a, b), "segment 1 reaches segment 3 only through the compressed memory"
    model.reset_memory()
    torch.testing.assert_close(model(seg3).logits, fresh)


def test_per_row_reset_only_forgets_that_row():
    model = tiny_model()
    seg1, seg2, seg3 = segments()
    fresh = model(seg3).logits
    model.reset_memory()
    model(seg1)
    model(seg2)
    state = model.get_memory_state()
    carried = model(seg3).logits
    model.set_memory_state(state)
    model.reset_memory(rows=torch.tensor([False, True]))
    mixed = model(seg3).logits
    torch.testing.assert_close(mixed[1], fresh[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[0], carried[0])


def test_get_set_state_continues_identically_and_refuses_foreign_state():
    model = tiny_model()
    seg1, seg2, seg3 = segments()
    model(seg1)
    model(seg2)
    state = model.get_memory_state()
    expected = [model(seg3).logits, model(seg1).logits]
    model.reset_memory()
    # a checkpoint stores the state with torch.save; it must load back safely (weights_only)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    state = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    model.set_memory_state(state)
    got = [model(seg3).logits, model(seg1).logits]
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e)
    with pytest.raises(ValueError, match="kind"):
        model.set_memory_state({"memory_kind": "transformer_xl", "mems": state["mems"]})
    with pytest.raises(ValueError, match="does not fit"):
        model.set_memory_state(dict(state, cmems=[m[:, :, :8] for m in state["cmems"]]))
    too_long = torch.ones(2, 9, dtype=torch.bool)
    with pytest.raises(ValueError, match="does not fit"):
        model.set_memory_state(dict(state, mem_valid=too_long))


def test_save_load_round_trip_gives_same_logits(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, CompressiveLMHeadModel)
    for x in segments():
        torch.testing.assert_close(loaded(x).logits, model(x).logits)
        torch.testing.assert_close(loaded(x).aux_loss, model(x).aux_loss)


def test_bad_input_raises_before_compute():
    model = tiny_model()
    with pytest.raises(ValueError, match="longer than"):
        model(torch.zeros(1, 17, dtype=torch.long))
    model(torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="reset_memory"):
        model(torch.zeros(3, 4, dtype=torch.long))
    for bad in ({"mem_len": 0}, {"cmem_len": -1}, {"mem_len": 2}, {"n_head": 3}, {"compression_ratio": 0}):
        with pytest.raises(ValueError):
            tiny_config(**bad)


def test_conf_entries_have_the_paper_shapes():
    from pathlib import Path

    from omegaconf import OmegaConf

    conf = Path(__file__).resolve().parents[3] / "conf" / "model"
    expected = {  # experiments.md §b.1: layers x width x heads, mem_len, cmem_len, max segment
        "compressive": (12, 768, 12, 75, 75, 512),
        "compressive_enwik8": (12, 512, 8, 256, 256, 512),
        "compressive_sort": (4, 512, 4, 512, 512, 1024),
    }
    for name, shape in expected.items():
        entry = OmegaConf.load(conf / f"{name}.yaml")
        assert entry.name == name and entry.class_path.endswith("CompressiveLMHeadModel")
        config = CompressiveConfig(vocab_size=21, **entry.config)
        got = (
            config.n_layer,
            config.d_model,
            config.n_head,
            config.mem_len,
            config.cmem_len,
            config.max_segment_length,
        )
        assert got == shape, name
        assert config.compression_ratio == 4 and config.enhanced_recurrence
        assert config.reconstruction_loss_weight == 1.0


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


def test_nothing_compressed_still_keeps_the_compression_in_the_graph():
    model = tiny_model()
    out = model(segments(n=1)[0])  # first segment: nothing is evicted yet
    assert out.aux_loss.item() == 0.0
    out.aux_loss.backward()
    grad = model.transformer.layers[0].compress.weight.grad
    assert grad is not None and torch.count_nonzero(grad) == 0  # used (for DDP), but contributes exactly zero


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
        model = tiny_model().train()
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
    assert recalled > 0.3, recalled
    assert guessed < 0.2, guessed
