"""conf/model GPT-2 entries and conf/memory groups: shapes and memory settings of experiments.md §b.1, built
through `build_model` with the memory group interpolated (no Hydra root config needed)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from experiment.models import build_model
from experiment.models.gpt2 import GPT2LMHeadModel
from experiment.models.gpt2_memoria import GPT2WithMemoriaConfig, GPT2WithMemoriaLMHeadModel

CONF = Path(__file__).resolve().parents[3] / "conf"

# name -> (memory group, layers, width, heads, FFN or None, n_positions)
SHAPES = {
    "memoria_gpt2": ("lm", 12, 768, 12, None, 1024),
    "memoria_gpt2_enwik8": ("enwik8", 12, 512, 8, None, 1024),
    "memoria_gpt2_sort": ("sort", 4, 512, 4, 2048, 1024),
    "memoria_gpt2_tiny": ("tiny", 2, 64, 2, None, 256),
    "gpt2": (None, 12, 768, 12, None, 1024),
    "gpt2_enwik8": (None, 12, 512, 8, None, 1024),
    "gpt2_sort": (None, 4, 512, 4, 2048, 1024),
    "gpt2_tiny": (None, 2, 64, 2, None, 256),
}

# memory group -> (W, alpha, r_stm, r_ltm, stm_capacity, depth, lambda0, reset_period)
PAPER_MEMORY = {
    "lm": (50, 8.0, 50, 50, 400, 10, 9, 500),
    "enwik8": (128, 8.0, 192, 192, 1536, 10, 9, 1500),
    "sort": (128, 8.0, 256, 640, 512, 10, 5, 500),
}


def composed(model_name: str, memory: str | None, seed: int | None = None):
    root = {"model": OmegaConf.load(CONF / "model" / f"{model_name}.yaml")}
    if memory is not None:
        root["memory"] = OmegaConf.load(CONF / "memory" / f"{memory}.yaml")
    if seed is not None:
        root["seed"] = seed
    return OmegaConf.create(root)


def model_kwargs(cfg) -> dict:
    kwargs = OmegaConf.to_container(cfg.model.config, resolve=True)
    kwargs["vocab_size"] = 50
    return kwargs


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_model_entry_shapes(name):
    memory, layers, width, heads, ffn, positions = SHAPES[name]
    cfg = composed(name, memory)
    assert cfg.model.name == name and cfg.model.pretrained is None
    config_class = GPT2WithMemoriaConfig if memory else GPT2LMHeadModel.config_class
    config = config_class(**model_kwargs(cfg))  # no weights: the full-size models would be slow on CPU
    assert (config.n_layer, config.n_embd, config.n_head, config.n_inner, config.n_positions) == (
        layers,
        width,
        heads,
        ffn,
        positions,
    )
    assert cfg.model.class_path.endswith("GPT2WithMemoriaLMHeadModel" if memory else "gpt2.GPT2LMHeadModel")
    if not memory:
        assert not any(k.startswith("memoria_") for k in model_kwargs(cfg))


@pytest.mark.parametrize("memory", sorted(PAPER_MEMORY))
def test_memory_groups_hold_the_papers_values(memory):
    config = GPT2WithMemoriaConfig(**model_kwargs(composed("memoria_gpt2", memory)))
    got = (
        config.memoria_num_memories,
        config.memoria_lifespan_extend_scale,
        config.memoria_num_reminded_stm,
        config.memoria_num_reminded_ltm,
        config.memoria_stm_capacity,
        config.memoria_ltm_search_depth,
        config.memoria_initial_lifespan,
        config.memoria_reset_period,
    )
    assert got == PAPER_MEMORY[memory]
    assert config.memoria_weight_form == "exp" and config.memoria_ltm_capacity is None


def test_memory_seed_follows_the_run_seed():
    assert model_kwargs(composed("memoria_gpt2_tiny", "tiny", seed=7))["memoria_seed"] == 7
    assert model_kwargs(composed("memoria_gpt2_tiny", "tiny"))["memoria_seed"] == 42


def test_every_memory_group_has_the_same_keys():
    keys = {p.stem: set(OmegaConf.load(p).keys()) for p in (CONF / "memory").glob("*.yaml")}
    assert {"lm", "enwik8", "sort", "tiny"} <= set(keys)
    assert len({frozenset(k) for k in keys.values()}) == 1


@pytest.mark.parametrize(
    "name, cls", [("memoria_gpt2_tiny", GPT2WithMemoriaLMHeadModel), ("gpt2_tiny", GPT2LMHeadModel)]
)
def test_tiny_entries_build_and_run(name, cls):
    cfg = composed(name, "tiny" if name.startswith("memoria") else None)
    torch.manual_seed(0)
    model = build_model(cfg.model, vocab_size=50)
    assert type(model) is cls and model.config.vocab_size == 50
    x = torch.randint(0, 50, (2, 12))
    for _ in range(3):
        out = model(x, labels=x)
    assert torch.isfinite(out.loss)


def test_memory_override_reaches_the_model():
    cfg = composed("memoria_gpt2_tiny", "tiny")
    cfg.memory.initial_lifespan = 5
    model = build_model(cfg.model, vocab_size=50)
    assert model.config.memoria_initial_lifespan == 5


def test_build_model_loads_a_pretrained_gpt2_into_memoria(tmp_path):
    torch.manual_seed(0)
    stock = GPT2LMHeadModel(
        GPT2LMHeadModel.config_class(
            vocab_size=50,
            n_positions=256,
            n_embd=64,
            n_layer=2,
            n_head=2,
            bos_token_id=None,
            eos_token_id=None,
        )
    )
    stock.save_pretrained(tmp_path)
    cfg = composed("memoria_gpt2_tiny", "tiny")
    cfg.model.pretrained = str(tmp_path)
    model = build_model(cfg.model, vocab_size=50)
    assert isinstance(model, GPT2WithMemoriaLMHeadModel)
    assert model.config.memoria_num_memories == 4
    torch.testing.assert_close(model.transformer.wte.weight, stock.transformer.wte.weight)


def test_hydra_composes_the_groups_with_command_line_overrides(tmp_path):
    """The model and memory groups under Hydra itself, from a throwaway primary config that searches conf/."""
    from hydra import compose, initialize_config_dir

    (tmp_path / "primary.yaml").write_text(
        "defaults:\n  - model: memoria_gpt2_tiny\n  - memory: tiny\n  - _self_\nseed: 3\n"
        f"hydra:\n  searchpath:\n    - file://{CONF}\n"
    )
    with initialize_config_dir(config_dir=str(tmp_path), version_base="1.3"):
        cfg = compose("primary", overrides=["memory=sort", "memory.initial_lifespan=6"])
    kwargs = model_kwargs(cfg)
    assert kwargs["memoria_initial_lifespan"] == 6 and kwargs["memoria_num_reminded_ltm"] == 640
    assert kwargs["memoria_seed"] == 3
