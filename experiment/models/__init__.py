"""Models of the project. Importing this package registers every model type with transformers' Auto classes."""

from __future__ import annotations

import importlib
from typing import Any

# Importing each model file registers its model type with the Auto classes.
from . import (  # noqa: F401
    bert_memoria,
    compressive,
    gpt2,
    gpt2_memoria,
    infinity_former,
    long_document,
    transformer_xl,
)
from .protocol import MemoryModelOutput, MemoryProtocol

__all__ = [
    "MemoryModelOutput", "MemoryProtocol", "build_model", "compile_blocks", "compile_settings", "graphs_replayed",
]


def build_model(model_cfg: Any, vocab_size: int):
    """Build the model a `conf/model/*.yaml` entry describes, with the vocabulary size of the data.

    `model_cfg` has `class_path`, `config` (kwargs of the model's PretrainedConfig) and optional `pretrained`.
    """
    cfg = dict(model_cfg)
    class_path = cfg.get("class_path")
    if not class_path or "." not in class_path:
        raise ValueError(
            f"model config needs a class_path like 'experiment.models.gpt2.GPT2LMHeadModel', got {class_path!r}"
        )
    module_name, _, class_name = class_path.rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name)
    kwargs = dict(cfg.get("config") or {})
    kwargs["vocab_size"] = vocab_size
    pretrained = cfg.get("pretrained")
    if pretrained:
        try:
            config = cls.config_class.from_pretrained(pretrained, **kwargs)
            return cls.from_pretrained(pretrained, config=config)
        except OSError as error:  # offline, unknown name, missing folder: one line naming the option
            from experiment.data.errors import DataUnavailableError

            raise DataUnavailableError(
                f"cannot load the checkpoint model.pretrained={pretrained} ({type(error).__name__}); point "
                "model.pretrained at a local checkpoint folder, or set model.pretrained=null to train from scratch."
            ) from None
    return cls(cls.config_class(**kwargs))


def compile_blocks(model: Any, companions: bool = True, **compile_kwargs: Any) -> int:
    """torch.compile every repeated transformer block of `model` in place: the classes its `_no_split_modules`
    names (the transformers convention), and with `companions` the modules of the classes its
    `_compile_with_blocks` names (what prepares the blocks' inputs: see gpt2_memoria.MemoryReader). What else
    runs between blocks (embeddings, the memory bookkeeping, the head) stays eager, so carried memory needs no
    special care. State-dict keys do not change. Returns the number of blocks compiled; `compile_kwargs` go to
    `nn.Module.compile` (e.g. backend, mode), with a module class's own `inductor_options` (a dict) added under the
    inductor backend."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [module for module in model.modules() if type(module).__name__ in names]
    if not blocks:
        raise ValueError(f"{type(model).__name__} declares no transformer blocks (_no_split_modules), so compile=true "
                         "cannot apply to it; run it with compile=false")
    companion_names = set(getattr(model, "_compile_with_blocks", ())) if companions else set()
    for module in model.modules():
        if type(module).__name__ in names | companion_names:
            compile_module(module, **compile_kwargs)
    return len(blocks)


def compile_module(module: Any, **compile_kwargs: Any) -> None:
    """`module.compile(**compile_kwargs)` in place, with the module class's own inductor options (`inductor_options`,
    a dict) added under the given ones (the given ones win) when the backend is inductor."""
    options = getattr(module, "inductor_options", None)
    if options and compile_kwargs.get("backend", "inductor") == "inductor":
        mode, given = compile_kwargs.pop("mode", None), compile_kwargs.pop("options", None) or {}
        compile_kwargs.update(compile_settings(mode, {**options, **given}))
    module.compile(**compile_kwargs)


def compile_settings(mode: str | None = None, options: dict | None = None) -> dict[str, Any]:
    """Keyword arguments of `torch.compile` (and `compile_blocks`) for a compile `mode` plus inductor `options`:
    torch.compile takes a mode or options, not both, so with options the mode's own options go in with them
    (the given ones win). Returns {} for the defaults."""
    if not options:
        return {"mode": mode} if mode else {}
    from torch._inductor import list_mode_options

    return {"options": {**list_mode_options(mode or "default"), **options}}


def graphs_replayed(settings: dict[str, Any]) -> bool:
    """Whether `compile_settings(...)` replay the compiled code as CUDA graphs (what needs a step marker)."""
    if "options" in settings:
        return bool(settings["options"].get("triton.cudagraphs", False))
    return settings.get("mode") in ("reduce-overhead", "max-autotune")
