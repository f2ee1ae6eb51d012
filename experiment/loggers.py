"""Metric loggers for a run, chosen by `conf/logger/*.yaml` (`kind`: csv, tensorboard, wandb, none, or a list of
them: the GPU presets use `logger=wandb_csv`, i.e. `kind: [wandb, csv]`).

wandb is imported only when `kind: wandb` is chosen. With `offline: auto` the run goes offline by itself, with one
line saying so, when there is no API key or the W&B server cannot be reached.
"""

from __future__ import annotations

import logging
import netrc
import os
import secrets
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

log = logging.getLogger(__name__)

LOGGER_KINDS = ("csv", "tensorboard", "wandb", "none")
WANDB_RUN_ID_FILE = "wandb_run_id.txt"


def build_logger(logger_cfg: Any, save_dir: str | Path, run_name: str, config: dict[str, Any] | None = None,
                 resume_from: str | Path | None = None):
    """The Lightning logger for this run, a list of them (`kind` a list), or False for `kind: none`.

    save_dir: the run directory. config: the resolved run config (sent to W&B). resume_from: a checkpoint being
    resumed; a W&B run id saved next to its run is reused so the resumed run continues the same W&B run.
    """
    cfg = dict(logger_cfg or {})
    kind = cfg.pop("kind", None)
    if isinstance(kind, (list, tuple)) or type(kind).__name__ == "ListConfig":
        loggers = [build_logger({**cfg, "kind": one}, save_dir, run_name, config, resume_from) for one in kind]
        loggers = [logger for logger in loggers if logger is not False]
        return loggers or False
    save_dir = Path(save_dir)
    if kind == "none":
        return False
    if kind == "csv":
        from lightning.pytorch.loggers import CSVLogger

        return CSVLogger(save_dir=str(save_dir), name="", version="")
    if kind == "tensorboard":
        try:
            from lightning.pytorch.loggers import TensorBoardLogger

            return TensorBoardLogger(save_dir=str(save_dir), name="", version="", default_hp_metric=False)
        except ModuleNotFoundError as error:
            raise ValueError(f"logger=tensorboard needs the tensorboard package ({error}); pip install tensorboard "
                             "or choose logger=csv.") from error
    if kind == "wandb":
        return _build_wandb(cfg, save_dir, run_name, config, resume_from)
    raise ValueError(f"unknown logger kind {kind!r}; choose one of {', '.join(LOGGER_KINDS)} (logger=<kind>).")


def wandb_should_be_offline(setting: Any) -> tuple[bool, str]:
    """(offline?, why) for `offline: auto | true | false`."""
    if setting is True or str(setting).lower() == "true":
        return True, "offline=true"
    if setting is False or str(setting).lower() == "false":
        return False, "offline=false"
    if str(setting).lower() != "auto":
        raise ValueError(f"logger.offline must be auto, true or false, got {setting!r}.")
    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "dryrun", "disabled"):
        return True, f"WANDB_MODE={os.environ['WANDB_MODE']}"
    base_url = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
    host = urlparse(base_url).hostname or "api.wandb.ai"
    if not _has_wandb_api_key(host):
        return True, "no W&B API key (set WANDB_API_KEY or run `wandb login`)"
    if not _reachable(host, 443 if base_url.startswith("https") else 80):
        return True, f"{host} cannot be reached"
    return False, "API key and network present"


def _has_wandb_api_key(host: str) -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        netrc_path = os.environ.get("NETRC") or str(Path.home() / ".netrc")
        return netrc.netrc(netrc_path).authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def _reachable(host: str, port: int, timeout: float = 2.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _build_wandb(cfg: dict[str, Any], save_dir: Path, run_name: str, config: dict[str, Any] | None,
                 resume_from: str | Path | None):
    from lightning.pytorch.loggers import WandbLogger

    try:
        import wandb  # noqa: F401  (imported here only, to fail early: runs without W&B never import it)
    except ModuleNotFoundError as error:
        raise ValueError("logger=wandb needs the wandb package; pip install wandb or choose logger=csv.") from error
    offline, reason = wandb_should_be_offline(cfg.pop("offline", "auto"))
    if offline and reason not in ("offline=true",):
        log.warning("wandb: logging offline (%s); sync later with `wandb sync %s`", reason, save_dir / "wandb")
    # Our own run id (the previous run's when resuming), recorded in the run directory before anything starts, so
    # `ckpt_path=<this run's checkpoint>` continues the same W&B run even after a crash.
    run_id = _previous_wandb_run_id(resume_from) or secrets.token_hex(4)
    save_dir.mkdir(parents=True, exist_ok=True)
    (save_dir / WANDB_RUN_ID_FILE).write_text(run_id)
    tags = list(cfg.pop("tags", None) or [])
    tags += [tag for tag in run_tags(config) if tag not in tags]
    if cfg.get("group") is None:
        cfg["group"] = sweep_group()
    return WandbLogger(
        name=run_name,
        save_dir=str(save_dir),
        offline=offline,
        id=run_id,
        resume="allow",
        tags=tags,
        config=config,
        **{key: value for key, value in cfg.items() if value is not None},
    )


def run_tags(config: dict[str, Any] | None) -> list[str]:
    """W&B tags naming the run: its task, its model and its setting (the experiment preset, when one was chosen)."""
    config = config or {}
    names = [(config.get(key) or {}).get("name") for key in ("task", "model")]
    tags = [str(name) for name in names if name]
    try:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            setting = HydraConfig.get().runtime.choices.get("experiment")
            if setting:
                tags.append(str(setting))
    except (ImportError, ValueError):
        pass
    return tags


def sweep_group() -> str | None:
    """In a Hydra multirun, the W&B group shared by all its jobs (the sweep directory's name, its start time), so a
    sweep reads as one in the W&B UI; None for a single run."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
            return None
        return f"sweep-{Path(str(HydraConfig.get().sweep.dir)).name}"
    except (ImportError, ValueError):
        return None


def _loggers(logger: Any) -> list:
    if logger is False or logger is None:
        return []
    return list(logger) if isinstance(logger, (list, tuple)) else [logger]


def record_summary(logger: Any, results: dict[str, Any]) -> None:
    """Put the run's outcome into the W&B run summary: the test and validation metrics, the best score, the step
    count and the checkpoints' paths (other loggers already hold the metrics)."""
    for one in _loggers(logger):
        if type(one).__name__ != "WandbLogger":
            continue
        summary: dict[str, Any] = {}
        for section in ("val", "test"):
            summary.update({key: value for key, value in (results.get(section) or {}).items()
                            if isinstance(value, (int, float))})
        for key in ("best_score", "global_step", "num_parameters", "best_checkpoint", "last_checkpoint",
                    "tested_checkpoint", "run_dir"):
            if results.get(key) is not None:
                summary[key] = results[key]
        one.experiment.summary.update(summary)


def _previous_wandb_run_id(resume_from: str | Path | None) -> str | None:
    """The W&B run id recorded in the run directory of a checkpoint being resumed (<run>/checkpoints/x.ckpt)."""
    if not resume_from:
        return None
    record = Path(resume_from).expanduser().resolve().parent.parent / WANDB_RUN_ID_FILE
    return record.read_text().strip() if record.exists() else None


def finish_logger(logger: Any) -> None:
    """Close the logger; for W&B this calls wandb.finish() so every multirun job gets its own W&B run."""
    for one in _loggers(logger):
        one.finalize("success")
        if type(one).__name__ == "WandbLogger":
            import wandb

            wandb.finish()
