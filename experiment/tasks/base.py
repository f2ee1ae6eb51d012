"""The LightningModule every task builds on: optimizer and schedule, gradient clipping, memory-state checkpoints,
stage boundaries and the checks every task needs before training.

A task subclass implements `training_step` / `validation_step` / `test_step` and drives the model only through the
memory protocol (`experiment/models/protocol.py`). What the base gives it:

- `configure_optimizers`: Adam (torch defaults, `weight_decay` 0 by default; torch's fused kernel when every
  parameter is on a GPU) at `learning_rate`, with
  `schedule="linear"` (linear warm-up, then linear decay to 0) or `schedule="constant"`; the scheduler is
  stepped once per *optimizer* step. The warm-up lasts `warmup_steps` optimizer steps when that is set (an
  absolute count: the paper's sorting run warms up for 750 steps, and a short run needs about as many for
  Memoria's memory path, docs/results.md), else `warmup_ratio` of all optimizer steps. Total steps come from
  `trainer.estimated_stepping_batches` (devices and gradient accumulation accounted for).
  A task with `automatic_optimization = False` must call `self.step_optimizer()` after its backward passes: it
  steps the optimizer (clipping happens in the hook below), steps the scheduler and always zeroes the gradients.
- `on_before_optimizer_step`: clips the gradient norm to `max_grad_norm` (None = no clipping) and logs the norm.
  Lightning calls it after AMP unscaling, in automatic and manual optimization alike, so do not also set
  `trainer.gradient_clip_val`.
- Memory around stages: `reset_memory()` at the start of training (unless a resumed checkpoint restored it),
  validation and test. During `fit`, the training memory is snapshotted before validation and restored after it
  (validation starts from empty memory and does not wipe the training memory).
- Checkpoints: `on_save_checkpoint` stores the model's *training* memory state of every rank (gathered to rank 0;
  the snapshot when saved during validation) plus the torch / numpy / python RNG states; `on_load_checkpoint`
  restores this rank's memory state (and the RNG states when resuming training).
- Checks before training (`check_segment_length`): a segment longer than `model.max_segment_length` raises a
  ValueError naming the fix. The Trainer must run with `inference_mode=False` (memory built under
  `torch.inference_mode` cannot be used in backward later); `setup` refuses otherwise.

The wrapped model is `self.model`; `self.save_hyperparameters(ignore=["model"])` keeps the task's own arguments in
the checkpoint.
"""

from __future__ import annotations

import random
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.optim.lr_scheduler import LambdaLR

MEMORY_STATE_KEY = "memory_state_per_rank"
RNG_STATE_KEY = "rng_states"


def linear_warmup_decay(warmup_steps: int, total_steps: int):
    """lr multiplier: 0 → 1 linearly over `warmup_steps`, then 1 → 0 linearly at `total_steps`."""

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)  # never 0 on the first step
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return multiplier


def adam(params, lr: float, weight_decay: float = 0.0) -> torch.optim.Adam:
    """Adam with torch's defaults; on a GPU the fused implementation (one kernel launch for every parameter
    instead of several per group of tensors: the host's launch work is a large part of a training step)."""
    params = list(params)
    fused = bool(params) and all(p.is_cuda for p in params)
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, fused=fused or None)


def constant_multiplier(step: int) -> float:
    return 1.0


class MemoryTask(L.LightningModule):
    """Base of every task. Subclasses call `super().__init__(model, ...)` with the optimizer settings."""

    def __init__(self, model: torch.nn.Module, learning_rate: float = 2e-4, weight_decay: float = 0.0,
                 schedule: str = "linear", warmup_ratio: float = 0.06, max_grad_norm: float | None = 1.0,
                 warmup_steps: int | None = None):
        super().__init__()
        if learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {learning_rate}; set task.module.learning_rate.")
        if schedule not in ("linear", "constant"):
            raise ValueError(f"schedule must be 'linear' or 'constant', got {schedule!r}; set task.module.schedule.")
        if not 0.0 <= warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {warmup_ratio}; set task.module.warmup_ratio.")
        if warmup_steps is not None and (isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int)
                                         or warmup_steps < 0):
            raise ValueError(f"warmup_steps must be an integer >= 0 or null, got {warmup_steps!r}; set "
                             "task.module.warmup_steps (null: warm up over warmup_ratio of the steps).")
        if max_grad_norm is not None and max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm must be > 0 or null, got {max_grad_norm}; set task.module.max_grad_norm.")
        self.model = model
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        self.schedule = schedule
        self.warmup_ratio = warmup_ratio
        self.warmup_steps = warmup_steps
        self.max_grad_norm = max_grad_norm
        self._train_memory_snapshot: dict[str, Any] | None = None
        self._memory_restored = False  # on_train_start keeps memory restored from a checkpoint

    # ----------------------------------------------------------------------------------------------------------
    # checks
    def check_segment_length(self, segment_length: int, config_key: str = "task.module.segment_size") -> None:
        """ValueError (one sentence naming the fix) when the model cannot take segments of this length."""
        if segment_length < 1:
            raise ValueError(f"{config_key} must be >= 1, got {segment_length}; set a positive segment length.")
        max_length = getattr(self.model, "max_segment_length", None)
        if max_length is not None and segment_length > max_length:
            raise ValueError(
                f"{config_key}={segment_length} is longer than the model's {max_length} positions; lower "
                f"{config_key} to at most {max_length} or raise the model's position table (e.g. "
                f"model.config.n_positions={segment_length})."
            )

    def setup(self, stage: str) -> None:
        trainer = self._trainer
        if trainer is not None:
            for loop in (trainer.validate_loop, trainer.test_loop):
                if loop.inference_mode:
                    raise ValueError(
                        "the Trainer runs evaluation under torch.inference_mode, which breaks carried memory in "
                        "training; create it with Trainer(inference_mode=False) (trainer.inference_mode=false)."
                    )

    # ----------------------------------------------------------------------------------------------------------
    # optimizer
    def configure_optimizers(self):
        optimizer = adam(self.parameters(), lr=self.learning_rate, weight_decay=self.weight_decay)
        if self.schedule == "constant":
            multiplier = constant_multiplier
        else:
            total_steps = int(self.trainer.estimated_stepping_batches)
            multiplier = linear_warmup_decay(self.num_warmup_steps(total_steps), total_steps)
        scheduler = LambdaLR(optimizer, multiplier)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}

    def num_warmup_steps(self, total_steps: int) -> int:
        """Optimizer steps of linear warm-up: `warmup_steps` when set (it wins over the ratio), else
        `warmup_ratio` of `total_steps`. A warm-up longer than the run is allowed (the lr then never peaks)."""
        if self.warmup_steps is not None:
            return self.warmup_steps
        return int(total_steps * self.warmup_ratio)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.max_grad_norm is None:
            return
        grad_norm = torch.nn.utils.clip_grad_norm_(self.parameters(), self.max_grad_norm)
        self.log("train/grad_norm", grad_norm, on_step=True, on_epoch=False)

    def step_optimizer(self) -> None:
        """Manual optimization: optimizer step (clipped in the hook), scheduler step, zero grads — always all three."""
        optimizer = self.optimizers()
        scheduler = self.lr_schedulers()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        self.log("train/lr", optimizer.param_groups[0]["lr"], on_step=True, on_epoch=False)

    # ----------------------------------------------------------------------------------------------------------
    # memory at stage boundaries
    def on_train_start(self) -> None:
        # A run resumed from a checkpoint continues with the memory the checkpoint holds; a fresh run starts empty.
        if not self._memory_restored:
            self.model.reset_memory()
        self._memory_restored = False

    def on_validation_start(self) -> None:
        if self.trainer.state.fn == "fit":
            self._train_memory_snapshot = self.model.get_memory_state()
        self.model.reset_memory()

    def on_validation_end(self) -> None:
        self.model.reset_memory()
        if self._train_memory_snapshot is not None:
            self.model.set_memory_state(self._train_memory_snapshot)
            self._train_memory_snapshot = None

    def on_test_start(self) -> None:
        self.model.reset_memory()

    def on_test_end(self) -> None:
        self.model.reset_memory()

    # ----------------------------------------------------------------------------------------------------------
    # checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Called on every rank (Lightning saves from rank 0 only), so gather each rank's memory to rank 0.
        # ModelCheckpoint saves in on_validation_end before this module restores the training memory: during
        # validation the training memory is the snapshot, and that is what a resumed run must continue with.
        snapshot = self._train_memory_snapshot
        state = _to_cpu(snapshot if snapshot is not None else self.model.get_memory_state())
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            states: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(states, state)
        else:
            states = [state]
        checkpoint[MEMORY_STATE_KEY] = states
        checkpoint[RNG_STATE_KEY] = _rng_states()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        states = checkpoint.get(MEMORY_STATE_KEY)
        if states:
            rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
            if rank >= len(states):
                raise ValueError(f"the checkpoint holds memory for {len(states)} rank(s) but this is rank {rank}; "
                                 "resume with the same number of devices it was written with.")
            self.model.set_memory_state(states[rank])  # the model puts the tensors on its own device
            self._memory_restored = self._trainer is not None and self.trainer.state.fn == "fit"
        rng = checkpoint.get(RNG_STATE_KEY)
        if rng and self._trainer is not None and self.trainer.state.fn == "fit":
            _set_rng_states(rng)


def _to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {key: _to_cpu(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(item) for item in value)
    return value


def _rng_states() -> dict[str, Any]:
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        # numpy's state as plain values: checkpoints load with torch.load(weights_only=True)
        "numpy": _numpy_state_to_plain(np.random.get_state()),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _numpy_state_to_plain(state: tuple) -> tuple:
    name, keys, position, has_gauss, cached_gaussian = state
    return (name, keys.tolist(), int(position), int(has_gauss), float(cached_gaussian))


def _set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    name, keys, position, has_gauss, cached_gaussian = states["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached_gaussian))
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])
