"""Reading checkpoints without running code from them.

A `.ckpt` is a pickle: loaded with `torch.load(weights_only=False)` it can run anything its author wrote into it, and a
run directory is a place where anyone with write access can plant one. Every checkpoint the project reads is read
with `weights_only=True`: tensors, containers and plain values only, plus the few harmless types that Lightning writes
(`SAFE_GLOBALS`). A file that needs anything else is refused with a message saying so; nothing in it runs.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file, the problem and the fix."""


def safe_globals() -> list:
    """Types besides tensors and builtins that a Lightning checkpoint may hold and that are safe to rebuild: plain
    records with no code on load."""
    import collections
    import pathlib

    from lightning.fabric.utilities.data import AttributeDict

    return [AttributeDict, collections.defaultdict, pathlib.PosixPath, pathlib.PurePosixPath]


def read_checkpoint(path: str | Path, option: str = "ckpt_path") -> dict[str, Any]:
    """The checkpoint at `path` as a dict, its tensors memory-mapped (cheap for a large file), read with
    weights_only=True. CheckpointError names `option=path` when the file is missing, truncated, not a PyTorch file,
    not a Lightning checkpoint, or holds objects that only a full unpickling could rebuild."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"{option}={path} is not a file; point it at a checkpoint such as "
                              "<run dir>/checkpoints/last.ckpt.")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; a truncated one loses its directory
        raise CheckpointError(f"{option}={path} is not a readable checkpoint (truncated, or not written by "
                              "torch.save); point it at a complete .ckpt, e.g. <run dir>/checkpoints/last.ckpt.")
    import torch

    try:
        with torch.serialization.safe_globals(safe_globals()):
            state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as error:
        refused = str(error).split("Unsupported global: GLOBAL ", 1)
        what = refused[1].split(" ", 1)[0].rstrip(".,") if len(refused) > 1 else "objects other than tensors"
        raise CheckpointError(
            f"{option}={path} holds {what}, which only a full unpickling could rebuild, and unpickling can run code: "
            "it was not written by memoria-exp, or was altered. It is not loaded; use a checkpoint written by "
            "memoria-exp."
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        raise CheckpointError(f"{option}={path} is not a readable checkpoint ({type(error).__name__}: "
                              f"{str(error).splitlines()[0][:160]}); point it at a complete .ckpt.") from None
    if not isinstance(state, dict) or "state_dict" not in state:
        raise CheckpointError(f"{option}={path} is not a Lightning checkpoint (it has no state_dict); point it at a "
                              "checkpoint written by memoria-exp.")
    return state


def checkpoint_facts(path: str | Path, monitor: str | None) -> dict[str, Any]:
    """global_step and the best checkpoint (path, score) recorded in a Lightning checkpoint."""
    state = read_checkpoint(path)
    facts: dict[str, Any] = {"global_step": int(state.get("global_step", 0))}
    for key, callback_state in (state.get("callbacks") or {}).items():
        if key.startswith("ModelCheckpoint") and monitor and repr(monitor) in key:
            facts["best_model_path"] = callback_state.get("best_model_path") or None
            facts["best_score"] = callback_state.get("best_model_score")
    return facts


def check_weights_match(state: dict[str, Any], module: Any, path: str | Path, model_name: str) -> None:
    """Refuse a checkpoint whose weights are not the ones of `module` (another model, another size)."""
    saved = state["state_dict"]
    expected = module.state_dict()
    missing = sorted(set(expected) - set(saved))
    unexpected = sorted(set(saved) - set(expected))
    reshaped = sorted(key for key in set(expected) & set(saved)
                      if tuple(saved[key].shape) != tuple(expected[key].shape))
    if not (missing or unexpected or reshaped):
        return
    problems = []
    if missing:
        problems.append(f"{len(missing)} weights of model={model_name} are missing (e.g. {missing[0]})")
    if unexpected:
        problems.append(f"{len(unexpected)} are not model={model_name}'s (e.g. {unexpected[0]})")
    if reshaped:
        key = reshaped[0]
        problems.append(f"{len(reshaped)} have other shapes (e.g. {key}: {tuple(saved[key].shape)} saved, "
                        f"{tuple(expected[key].shape)} here)")
    trained_with = _trained_model(Path(path))
    fix = (f"run with model={trained_with} and the settings it was trained with" if trained_with
           else "run with the model and settings it was trained with")
    raise CheckpointError(f"ckpt_path={path} was not written by this model: {'; '.join(problems)}; {fix} "
                          "(see config_resolved.yaml in its run directory).")


def _trained_model(path: Path) -> str | None:
    """The model name in config_resolved.yaml of the run that wrote <run>/checkpoints/x.ckpt, if there is one."""
    config = path.expanduser().resolve().parent.parent / "config_resolved.yaml"
    if not config.is_file():
        return None
    try:
        from omegaconf import OmegaConf

        return str(OmegaConf.load(config).model.name)
    except Exception:  # noqa: BLE001  (only a hint for the message)
        return None
