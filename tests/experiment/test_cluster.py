"""SLURM through submitit: the checkpoint saved on the pre-limit signal, and the requeued job resuming from it."""

from __future__ import annotations

import os
import shutil
import signal

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.demos.boring_classes import BoringModel

from experiment.cli import compose_config, run
from experiment.cluster import REQUEUE_CHECKPOINT, RequeueCheckpoint, requeue_checkpoint, submitit_signal


class SignalAt(Callback):
    """Sends `signum` to this process at one training batch, as SLURM does before the time limit."""

    def __init__(self, signum, batch):
        self.signum, self.batch = signum, batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.batch:
            os.kill(os.getpid(), self.signum)


def test_the_signal_saves_a_checkpoint_then_reaches_submitits_handler(tmp_path):
    calls = []
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: calls.append(signum))  # stands for submitit's
    try:
        path = tmp_path / "checkpoints" / REQUEUE_CHECKPOINT
        trainer = L.Trainer(max_steps=20, callbacks=[SignalAt(signal.SIGUSR2, 3),
                                                     RequeueCheckpoint(path, signal.SIGUSR2)],
                            logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, default_root_dir=str(tmp_path))
        trainer.fit(BoringModel())
        assert calls == [signal.SIGUSR2]  # handed on once, after the save
        assert trainer.global_step == 4  # stopped at the batch that saw the signal
        assert requeue_checkpoint(tmp_path) == path
        assert torch.load(path, weights_only=False)["global_step"] == 4
        signal.getsignal(signal.SIGUSR2)(signal.SIGUSR2, None)  # after fit: submitit's handler is back in place
        assert len(calls) == 2
    finally:
        signal.signal(signal.SIGUSR2, previous)


def test_submitit_signal_only_inside_a_submitit_slurm_job(monkeypatch):
    monkeypatch.delenv("SUBMITIT_EXECUTOR", raising=False)
    assert submitit_signal() is None
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    assert submitit_signal() == signal.SIGUSR2
    monkeypatch.setenv("SUBMITIT_PREEMPT_SIGNAL", "USR1")
    assert submitit_signal() == signal.SIGUSR1


def test_a_requeued_job_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMORIA_CACHE_DIR", str(tmp_path / "cache"))
    tiny = ["task.data.num_train=64", "task.data.num_dev=16", "task.data.num_test=16", "logger=none",
            "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "print_summary=false"]
    first = run(compose_config([*tiny, "trainer.max_epochs=1"]), run_dir=tmp_path / "first")
    assert first["global_step"] == 2
    rerun_dir = tmp_path / "rerun"  # the requeued job's directory, holding what it saved at the signal
    (rerun_dir / "checkpoints").mkdir(parents=True)
    shutil.copy(first["last_checkpoint"], rerun_dir / "checkpoints" / REQUEUE_CHECKPOINT)
    again = run(compose_config([*tiny, "trainer.max_epochs=2"]), run_dir=rerun_dir)
    assert again["global_step"] == 4  # epoch 2 only: epoch 1 came from the checkpoint
