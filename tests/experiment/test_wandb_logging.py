"""W&B as the design says: the GPU presets log to W&B and CSV together; tags, summary and a multirun's group."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

import conf
from experiment import loggers
from experiment.cli import compose_config, run
from experiment.loggers import build_logger, run_tags

PRESETS = sorted(p.stem for p in (Path(conf.__file__).parent / "experiment").glob("*.yaml"))
# the CPU demos and studies (trainer=cpu) keep the default logger
GPU_PRESETS = [name for name in PRESETS if compose_config([f"experiment={name}"]).trainer.accelerator != "cpu"]


@pytest.mark.parametrize("preset", GPU_PRESETS)
def test_gpu_presets_log_to_wandb_and_csv_and_logger_still_picks_one(preset):
    assert list(compose_config([f"experiment={preset}"]).logger.kind) == ["wandb", "csv"]
    assert compose_config([f"experiment={preset}", "logger=csv"]).logger.kind == "csv"
    assert compose_config([f"experiment={preset}", "logger=wandb"]).logger.kind == "wandb"


def test_the_default_run_logs_to_csv_only():
    assert compose_config([]).logger.kind == "csv"


def test_a_list_of_loggers_and_the_automatic_tags(tmp_path):
    config = {"task": {"name": "sorting"}, "model": {"name": "memoria_gpt2_tiny"}}
    loggers = build_logger({"kind": ["wandb", "csv"], "project": "test", "tags": ["mine"], "offline": True},
                           tmp_path, "run", config)
    assert [type(one).__name__ for one in loggers] == ["WandbLogger", "CSVLogger"]
    assert loggers[0]._wandb_init["tags"] == ["mine", "sorting", "memoria_gpt2_tiny"]
    assert loggers[0]._wandb_init.get("group") is None  # a single run: no group
    assert build_logger({"kind": ["none"]}, tmp_path, "run") is False


def test_a_multirun_groups_its_jobs_under_the_sweep(tmp_path):
    with initialize_config_module(config_module="conf", version_base="1.3"):
        cfg = compose(config_name="config", return_hydra_config=True,
                      overrides=["experiment=sort_quick", "hydra.mode=MULTIRUN",
                                 f"hydra.sweep.dir={tmp_path}/multirun/2026-01-02_03-04-05"])
    HydraConfig.instance().set_config(cfg)
    try:
        resolved = OmegaConf.to_container(cfg, resolve=False)
        logger = build_logger(cfg.logger, tmp_path, "run", resolved)[0]
        assert logger._wandb_init["group"] == "sweep-2026-01-02_03-04-05"
        assert run_tags(resolved) == ["sorting", "memoria_gpt2_sort", "sort_quick"]  # task, model, setting
        explicit = build_logger({**OmegaConf.to_container(cfg.logger), "group": "mine"}, tmp_path, "run", resolved)
        assert explicit[0]._wandb_init["group"] == "mine"
    finally:
        HydraConfig.instance().cfg = None


def test_a_run_sends_config_summary_and_checkpoint_path_to_wandb(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMORIA_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    seen = {}
    original = loggers.record_summary

    def spy(logger, results):  # read the W&B run back before the run finishes it
        original(logger, results)
        [wandb_logger] = [one for one in logger if type(one).__name__ == "WandbLogger"]
        run_ = wandb_logger.experiment
        seen["summary"] = {key: run_.summary[key] for key in ("test/acc-final", "best_score", "tested_checkpoint",
                                                              "best_checkpoint", "global_step")}
        seen["config"] = dict(run_.config)
        seen["tags"] = list(run_.tags)

    monkeypatch.setattr(loggers, "record_summary", spy)
    cfg = compose_config(["logger=wandb_csv", "task.data.num_train=64", "task.data.num_dev=16",
                          "task.data.num_test=16", "trainer.max_epochs=1", "trainer.enable_progress_bar=false",
                          "trainer.enable_model_summary=false", "print_summary=false"])
    results = run(cfg, run_dir=tmp_path / "run")
    assert (tmp_path / "run" / "metrics.csv").is_file()  # the CSV logger ran alongside
    assert len(list((tmp_path / "run" / "wandb").glob("offline-run-*/*.wandb"))) == 1
    summary = seen["summary"]
    assert summary["test/acc-final"] == pytest.approx(results["test"]["test/acc-final"])
    assert summary["tested_checkpoint"] == results["tested_checkpoint"] == str(tmp_path / "run" / "checkpoints" /
                                                                               "last.ckpt")
    assert summary["best_score"] == pytest.approx(results["best_score"]) and summary["global_step"] == 2
    assert summary["best_checkpoint"] == results["best_checkpoint"]
    assert seen["config"]["task"]["name"] == "sorting" and seen["config"]["model"]["name"] == "memoria_gpt2_tiny"
    assert seen["tags"] == ["sorting", "memoria_gpt2_tiny"]
