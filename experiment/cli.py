"""`memoria-exp`: the Hydra entry point that trains and evaluates every experiment of the project.

    memoria-exp                                   # tiny Memoria GPT-2 on generated sorting data, CPU, minutes
    memoria-exp experiment=sort_paper task.data.length=4000 task.module.segment_size=512 trainer=gpu
    memoria-exp -m seed=1,2 memory.initial_lifespan=5,9        # multirun: one directory per job
    memoria-exp ckpt_path=outputs/.../checkpoints/last.ckpt    # resume training
    memoria-exp mode=eval ckpt_path=.../last.ckpt              # evaluate a checkpoint only

Config groups (conf/, shipped inside the package as `conf`): task, model, memory, trainer, logger, experiment.

The job (`run`): compose → validate (one-sentence errors before anything runs) → seed → data module (`setup`
gives `vocab_size`) → `build_model(cfg.model, vocab_size)` → task module (`_target_` of `task.module`, called with
`model=`) → Trainer (`trainer` group, `_target_: lightning.pytorch.Trainer`) with a ModelCheckpoint on
`task.monitor` / `task.monitor_mode` (best + last) → `fit` then `test` of the last checkpoint (mode=train) or
`validate` + `test` of `ckpt_path` (mode=eval). Each run directory holds `config_resolved.yaml`,
`checkpoints/`, the logger's metrics and `results.json`, and the run ends with a summary table.

A task config (`conf/task/<name>.yaml`) must give: `name`, `monitor`, `monitor_mode`, `module` (`_target_` a
`experiment.tasks.base.MemoryTask` subclass) and `data` (`_target_` a LightningDataModule with `vocab_size`).
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import os
import sys
import tempfile
import time
import types
import typing
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import get_object, instantiate
from omegaconf import MISSING, DictConfig, OmegaConf

from experiment.checkpoints import CheckpointError
from experiment.data.errors import DataUnavailableError

log = logging.getLogger("memoria-exp")


class Mode(Enum):
    train = "train"
    eval = "eval"
    analyze = "analyze"  # the engram analysis of a checkpoint (experiment/analysis.py)


@dataclass
class RunSchema:
    """Types of the top-level keys: a wrong type fails in Hydra with the key named (e.g. `seed=abc`)."""

    mode: Mode = Mode.train
    ckpt_path: str | None = None
    seed: int = 42
    run_name: str = MISSING
    print_summary: bool = True
    compile: bool = False
    compile_mode: str = "default"
    compile_options: Any = None
    progress_refresh_rate: int = 1
    task: Any = MISSING
    model: Any = MISSING
    memory: Any = MISSING
    trainer: Any = MISSING
    logger: Any = MISSING
    analysis: Any = None


def register_configs() -> None:
    """Register the structured schema the root config extends; needed before composing `conf/config.yaml`."""
    ConfigStore.instance().store(name="memoria_exp_schema", node=RunSchema)


register_configs()


RUN_DIR_ENV = "MEMORIA_RUN_DIR_CLAIMED"  # base=chosen pairs this process (and the processes it starts) claimed


def unique_dir(base: str) -> str:
    """`base`, or `base-1`, `base-2`, ... : the first that this call creates itself (os.mkdir is exclusive), so two
    runs started in the same second never share a run directory. The resolver `${unique_dir:...}` of
    conf/config.yaml's `hydra.run.dir` / `hydra.sweep.dir`.

    Within one process (and its children, through $MEMORIA_RUN_DIR_CLAIMED) the same base always gives the same
    directory: Hydra resolves the run directory more than once, and a relaunched DDP rank must agree with rank 0.
    """
    claimed = dict(item.split("=", 1) for item in os.environ.get(RUN_DIR_ENV, "").split(os.pathsep) if "=" in item)
    if base in claimed:
        return claimed[base]
    Path(base).parent.mkdir(parents=True, exist_ok=True)
    candidate, suffix = base, 0
    while True:
        try:
            os.mkdir(candidate)
            break
        except FileExistsError:
            suffix += 1
            candidate = f"{base}-{suffix}"
    claimed[base] = candidate
    os.environ[RUN_DIR_ENV] = os.pathsep.join(f"{key}={value}" for key, value in claimed.items())
    return candidate


OmegaConf.register_new_resolver("unique_dir", unique_dir, replace=True)


def compose_config(overrides: list[str] | None = None) -> DictConfig:
    """The project's config, composed as `memoria-exp <overrides>` composes it, without running anything (for
    tests and scripts)."""
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="conf", version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides or []))


class ConfigError(ValueError):
    """A configuration that cannot run; the message is one sentence naming the fix."""


# Memory hyperparameters that may be 0: it switches a memory level off (the paper's ablations). Every other
# numeric memory value must be > 0.
MEMORY_ZERO_ALLOWED = {"num_memories", "num_reminded_stm", "num_reminded_ltm", "ltm_search_depth",
                       "lifespan_extend_scale"}
MEMORY_NOT_HYPERPARAMETERS = {"seed"}
TASK_KEYS = ("name", "monitor", "monitor_mode", "module", "data")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


# --------------------------------------------------------------------------------------------------------------
# validation (before anything is built)
def validate_config(cfg: DictConfig) -> None:
    """Raise ConfigError for impossible settings that can be seen from the config alone."""
    missing = [key for key in TASK_KEYS if key not in cfg.task]
    if missing:
        raise ConfigError(f"the task config lacks {missing}; conf/task/<name>.yaml must set {', '.join(TASK_KEYS)}.")
    if cfg.task.monitor_mode not in ("min", "max"):
        raise ConfigError(f"task.monitor_mode must be 'min' or 'max', got {cfg.task.monitor_mode!r}.")
    mode = Mode(cfg.mode)
    if mode is Mode.eval and not cfg.ckpt_path:
        raise ConfigError("mode=eval evaluates a checkpoint: add ckpt_path=<path to a .ckpt file>.")
    if mode is Mode.analyze and not cfg.ckpt_path:
        raise ConfigError("mode=analyze analyses a trained model: add ckpt_path=<run dir>/checkpoints/last.ckpt.")
    if cfg.ckpt_path and not Path(cfg.ckpt_path).expanduser().is_file():
        raise ConfigError(f"ckpt_path={cfg.ckpt_path} is not a file; point it at a checkpoint such as "
                          "<run dir>/checkpoints/last.ckpt.")
    if cfg.compile_mode not in COMPILE_MODES:
        raise ConfigError(f"compile_mode={cfg.compile_mode} is not a torch.compile mode; use one of "
                          f"{', '.join(COMPILE_MODES)} (with compile=true).")
    options = cfg.get("compile_options")
    if options is not None:
        from torch._inductor import config as inductor_config

        if not isinstance(options, DictConfig):
            raise ConfigError(f"compile_options={options} must be a mapping of inductor options, e.g. "
                              "'compile_options={max_autotune: true}' (with compile=true), or null.")
        unknown = sorted(set(options) - set(inductor_config.get_config_copy()))
        if unknown:
            raise ConfigError(f"compile_options has keys inductor does not know: {', '.join(unknown)} (see "
                              "torch._inductor.list_options()).")
    if cfg.progress_refresh_rate < 1:
        raise ConfigError(f"progress_refresh_rate={cfg.progress_refresh_rate} must be >= 1 (training steps between "
                          "progress-bar updates); turn the bar off with trainer.enable_progress_bar=false.")
    accelerator = str(cfg.trainer.get("accelerator", "auto"))
    if accelerator in ("gpu", "cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(f"trainer.accelerator={accelerator} but no CUDA GPU is visible; use trainer=cpu (or "
                              "trainer.accelerator=cpu after an experiment preset).")
    if "memory" in cfg and cfg.memory is not None:
        for key, value in cfg.memory.items():
            if key in MEMORY_NOT_HYPERPARAMETERS or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if not math.isfinite(value) or value < 0 or (value == 0 and key not in MEMORY_ZERO_ALLOWED):
                bound = ">= 0 (0 switches that memory level off)" if key in MEMORY_ZERO_ALLOWED else "> 0"
                raise ConfigError(f"memory.{key}={value} is not allowed; set memory.{key} to a value {bound}.")
    for section in ("module", "data"):
        check_target_arguments(cfg.task[section], f"task.{section}", skip=("model",))
    # The trainer group is free-form (any Trainer argument): check names and simple types against Trainer itself,
    # so `trainer.max_epochs=abc` fails here, not after the data was generated.
    check_target_arguments(cfg.trainer, "trainer", skip=("strategy", "plugins", "profiler"))
    for key in ("max_epochs", "max_steps"):
        value = cfg.trainer.get(key)
        if value is not None and value < -1:
            raise ConfigError(f"trainer.{key}={value} is not allowed; set it to a count >= 0, or -1 for no limit.")
    check_model_options(cfg.model)


def check_model_options(model_cfg: DictConfig) -> None:
    """Every key under model.config must be an option of the model's config class (a transformers config accepts
    and ignores unknown keywords, so a typo such as `+model.config.n_layr=2` would silently change nothing)."""
    class_path = model_cfg.get("class_path")
    options = model_cfg.get("config")
    if not class_path or not options:
        return
    try:
        config_class = get_object(class_path).config_class
    except (ImportError, AttributeError, ValueError) as error:
        raise ConfigError(f"model.class_path={class_path} cannot be imported ({error}); fix the class path.") from error
    known = set(inspect.signature(config_class.__init__).parameters) - {"self", "kwargs"}
    known |= set(getattr(config_class, "attribute_map", {}) or {})
    known |= set(config_class().to_dict())
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(f"model.config.{unknown[0]} is not an option of {config_class.__name__} (model="
                          f"{model_cfg.get('name')}); remove it or fix its name.")


def check_target_arguments(node: DictConfig, prefix: str, skip: tuple[str, ...] = ()) -> None:
    """Check the keys of a `_target_` node against the target's signature: unknown names and simple types."""
    if "_target_" not in node:
        raise ConfigError(f"{prefix} needs a _target_ naming the class to build.")
    try:
        target = get_object(node._target_)
    except (ImportError, AttributeError, ValueError) as error:  # report which _target_ is wrong
        raise ConfigError(
            f"{prefix}._target_={node._target_} cannot be imported ({error}); fix the class path."
        ) from error
    init = target.__init__ if inspect.isclass(target) else target
    parameters = inspect.signature(init).parameters
    takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    try:
        hints = typing.get_type_hints(init)
    except (NameError, TypeError):  # unresolvable annotations: skip the type check, keep the name check
        hints = {}
    for key, value in node.items():
        if key.startswith("_") or key in skip:
            continue
        if key not in parameters and not takes_kwargs:
            raise ConfigError(f"{prefix}.{key} is not an argument of {node._target_}; remove it or fix its name.")
        expected = hints.get(key)
        if expected is not None and not _matches(value, expected):
            raise ConfigError(f"{prefix}.{key}={value!r} has the wrong type; it must be {_type_name(expected)}.")


def _matches(value: Any, expected: Any) -> bool:
    origin = typing.get_origin(expected)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, option) for option in typing.get_args(expected))
    if expected is type(None):
        return value is None
    if expected is bool:
        return isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if expected is str:
        return isinstance(value, str)
    return True  # containers, modules, Any: not checked here


def _type_name(expected: Any) -> str:
    if typing.get_origin(expected) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(option) for option in typing.get_args(expected))
    return "null" if expected is type(None) else getattr(expected, "__name__", str(expected))


def _instantiate(node: DictConfig, prefix: str, **kwargs: Any) -> Any:
    """hydra.utils.instantiate, but a ValueError from the target comes out as a ConfigError (one sentence)."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as error:
        cause = error.__cause__
        if isinstance(cause, DataUnavailableError):
            raise cause from None
        if isinstance(cause, ValueError):
            raise ConfigError(str(cause)) from cause
        raise


def _data_step(step: Any, *args: Any) -> Any:
    """Call a data-module step (prepare_data / setup): a missing file is a DataUnavailableError (exit 3), a bad
    file or setting a ConfigError (exit 2), each one line naming the problem."""
    try:
        return step(*args)
    except FileNotFoundError as error:
        if error.errno is None:  # raised with a message of its own
            raise DataUnavailableError(str(error)) from None
        raise DataUnavailableError(f"{error.filename}: no such file; check the task.data paths "
                                   "(task.data.data_file, task.data.path).") from None
    except (ValueError, UnicodeDecodeError) as error:
        raise ConfigError(str(error).splitlines()[0] if str(error) else type(error).__name__) from error


# --------------------------------------------------------------------------------------------------------------
# files
def write_text_atomic(path: Path, text: str) -> None:
    """Temp file in the same folder + rename: a reader never sees a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def _plain(value: Any) -> Any:
    """Metric values (tensors) as floats for JSON."""
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


# --------------------------------------------------------------------------------------------------------------
# the job
def run(cfg: DictConfig, run_dir: str | Path | None = None) -> dict[str, Any]:
    """One job: train (+ test the last checkpoint) or evaluate a checkpoint. Returns the results dict.

    run_dir: where outputs go; defaults to Hydra's run directory (needed when called outside a Hydra app).
    """
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar

    from experiment.callbacks import CudaGraphStepMarker, InterruptCheckpoint, RunInterrupted
    from experiment.checkpoints import check_weights_match, read_checkpoint, safe_globals
    from experiment.cluster import REQUEUE_CHECKPOINT, RequeueCheckpoint, requeue_checkpoint, submitit_signal
    from experiment.loggers import build_logger, finish_logger, record_summary
    from experiment.models import build_model, compile_blocks, compile_settings, graphs_replayed

    started = time.time()
    if logging.getLogger().hasHandlers():
        # Hydra's logging is set up: let Lightning's records go through it instead of its own extra handler.
        logging.getLogger("lightning").handlers.clear()
    if run_dir is None:
        if not HydraConfig.initialized():
            raise ConfigError("run() outside a Hydra app needs run_dir=<output folder>.")
        run_dir = HydraConfig.get().runtime.output_dir
    run_dir = Path(run_dir)
    validate_config(cfg)
    mode = Mode(cfg.mode)
    torch.serialization.add_safe_globals(safe_globals())  # Lightning's own loads: weights_only=True below
    # Read safely (weights_only: nothing in the file runs) and early: a bad file fails before any data work.
    ckpt_state = read_checkpoint(cfg.ckpt_path) if cfg.ckpt_path else None

    resolved = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    L.seed_everything(cfg.seed, workers=True)

    datamodule = _instantiate(cfg.task.data, "task.data")
    early_vocab = getattr(datamodule, "vocab_size", None)
    if early_vocab is None:  # the vocabulary is only known from the data: load it first
        _data_step(datamodule.prepare_data)
        _data_step(datamodule.setup, "fit")
    # Model and task first when possible: their checks (segment vs positions) fail before data is generated.
    model = build_model(cfg.model, early_vocab or datamodule.vocab_size)
    from experiment.figures import figure_callbacks

    callbacks = figure_callbacks(cfg, run_dir, resolved)  # logger=wandb: the run's figures as W&B images at its end
    # A requeued SLURM job (hydra/launcher=slurm) resumes from the checkpoint it saved before its time limit.
    resume_path = cfg.ckpt_path
    if mode is Mode.train and not resume_path and requeue_checkpoint(run_dir) is not None:
        resume_path = str(requeue_checkpoint(run_dir))
        log.info("resuming the requeued job from %s", resume_path)
    if mode is Mode.train and submitit_signal() is not None:
        callbacks.append(RequeueCheckpoint(run_dir / "checkpoints" / REQUEUE_CHECKPOINT, submitit_signal()))
    # Ctrl-C / SIGTERM: save last.ckpt after the current batch and stop (the partial results say how to resume).
    interrupt = InterruptCheckpoint(run_dir / "checkpoints" / "last.ckpt") if mode is Mode.train else None
    if interrupt is not None:
        callbacks.append(interrupt)
    if cfg.trainer.get("enable_progress_bar", True):
        # Each update of the bar reads the logged values back from the device (a host sync): on a GPU, updating
        # every few dozen steps lets the host queue the next steps while the GPU runs.
        callbacks.append(TQDMProgressBar(refresh_rate=cfg.progress_refresh_rate))
    if cfg.compile:
        options = cfg.get("compile_options")
        settings = compile_settings(cfg.compile_mode, None if options is None else OmegaConf.to_container(options))
        count = compile_blocks(model, **settings)
        log.info("compile: torch.compile (mode %s%s) of %d transformer blocks (the first steps compile)",
                 cfg.compile_mode, "" if options is None else f", options {settings['options']}", count)
        if graphs_replayed(settings):
            callbacks.append(CudaGraphStepMarker())  # the blocks are replayed as CUDA graphs
    module = _instantiate(cfg.task.module, "task.module", model=model)
    if ckpt_state is not None:  # another model's checkpoint: one line, not a state_dict traceback
        check_weights_match(ckpt_state, module, cfg.ckpt_path, cfg.model.name)
        del ckpt_state
    if early_vocab is not None:
        _data_step(datamodule.prepare_data)
        _data_step(datamodule.setup, "fit")
        if datamodule.vocab_size != early_vocab:
            raise ConfigError(f"the data has {datamodule.vocab_size} symbols, not the {early_vocab} the data module "
                              "announced; check task.data.data_file.")

    write_text_atomic(run_dir / "config_resolved.yaml", OmegaConf.to_yaml(OmegaConf.create(resolved)))
    if hasattr(datamodule, "write_run_files"):  # e.g. the classification split's id lists (splits.json)
        datamodule.write_run_files(run_dir)

    limit_val = cfg.trainer.get("limit_val_batches")
    monitor = None if limit_val == 0 else cfg.task.monitor
    checkpoint = ModelCheckpoint(  # the best by the task's metric
        dirpath=str(run_dir / "checkpoints"),
        filename="best-epoch{epoch}-step{step}",
        auto_insert_metric_name=False,
        monitor=monitor,
        mode=cfg.task.monitor_mode,
        save_top_k=1,
    )
    # last.ckpt from its own callback: Lightning's save_last only refreshes it when the best one changes.
    last_checkpoint = ModelCheckpoint(dirpath=str(run_dir / "checkpoints"), filename="last", monitor=None,
                                      save_top_k=1, enable_version_counter=False)
    # Resumed into the run directory it came from: its metrics so far are kept (CSVLogger would delete them).
    earlier_metrics = set_metrics_aside(run_dir) if mode is Mode.train and resume_path else None
    logger = build_logger(cfg.logger, run_dir, cfg.run_name, resolved,
                          resume_from=resume_path if mode is Mode.train else None)
    trainer = instantiate(cfg.trainer, callbacks=[checkpoint, last_checkpoint, *callbacks], logger=logger,
                          default_root_dir=str(run_dir))

    results: dict[str, Any] = {
        "mode": mode.value,
        "task": cfg.task.name,
        "model": cfg.model.name,
        "seed": cfg.seed,
        "run_dir": str(run_dir),
        "data_source": getattr(datamodule, "source", None),
        "num_parameters": sum(p.numel() for p in model.parameters()),
    }
    if mode is Mode.train and resume_path:
        results["resumed_from"] = str(resume_path)
    try:
        if mode is Mode.train:
            try:
                trainer.fit(module, datamodule=datamodule, ckpt_path=resume_path, weights_only=True)
            except RunInterrupted as stop:
                interrupt.requested = stop.signal_name
            if interrupt.requested:  # saved and stopped (or fit had just ended): no test, partial results
                raise RunStopped(interrupt.requested, _interrupted_results(results, trainer, run_dir, cfg))
            results["train"] = {k: v for k, v in _plain(dict(trainer.callback_metrics)).items()
                                if k.startswith("train/")}
            results["val"] = {k: v for k, v in _plain(dict(trainer.callback_metrics)).items() if k.startswith("val/")}
            # Read from last.ckpt: with spawned DDP workers the parent trainer never sees their step count or scores.
            last_path = run_dir / "checkpoints" / "last.ckpt"
            facts = checkpoint_facts(last_path, monitor) if last_path.is_file() else {}
            results["global_step"] = facts.get("global_step", trainer.global_step)
            results["best_checkpoint"] = checkpoint.best_model_path or facts.get("best_model_path")
            best_score = checkpoint.best_model_score
            if best_score is None:
                best_score = facts.get("best_score")
            results["best_score"] = _plain(best_score) if best_score is not None else None
            results["last_checkpoint"] = str(last_path) if last_path.is_file() else None
            # The paper tests the last checkpoint, not the best (without one: the final in-memory weights).
            tested = results["last_checkpoint"]
            results["tested_checkpoint"] = tested or "final weights (no checkpoint written)"
            results["test"] = _plain(trainer.test(module, datamodule=datamodule, ckpt_path=tested,
                                                  weights_only=True)[0])
        else:
            results["tested_checkpoint"] = cfg.ckpt_path
            if limit_val != 0:
                results["val"] = _plain(trainer.validate(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path,
                                                        weights_only=True)[0])
            results["test"] = _plain(trainer.test(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path,
                                                  weights_only=True)[0])
        if trainer.is_global_zero:
            record_summary(logger, results)  # W&B: summary metrics and the checkpoints' paths
    finally:
        finish_logger(logger)
        if earlier_metrics is not None:
            join_metrics(run_dir, earlier_metrics)
    results["status"] = "finished"
    results["monitor"] = cfg.task.monitor
    results["wall_time_s"] = round(time.time() - started, 1)
    if trainer.is_global_zero:
        write_text_atomic(run_dir / "results.json", json.dumps(results, indent=2) + "\n")
        if cfg.print_summary:
            print(format_summary(results), flush=True)
    return results


class RunStopped(Exception):
    """Training was interrupted by a signal after saving a resumable checkpoint; `results` are the partial results
    written to results.json (status "interrupted", with the command that resumes the run)."""

    def __init__(self, signal_name: str, results: dict[str, Any]):
        super().__init__(f"{signal_name}: {results.get('resume_command')}")
        self.signal_name = signal_name
        self.results = results

    @property
    def exit_code(self) -> int:
        import signal

        return 128 + int(getattr(signal, self.signal_name, signal.SIGINT))


def resume_command(checkpoint: str | Path, run_dir: str | Path) -> str:
    """The command that continues this run from `checkpoint` in the same run directory (its metrics go on in the
    same files): this run's own overrides, then ckpt_path= and hydra.run.dir=."""
    import shlex

    overrides: list[str] = ["<this run's overrides>"]
    if HydraConfig.initialized():
        overrides = [item for item in HydraConfig.get().overrides.task
                     if not item.lstrip("+~").startswith(("ckpt_path=", "hydra.run.dir="))]
    return shlex.join(["memoria-exp", *overrides, f"ckpt_path={checkpoint}", f"hydra.run.dir={run_dir}"])


def _interrupted_results(results: dict[str, Any], trainer: Any, run_dir: Path, cfg: DictConfig) -> dict[str, Any]:
    """results.json of an interrupted run: what is known so far, marked interrupted, with the resume command."""
    last_path = run_dir / "checkpoints" / "last.ckpt"
    metrics = _plain(dict(trainer.callback_metrics))
    partial = {
        **results,
        "status": "interrupted",
        "global_step": trainer.global_step,
        "train": {key: value for key, value in metrics.items() if key.startswith("train/")},
        "val": {key: value for key, value in metrics.items() if key.startswith("val/")},
        "last_checkpoint": str(last_path) if last_path.is_file() else None,
        "resume_command": resume_command(last_path, run_dir) if last_path.is_file() else None,
        "monitor": cfg.task.monitor,
    }
    if trainer.is_global_zero:
        write_text_atomic(run_dir / "results.json", json.dumps(partial, indent=2) + "\n")
    return partial


METRICS_FILE = "metrics.csv"
EARLIER_METRICS = "metrics.before-resume.csv"


def set_metrics_aside(run_dir: Path) -> Path | None:
    """Before a resumed run's CSV logger starts (it deletes an existing metrics.csv): move the run's metrics so far
    to metrics.before-resume.csv (appending to one an earlier resume left). None when there are none."""
    current, earlier = run_dir / METRICS_FILE, run_dir / EARLIER_METRICS
    if not current.is_file():
        return earlier if earlier.is_file() else None
    if earlier.is_file():
        join_metrics(run_dir, earlier)  # an earlier resume that did not finish: fold it in first
    os.replace(current, earlier)
    return earlier


def join_metrics(run_dir: Path, earlier: Path) -> None:
    """metrics.csv = the rows before the resume, then the resumed run's rows (columns united); the set-aside file
    is removed once the joined file is in place."""
    import csv

    current = run_dir / METRICS_FILE
    if not earlier.is_file():
        return
    tables = []
    for path in (earlier, current):
        if path.is_file():
            with open(path, newline="") as handle:
                reader = csv.DictReader(handle)
                tables.append((list(reader.fieldnames or []), list(reader)))
    columns = sorted({column for fields, _ in tables for column in fields})
    import io

    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns)
    writer.writeheader()
    for _, rows in tables:
        writer.writerows(rows)
    write_text_atomic(current, text.getvalue())
    earlier.unlink()


def objective(results: dict[str, Any]) -> float | None:
    """The run's monitored metric (task.monitor): the best checkpoint's score after training, the validation score
    in mode=eval; None when there was no validation. What an Optuna sweep optimises."""
    score = results.get("best_score")
    if score is None:
        score = (results.get("val") or {}).get(results.get("monitor"))
    return None if score is None else float(score)


def checkpoint_facts(path: Path, monitor: str | None) -> dict[str, Any]:
    """global_step and the best checkpoint (path, score) recorded in a Lightning checkpoint (read with
    weights_only=True: experiment/checkpoints.py)."""
    from experiment.checkpoints import checkpoint_facts as facts

    return facts(path, monitor)


def format_summary(results: dict[str, Any]) -> str:
    """The table printed at the end of every run."""
    rows: list[tuple[str, str]] = [
        ("run", f"{results['task']} / {results['model']} / seed {results['seed']} ({results['mode']})"),
        ("run dir", results["run_dir"]),
        ("parameters", f"{results['num_parameters']:,}"),
    ]
    if results.get("global_step") is not None:
        rows.append(("optimizer steps", str(results["global_step"])))
    if results.get("best_score") is not None:
        rows.append((f"best {results['monitor']}", f"{results['best_score']:.4f}"))
    for section in ("val", "test"):
        for key, value in sorted((results.get(section) or {}).items()):
            if isinstance(value, float):
                rows.append((key, f"{value:.4f}"))
    if results.get("tested_checkpoint"):
        rows.append(("tested checkpoint", str(results["tested_checkpoint"])))
    rows.append(("wall time", f"{results['wall_time_s']:.1f} s"))
    width = max(len(name) for name, _ in rows)
    value_width = max(len(value) for _, value in rows)
    line = "+" + "-" * (width + 2) + "+" + "-" * (value_width + 2) + "+"
    body = [f"| {name.ljust(width)} | {value.ljust(value_width)} |" for name, value in rows]
    title = "| " + "memoria-exp summary".ljust(width + value_width + 3) + " |"
    return "\n".join([line, title, line, *body, line])


@hydra.main(version_base="1.3", config_path="pkg://conf", config_name="config")
def _hydra_main(cfg: DictConfig) -> float | None:
    try:
        if Mode(cfg.mode) is Mode.analyze:  # the engram analysis: no training, no results.json
            from experiment.analysis import analyze

            validate_config(cfg)
            analyze(cfg)
            return None
        return objective(run(cfg))  # a sweeper (hparams_search=...) reads the job's return value
    except (ConfigError, CheckpointError) as error:
        log.error("memoria-exp: error: %s", error)
        sys.exit(2)
    except RunStopped as stop:  # Ctrl-C / SIGTERM: saved; say how to go on
        log.warning("memoria-exp: interrupted by %s; saved %s. Resume with:\n%s", stop.signal_name,
                    stop.results.get("last_checkpoint"), stop.results.get("resume_command"))
        sys.exit(stop.exit_code)
    except DataUnavailableError as error:  # offline / missing dataset: the message names the fix
        log.error("memoria-exp: data unavailable: %s", error)
        sys.exit(3)


def main() -> None:
    """Console entry point `memoria-exp`."""
    _hydra_main()


if __name__ == "__main__":
    main()
