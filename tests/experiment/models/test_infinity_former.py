import io
import math

import pytest
import torch

from experiment.models.infinity_former import (
    InfinityFormerConfig,
    InfinityFormerLMHeadModel,
    basis_parameters,
    bin_masses,
    evaluate_basis,
    expected_basis,
    fit_coefficients,
    sticky_positions,
)


def tiny_config(**overrides) -> InfinityFormerConfig:
    kwargs = {
        "vocab_size": 21,
        "n_embd": 32,
        "n_layer": 2,
        "n_head": 2,
        "n_inner": 64,
        "n_positions": 16,
        "num_basis": 16,
        "num_samples": 16,
        "sticky_bins": 8,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
    }
    kwargs.update(overrides)
    return InfinityFormerConfig(**kwargs)


def tiny_model(**overrides) -> InfinityFormerLMHeadModel:
    torch.manual_seed(0)
    return InfinityFormerLMHeadModel(tiny_config(**overrides)).eval()


def segments(batch=2, length=8, n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 21, (batch, length), generator=g) for _ in range(n)]


# ---- the continuous memory's pieces
# -----------------------------------------------------------------------------


def test_basis_groups_one_evenly_spread_set_of_centres_per_width():
    centres, sigmas = basis_parameters(6, [0.005, 0.01])
    torch.testing.assert_close(centres, torch.tensor([0.0, 0.5, 1.0, 0.0, 0.5, 1.0]))
    torch.testing.assert_close(sigmas, torch.tensor([0.005] * 3 + [0.01] * 3))


def test_ridge_regression_reconstructs_a_smooth_signal():
    centres, sigmas = basis_parameters(64, [0.02, 0.04])
    positions = torch.linspace(0, 1, 200)[None]  # (1, P)
    # (1, P, 2)
    signal = torch.stack([torch.sin(2 * math.pi * positions[0]), positions[0] ** 2], dim=-1)[None]
    coeff = fit_coefficients(positions, signal, torch.ones(1, 200), centres, sigmas, ridge_penalty=1e-4)
    reconstruction = evaluate_basis(positions, centres, sigmas) @ coeff
    assert (reconstruction - signal).abs().max() < 0.05
    # zero-weight points are ignored by the fit
    corrupted = signal.clone()
    corrupted[:, ::2] = 100.0
    weights = torch.ones(1, 200)
    weights[:, ::2] = 0
    coeff2 = fit_coefficients(positions, corrupted, weights, centres, sigmas, ridge_penalty=1e-4)
    assert (evaluate_basis(positions, centres, sigmas) @ coeff2 - signal).abs().max() < 0.05


def test_closed_form_expectation_matches_numerical_integration():
    centres, sigmas = basis_parameters(4, [0.05, 0.1])
    mu, var = torch.tensor([0.3, 0.8]), torch.tensor([0.01, 0.0004])
    t = torch.linspace(-2, 3, 200001)
    for m, v in zip(mu, var):
        density = torch.exp(-0.5 * (t - m) ** 2 / v) / torch.sqrt(2 * math.pi * v)
        numeric = torch.trapezoid(density[:, None] * evaluate_basis(t, centres, sigmas), t, dim=0)
        torch.testing.assert_close(expected_basis(m, v, centres, sigmas), numeric, rtol=1e-3, atol=1e-3)


def test_sticky_positions_follow_the_attention_density():
    flat = torch.ones(1, 4)
    torch.testing.assert_close(
        sticky_positions(flat, 4), torch.tensor([[0.125, 0.375, 0.625, 0.875]]), atol=1e-5, rtol=0
    )
    peaked = torch.tensor([[0.0, 0.0, 1.0, 0.0]])  # all attention on [0.5, 0.75)
    samples = sticky_positions(peaked, 10)
    assert ((samples >= 0.5) & (samples <= 0.75)).all()
    assert torch.all(samples[:, 1:] >= samples[:, :-1])
    masses = bin_masses(torch.tensor([0.6]), torch.tensor([0.01]), 4)
    assert masses[0, 2] > 0.99


# ---- the model
# ----------------------------------------------------------------------------------------------------


def test_forward_backward_reaches_every_parameter_and_kl_is_included():
    model = tiny_model().train()
    model.zero_grad()
    for x in segments():
        out = model(x, labels=x)
        assert out.logits.shape == (2, 8, 21) and out.hidden_states.shape == (2, 8, 32)
        assert torch.isfinite(out.loss) and torch.isfinite(out.aux_loss) and out.aux_loss.item() > 0
        out.loss.backward()
    lm_only = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 21), x[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, lm_only + out.aux_loss)
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing
    # the KL term gives the mu/sigma heads gradient on its own
    model.zero_grad()
    model(x).aux_loss.backward()
    assert model.transformer.h[0].ltm.sigma_head.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("sticky", [True, False])
def test_memory_is_carried_and_reset_forgets_it(sticky):
    model = tiny_model(sticky_memories=sticky)
    seg1, seg2, seg3 = segments()
    fresh = model(seg3).logits

    def run(first):
        model.reset_memory()
        model(first)
        model(seg2)
        return model(seg3).logits

    a, b = run(seg1), run((seg1 + 1) % 21)
    assert not torch.allclose(a, b), "segment 1 must reach segment 3 through the continuous memory"
    assert not torch.allclose(a, fresh)
    model.reset_memory()
    torch.testing.assert_close(model(seg3).logits, fresh)


def test_the_memory_signal_holds_the_previous_segment():
    # with many narrow basis functions (and no gate) the first segment's states are recoverable from the
    # signal the second segment read
    model = tiny_model(num_basis=64, basis_widths=[0.01, 0.02], ridge_penalty=1e-3, mask_type="none")
    seg1, seg2, _ = segments()
    model(seg1)
    model(seg2)
    state = model.get_memory_state()
    block_input = model.transformer.wte(seg1) + model.transformer.wpe(torch.arange(8))  # layer 0's input
    positions = ((torch.arange(8) + 1) / 8.0).expand(2, 8)  # no older memory: laid out over (0, 1]
    centres, sigmas = basis_parameters(64, [0.01, 0.02])
    recalled = evaluate_basis(positions, centres, sigmas) @ state["coefficients"][0]
    assert (recalled - block_input).abs().max() < 0.05 * block_input.abs().max()


def test_cnn_mask_learns_from_the_lm_loss():
    model = tiny_model().train()
    seg1, seg2, _ = segments()
    model(seg1)
    model.zero_grad()
    model(seg2, labels=seg2).loss.backward()  # seg2 reads the signal built from seg1 through the gate
    for block in model.transformer.h:
        assert block.ltm.mask_net.weight.grad.abs().sum() > 0
    assert tiny_model(mask_type="none").transformer.h[0].ltm.mask_net is None
    with pytest.raises(ValueError, match="mask_type"):
        tiny_config(mask_type="affine")


def test_per_row_reset_only_forgets_that_row():
    model = tiny_model()
    seg1, seg2, _ = segments()
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


def test_get_set_state_continues_identically_and_refuses_foreign_state():
    model = tiny_model()
    seg1, seg2, seg3 = segments()
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
        model.set_memory_state({"memory_kind": "gpt2_with_memoria"})
    with pytest.raises(ValueError, match="does not fit"):
        model.set_memory_state(dict(state, coefficients=[c[:, :4] for c in state["coefficients"]]))
    with pytest.raises(ValueError, match="layers"):
        model.set_memory_state(dict(state, density=state["density"][:1]))


def test_save_load_round_trip_gives_same_logits(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, InfinityFormerLMHeadModel)
    for x in segments():
        torch.testing.assert_close(loaded(x).logits, model(x).logits)


def test_bad_input_raises_before_compute():
    model = tiny_model()
    with pytest.raises(ValueError, match="longer than"):
        model(torch.zeros(1, 17, dtype=torch.long))
    model(torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="reset_memory"):
        model(torch.zeros(3, 4, dtype=torch.long))
    for bad in (
        {"num_basis": 0},
        {"num_samples": -1},
        {"num_basis": 15},
        {"tau": 1.0},
        {"ridge_penalty": 0.0},
    ):
        with pytest.raises(ValueError):
            tiny_config(**bad)


def test_conf_entries_have_the_paper_shapes():
    from pathlib import Path

    from omegaconf import OmegaConf

    conf = Path(__file__).resolve().parents[3] / "conf" / "model"
    expected = {  # experiments.md §b.1: layers x width x heads, basis functions, samples
        "infinity_former": (12, 768, 12, 150, 150),
        "infinity_former_enwik8": (12, 512, 8, 512, 512),
        "infinity_former_sort": (4, 512, 4, 1024, 1024),
    }
    for name, shape in expected.items():
        entry = OmegaConf.load(conf / f"{name}.yaml")
        assert entry.name == name and entry.class_path.endswith("InfinityFormerLMHeadModel")
        config = InfinityFormerConfig(vocab_size=21, **OmegaConf.to_container(entry.config))
        assert (
            config.n_layer,
            config.n_embd,
            config.n_head,
            config.num_basis,
            config.num_samples,
        ) == shape, name
        assert list(config.basis_widths) == [0.005, 0.01] and config.tau == 0.5 and config.kl_weight == 1e-6
        assert (
            config.sticky_memories and config.mu_0 == -1.0 and config.sigma_0 == 0.05 and config.kl_mean_term
        )
        assert config.mask_type == "cnn" and config.ridge_penalty == 0.5
    assert InfinityFormerConfig(**OmegaConf.load(conf / "infinity_former_sort.yaml").config).n_inner == 2048


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


def test_memory_refit_stays_float32_under_autocast():
    model = tiny_model()
    seg1, seg2, seg3 = segments()
    model(seg1)
    model(seg2)
    expected = model.get_memory_state()["coefficients"][0]
    model.reset_memory()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(seg1)
        model(seg2)
        out = model(seg3)
    assert torch.isfinite(out.logits).all()
    model.reset_memory()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(seg1)
        model(seg2)
    got = model.get_memory_state()["coefficients"][0]
    assert got.dtype == torch.float32
    # only the bf16 gate differs, not the fit: the coefficients stay close to the float32 run's
    torch.testing.assert_close(got, expected, atol=0.05 * expected.abs().max().item(), rtol=0.1)


def test_bf16_weights_keep_a_float32_basis():
    model = tiny_model().to(torch.bfloat16)
    seg1, seg2, _ = segments()
    model(seg1)
    out = model(seg2)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits.float()).all()
    assert model.get_memory_state()["coefficients"][0].dtype == torch.float32


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
    assert recalled > 0.4, recalled
    assert guessed < 0.2, guessed
