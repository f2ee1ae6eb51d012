"""Beyond one run: Hydra's submitit launcher (local here, SLURM's sbatch script checked), the Optuna sweeper on
Memoria's hyperparameters, and `memoria-exp --help`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_module
from hydra.utils import instantiate
from omegaconf import OmegaConf

from experiment.cli import objective

# The embedded tiny sorting run, smaller: each job takes seconds on a CPU.
TINY = ["task.data.num_train=64", "task.data.num_dev=16", "task.data.num_test=16", "trainer.max_epochs=1",
        "logger=none", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
        "print_summary=false"]


def memoria_exp(args: list[str], tmp_path: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "MEMORIA_CACHE_DIR": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "experiment.cli", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_a_two_job_multirun_through_the_submitit_local_launcher(tmp_path):
    sweep = tmp_path / "sweep"
    done = memoria_exp(["-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10", "seed=1,2",
                        f"hydra.sweep.dir={sweep}", *TINY], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Submitit 'local' sweep output dir" in done.stdout + done.stderr
    results = [json.loads((sweep / str(job) / "results.json").read_text()) for job in (0, 1)]
    assert [r["seed"] for r in results] == [1, 2]
    assert all(r["global_step"] == 2 and r["test"]["test/acc-final"] >= 0 for r in results)  # 64 / 32 steps
    assert len(list((sweep / ".submitit").glob("*/*_result.pkl"))) == 2  # each job ran as its own submitit job


def test_a_two_trial_optuna_search_writes_the_best_parameters(tmp_path):
    sweep = tmp_path / "search"
    done = memoria_exp(["hparams_search=sort_optuna", "hydra.sweeper.n_trials=2",
                        "hydra.sweeper.sampler.n_startup_trials=2", f"hydra.sweep.dir={sweep}", *TINY], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert set(best["best_params"]) == {"memory.initial_lifespan", "memory.lifespan_extend_scale",
                                        "memory.ltm_search_depth", "memory.num_reminded_stm",
                                        "memory.num_reminded_ltm", "task.module.learning_rate"}
    trials = [json.loads((sweep / str(job) / "results.json").read_text()) for job in (0, 1)]
    # The objective is each run's monitored metric (val/acc-final, maximised): the best trial's score.
    assert best["best_value"] == pytest.approx(max(t["best_score"] for t in trials))
    overrides = yaml.safe_load((sweep / "0" / ".hydra" / "overrides.yaml").read_text())
    assert any(o.startswith("memory.initial_lifespan=") for o in overrides)


def test_objective_is_the_monitored_metric():
    assert objective({"best_score": 0.25, "monitor": "val/acc-final"}) == 0.25
    assert objective({"best_score": None, "monitor": "val/ppl", "val": {"val/ppl": 31.5}}) == 31.5  # mode=eval
    assert objective({"best_score": None, "monitor": "val/ppl"}) is None  # no validation ran


def compose_with_hydra(overrides: list[str]):
    with initialize_config_module(config_module="conf", version_base="1.3"):
        return compose(config_name="config", overrides=overrides, return_hydra_config=True)


def test_the_slurm_preset_asks_one_task_per_gpu_on_every_node(tmp_path, monkeypatch):
    import submitit

    fake_bin = tmp_path / "bin"  # submitit's SLURM executor insists on finding srun; nothing is submitted here
    fake_bin.mkdir()
    (fake_bin / "srun").write_text("#!/bin/sh\nexit 1\n")
    (fake_bin / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}{os.pathsep}{os.environ['PATH']}")
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    cfg = compose_with_hydra(["hydra/launcher=slurm", "experiment=wikitext103", "trainer=ddp", "trainer.devices=4",
                              "+trainer.num_nodes=2", "hydra.launcher.partition=gpu",
                              f"hydra.sweep.dir={tmp_path}"])
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["_target_"].endswith("SlurmLauncher")
    assert (launcher["nodes"], launcher["gpus_per_node"], launcher["tasks_per_node"]) == (2, 4, 4)
    assert launcher["signal_delay_s"] > 0 and launcher["max_num_timeout"] > 0
    # The sbatch script submitit writes from these settings (as hydra-submitit-launcher passes them).
    executor = submitit.AutoExecutor(folder=str(tmp_path), cluster="slurm",
                                     slurm_max_num_timeout=launcher["max_num_timeout"])
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{key if key in base else f"slurm_{key}": value for key, value in launcher.items()
                                  if key not in ("_target_", "submitit_folder", "max_num_timeout")})
    script = executor._executor._make_submission_file_text("python -m experiment.cli", "uid")
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --partition=gpu", "#SBATCH --signal=USR2@300", "#SBATCH --time=2880"):
        assert line in script


def test_the_slurm_preset_follows_a_single_gpu_trainer(tmp_path):
    cfg = compose_with_hydra(["hydra/launcher=slurm", "experiment=sort_paper", f"hydra.sweep.dir={tmp_path}"])
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert (launcher["nodes"], launcher["gpus_per_node"], launcher["tasks_per_node"]) == (1, 1, 1)
    assert instantiate(cfg.hydra.launcher).params["gpus_per_node"] == 1  # the plugin takes the preset


def test_help_describes_the_tool_before_hydras_groups(tmp_path):
    done = memoria_exp(["--help"], tmp_path, timeout=120)
    assert done.returncode == 0
    text = done.stdout
    assert text.startswith("memoria-exp: Memoria (Park & Bak, ICML 2024)")
    commands = text[text.index("== Five useful commands =="):text.index("== Configuration groups ==")]
    assert sum(line.strip().startswith("memoria-exp") for line in commands.splitlines()) == 5
    assert "hparams_search: sort_optuna" in text and "--hydra-help" in text
