"""Warm-up length: an absolute `warmup_steps` wins over `warmup_ratio`; both count optimizer steps (gradient
accumulation included) and a resumed run continues the same schedule."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from experiment.tasks.base import MemoryTask


class Regression(torch.nn.Module):
    """A memory-less model with the memory protocol's methods, enough for the task base."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 1)

    def forward(self, x):
        return self.linear(x)

    def reset_memory(self, rows=None):
        pass

    def get_memory_state(self):
        return {}

    def set_memory_state(self, state):
        pass


class RegressionTask(MemoryTask):
    """Automatic optimization (as the LM task), recording the learning rate of every optimizer step."""

    def __init__(self, **kwargs):
        super().__init__(Regression(), learning_rate=1.0, max_grad_norm=None, **kwargs)
        self.lrs: list[float] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.model(x), y)

    def on_before_optimizer_step(self, optimizer):
        self.lrs.append(optimizer.param_groups[0]["lr"])


def loader(batches: int) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batches * 2, 4, generator=generator)
    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=2)


def fit(task: MemoryTask, tmp_path, batches: int, **trainer_args) -> L.Trainer:
    trainer = L.Trainer(**trainer_settings(tmp_path, **trainer_args))
    trainer.fit(task, train_dataloaders=loader(batches))
    return trainer


def trainer_settings(tmp_path, **trainer_args) -> dict:
    settings = {"accelerator": "cpu", "devices": 1, "max_epochs": 1, "logger": False, "enable_progress_bar": False,
                "enable_model_summary": False, "enable_checkpointing": False, "inference_mode": False,
                "default_root_dir": str(tmp_path)}
    settings.update(trainer_args)
    return settings


def test_absolute_warmup_wins_over_the_ratio():
    assert RegressionTask(warmup_ratio=0.5, warmup_steps=3).num_warmup_steps(100) == 3
    assert RegressionTask(warmup_ratio=0.5).num_warmup_steps(100) == 50
    assert RegressionTask(warmup_ratio=0.06, warmup_steps=0).num_warmup_steps(100) == 0
    assert RegressionTask(warmup_steps=750).num_warmup_steps(100) == 750  # longer than the run: lr never peaks


@pytest.mark.parametrize("bad", [-1, 2.5, True, "10"])
def test_bad_warmup_steps_name_the_option(bad):
    with pytest.raises(ValueError, match="task.module.warmup_steps"):
        RegressionTask(warmup_steps=bad)


def test_warmup_counts_optimizer_steps_under_accumulation(tmp_path):
    # 12 micro-batches, 2 per optimizer step: 6 optimizer steps; a 4-step warm-up then decay to 0 at step 6.
    task = RegressionTask(warmup_ratio=0.5, warmup_steps=4)
    trainer = fit(task, tmp_path, batches=12, accumulate_grad_batches=2)
    assert trainer.global_step == 6
    assert task.lrs == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 0.5])


def test_ratio_warmup_counts_optimizer_steps_under_accumulation(tmp_path):
    task = RegressionTask(warmup_ratio=0.5)  # half of the 6 optimizer steps
    fit(task, tmp_path, batches=12, accumulate_grad_batches=2)
    assert task.lrs == pytest.approx([1 / 3, 2 / 3, 1.0, 1.0, 2 / 3, 1 / 3])


def test_resumed_run_continues_the_warmup(tmp_path):
    # A checkpoint written mid-epoch after 3 of 8 optimizer steps (as last.ckpt is), then resumed from it.
    from lightning.pytorch.callbacks import ModelCheckpoint

    uninterrupted = RegressionTask(warmup_steps=4)
    every_3 = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)
    fit(uninterrupted, tmp_path / "whole", batches=8, enable_checkpointing=True, callbacks=[every_3])
    assert uninterrupted.lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])

    resumed = RegressionTask(warmup_steps=4)
    checkpoint = next((tmp_path / "ckpt").glob("*step=3.ckpt"))
    L.Trainer(**trainer_settings(tmp_path)).fit(resumed, train_dataloaders=loader(8), ckpt_path=checkpoint)
    assert resumed.lrs == pytest.approx(uninterrupted.lrs[3:])
