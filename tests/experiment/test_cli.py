"""The `memoria-exp` runner: config composition, runs in-process and as a subprocess, multirun, resume, eval, bad
input, loggers."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from experiment.cli import ConfigError, format_summary, run, validate_config
from experiment.loggers import build_logger, wandb_should_be_offline
from tests.conftest import CONF_DIR, PYTHON, REPO_ROOT, TINY_SORTING, compose_config, subprocess_env

TASKS = sorted(p.stem for p in (CONF_DIR / "task").glob("*.yaml"))
TINY_MODELS = sorted(p.stem for p in (CONF_DIR / "model").glob("*_tiny.yaml"))
# the sequence models (classification models, `family: classification`, run in tests of their own task)
SEQUENCE_TINY_MODELS = [m for m in TINY_MODELS
                        if OmegaConf.load(CONF_DIR / "model" / f"{m}.yaml").get("family") != "classification"]
PRESETS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
FAST = ["trainer.limit_val_batches=1", "trainer.limit_test_batches=1"]


def cli(args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", "experiment.cli", *args], cwd=cwd, env=subprocess_env(),
                          capture_output=True, text=True, timeout=timeout, check=False)


def test_discovery_finds_the_sorting_task_and_tiny_models():
    assert "sorting" in TASKS
    assert {"memoria_gpt2_tiny", "gpt2_tiny"} <= set(TINY_MODELS)


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("model", TINY_MODELS)
def test_every_task_model_pair_composes_and_validates(task, model):
    cfg = compose_config([f"task={task}", f"model={model}"])
    validate_config(cfg)
    resolved = OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    assert resolved["task"]["name"] == task and resolved["model"]["name"] == model
    assert resolved["trainer"]["inference_mode"] is False


@pytest.mark.parametrize("preset", PRESETS)
def test_every_experiment_preset_composes_and_validates(preset):
    cfg = compose_config([f"experiment={preset}", "trainer.accelerator=cpu"])
    validate_config(cfg)
    OmegaConf.to_container(cfg, resolve=True)


def test_sort_paper_preset_holds_the_paper_settings():
    cfg = compose_config(["experiment=sort_paper"])
    assert cfg.model.name == "memoria_gpt2_sort" and cfg.memory.initial_lifespan == 5
    assert cfg.memory.lifespan_extend_scale == 8 and cfg.memory.ltm_search_depth == 10
    module, data = cfg.task.module, cfg.task.data
    assert (module.learning_rate, module.warmup_ratio, module.max_grad_norm, module.schedule) == (
        2e-4, 0.06, 1.0, "linear")
    assert (data.num_train, data.num_dev, data.num_test, data.batch_size, data.eval_batch_size) == (
        80000, 800, 800, 32, 1)
    assert cfg.trainer.max_epochs == 5 and cfg.seed == 42 and cfg.trainer.precision == "32-true"
    assert module.warmup_steps == 750  # the paper's 6% of 12,500 steps, kept absolute for shorter runs
    assert compose_config(["experiment=sort_paper", "model=transformer_xl_sort"]).model.name == "transformer_xl_sort"
    assert compose_config(["experiment=sort_quick"]).task.module.warmup_steps == 200


SORT_CPU_MODELS = ["memoria_gpt2_sort_cpu", "gpt2_sort_cpu", "transformer_xl_sort_cpu", "compressive_sort_cpu",
                   "infinity_former_sort_cpu"]


@pytest.mark.parametrize("model", SORT_CPU_MODELS)
def test_sort_cpu_study_runs_one_step_of_every_model(model, tmp_path):
    """experiment=sort_cpu at its shortest length (two segments): one optimizer step, validation and test, and the
    memory-less line of the test examples beside the accuracy."""
    cfg = compose_config(["experiment=sort_cpu", f"model={model}", "task.data.length=44", "task.data.num_train=32",
                          "task.data.num_dev=8", "task.data.num_test=8", "trainer.max_steps=1", "logger=none"])
    assert cfg.task.module.segment_size == 32 and cfg.task.module.warmup_steps == 150
    assert (cfg.task.data.length + 20) % cfg.task.module.segment_size == 0  # the answer's segment shows 12 symbols
    results = run(cfg, run_dir=tmp_path)
    assert results["global_step"] == 1
    assert 0.0 <= results["test"]["test/acc-final"] <= 1.0
    assert 0.0 < results["test"]["test/memoryless-acc"] <= 1.0


@pytest.mark.parametrize("model", SEQUENCE_TINY_MODELS)
def test_sorting_runs_a_few_steps_with_every_tiny_model(model, tmp_path):
    cfg = compose_config([f"model={model}", *TINY_SORTING, *FAST, "trainer.max_steps=2", "logger=none"])
    results = run(cfg, run_dir=tmp_path)
    assert results["global_step"] == 2
    assert 0.0 <= results["test"]["test/acc-final"] <= 1.0
    assert Path(results["last_checkpoint"]).is_file() and Path(results["best_checkpoint"]).is_file()
    assert json.loads((tmp_path / "results.json").read_text())["test"] == results["test"]


def test_cli_subprocess_trains_tests_and_saves_everything(tmp_path):
    run_dir = tmp_path / "run"
    done = cli([*TINY_SORTING, *FAST, f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "memoria-exp summary" in done.stdout and "test/acc-final" in done.stdout
    assert (run_dir / "config_resolved.yaml").is_file()
    assert (run_dir / "metrics.csv").is_file()
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert list((run_dir / "checkpoints").glob("best-*.ckpt"))
    results = json.loads((run_dir / "results.json").read_text())
    assert results["tested_checkpoint"].endswith("last.ckpt")  # the paper tests the last checkpoint
    saved = OmegaConf.load(run_dir / "config_resolved.yaml")
    assert saved.task.data.length == 60 and saved.model.name == "memoria_gpt2_tiny"


def test_multirun_gives_each_job_its_own_directory(tmp_path):
    sweep = tmp_path / "sweep"
    done = cli(["-m", "seed=1,2", "memory.initial_lifespan=5,9", *TINY_SORTING, *FAST, "trainer.max_steps=1",
                "logger=none", "print_summary=false", f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    jobs = sorted(p.parent for p in sweep.glob("*/results.json"))
    assert len(jobs) == 4
    seen = {(OmegaConf.load(job / "config_resolved.yaml").seed,
             OmegaConf.load(job / "config_resolved.yaml").memory.initial_lifespan) for job in jobs}
    assert seen == {(1, 5), (1, 9), (2, 5), (2, 9)}
    assert all((job / "checkpoints" / "last.ckpt").is_file() for job in jobs)


def _final_weights(results: dict) -> dict:
    return torch.load(results["last_checkpoint"], map_location="cpu", weights_only=False)["state_dict"]


def test_resume_from_checkpoint_matches_an_uninterrupted_run(tmp_path, monkeypatch):
    from experiment.tasks.sorting import SortingTask

    base = [*TINY_SORTING, "logger=csv", "print_summary=false", "model.config.n_positions=32",
            "trainer.max_epochs=2"]
    straight = run(compose_config(base), run_dir=tmp_path / "straight")
    with monkeypatch.context() as patch:  # the same run, interrupted after its first epoch
        patch.setattr(SortingTask, "on_train_epoch_end", lambda self: setattr(self.trainer, "should_stop", True))
        first = run(compose_config(base), run_dir=tmp_path / "first")
    resumed = run(compose_config([*base, f"ckpt_path={first['last_checkpoint']}"]), run_dir=tmp_path / "resumed")
    assert first["global_step"] == 2 and resumed["global_step"] == straight["global_step"] == 4
    expected, got = _final_weights(straight), _final_weights(resumed)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.allclose(expected[name], got[name], atol=1e-6), name
    assert resumed["test"]["test/acc-final"] == pytest.approx(straight["test"]["test/acc-final"])


def test_eval_mode_tests_a_checkpoint_without_training(tmp_path):
    trained = run(compose_config([*TINY_SORTING, *FAST, "trainer.max_steps=1", "logger=none"]), run_dir=tmp_path / "a")
    evaluated = run(compose_config([*TINY_SORTING, "logger=none", "mode=eval",
                                    f"ckpt_path={trained['last_checkpoint']}"]), run_dir=tmp_path / "b")
    assert evaluated["mode"] == "eval" and "global_step" not in evaluated
    assert "val/acc-final" in evaluated["val"] and "test/acc-final" in evaluated["test"]
    assert not (tmp_path / "b" / "checkpoints").exists() or not list((tmp_path / "b" / "checkpoints").iterdir())


# ------------------------------------------------------------------------------------------------------------------
# bad input
@pytest.mark.parametrize(
    "override, named",
    [
        ("no_such_key=1", "no_such_key"),  # unknown key: Hydra's error names it
        ("task.data.lenght=3", "task.data.lenght"),
        ("seed=abc", "seed"),  # wrong type: Hydra's error names the key
        ("mode=training", "mode"),
    ],
)
def test_hydra_rejects_unknown_keys_and_wrong_types(override, named, tmp_path):
    done = cli([override], cwd=tmp_path, timeout=120)
    assert done.returncode != 0
    assert f"full_key: {named}" in done.stderr
    assert not (tmp_path / "outputs").exists() or not list((tmp_path / "outputs").rglob("results.json"))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["task.module.segment_size=300"], r"task\.module\.segment_size=300 is longer than the model's 256 positions"),
        (["memory.initial_lifespan=0"], r"memory\.initial_lifespan=0 is not allowed; set memory\.initial_lifespan to"),
        (["memory.stm_capacity=-4"], r"memory\.stm_capacity=-4 is not allowed"),
        (["memory.num_reminded_stm=-1"], r"memory\.num_reminded_stm=-1 is not allowed; .* >= 0"),
        (["mode=eval"], r"add ckpt_path="),
        (["ckpt_path=/nonexistent/last.ckpt"], r"is not a file"),
        (["task.data.length=abc"], r"task\.data\.length='abc' has the wrong type; it must be int"),
        (["task.module.learning_rate=0"], r"learning_rate must be > 0"),
        (["progress_refresh_rate=0"], r"progress_refresh_rate=0 must be >= 1 .*enable_progress_bar=false"),
        pytest.param(["trainer=gpu"], r"no CUDA GPU is visible; use trainer=cpu",
                     marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")),
    ],
)
def test_impossible_settings_fail_before_training(overrides, message, tmp_path):
    cfg = compose_config([*TINY_SORTING, "logger=none", *overrides])
    with pytest.raises(ConfigError, match=message):
        run(cfg, run_dir=tmp_path)
    assert not (tmp_path / "results.json").exists() and not (tmp_path / "checkpoints").exists()


def test_cli_reports_a_config_error_in_one_line_and_exit_code_2(tmp_path):
    done = cli([*TINY_SORTING, "task.module.segment_size=300", f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert done.returncode == 2
    errors = [line for line in (done.stdout + done.stderr).splitlines() if "memoria-exp: error:" in line]
    assert len(errors) == 1 and "lower task.module.segment_size to at most 256" in errors[0]
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "run" / "results.json").exists()


def test_a_run_never_writes_results_before_it_finished(tmp_path, monkeypatch):
    import lightning.pytorch as pl

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pl.Trainer, "test", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(compose_config([*TINY_SORTING, *FAST, "trainer.max_steps=1", "logger=none"]), run_dir=tmp_path)
    assert not (tmp_path / "results.json").exists()
    assert not list(tmp_path.rglob("*.tmp"))


# ------------------------------------------------------------------------------------------------------------------
# loggers and output
def test_wandb_goes_offline_without_key_or_network(tmp_path, monkeypatch, caplog):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))  # no stored key
    offline, reason = wandb_should_be_offline("auto")
    assert offline and "API key" in reason
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens there
    offline, reason = wandb_should_be_offline("auto")
    assert offline and "cannot be reached" in reason
    assert wandb_should_be_offline(False) == (False, "offline=false")
    with caplog.at_level("WARNING"):
        logger = build_logger({"kind": "wandb", "project": "test", "entity": None, "group": None, "tags": [],
                               "offline": "auto"}, tmp_path, "run")
    assert type(logger).__name__ == "WandbLogger" and logger._offline
    assert len([r for r in caplog.records if "wandb: logging offline" in r.getMessage()]) == 1
    run_id = (tmp_path / "wandb_run_id.txt").read_text()
    assert logger.version == run_id  # recorded before the run starts
    resumed = build_logger({"kind": "wandb", "offline": True}, tmp_path / "resumed", "run",
                           resume_from=tmp_path / "checkpoints" / "last.ckpt")
    assert resumed.version == run_id  # resuming this run's checkpoint continues the same W&B run


def test_wandb_is_imported_only_when_chosen(tmp_path):
    code = (
        "import sys; from experiment.loggers import build_logger; import experiment.cli, experiment.tasks.sorting;"
        f"build_logger({{'kind': 'csv'}}, {str(tmp_path)!r}, 'x'); build_logger({{'kind': 'none'}}, '.', 'x');"
        "assert 'wandb' not in sys.modules, 'wandb imported'"
    )
    done = subprocess.run([PYTHON, "-c", code], cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]


def test_unknown_logger_kind_is_refused(tmp_path):
    with pytest.raises(ValueError, match="choose one of csv, tensorboard, wandb, none"):
        build_logger({"kind": "mlflow"}, tmp_path, "x")


def test_summary_table_lists_the_metrics():
    table = format_summary({"task": "sorting", "model": "m", "seed": 1, "mode": "train", "run_dir": "/r",
                            "num_parameters": 1234, "global_step": 5, "best_score": 0.5, "monitor": "val/acc-final",
                            "val": {"val/acc-final": 0.5}, "test": {"test/acc-final": 0.25},
                            "tested_checkpoint": "/r/last.ckpt", "wall_time_s": 1.0})
    assert re.search(r"\| test/acc-final +\| 0\.2500 +\|", table) and "1,234" in table
    assert table.splitlines()[0].startswith("+")


@pytest.mark.slow
def test_configs_are_found_from_an_installed_wheel(tmp_path):
    """Non-editable install into a folder, run from outside the repository: configs come from the package."""
    import shutil

    source, site = tmp_path / "source", tmp_path / "site"
    # Build from a copy, so setuptools' build folders never land in the repository.
    shutil.copytree(REPO_ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "refvenv", "build", "*.egg-info", "outputs", "multirun", "__pycache__", ".*cache"))
    build = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--quiet",
                            "--target", str(site), str(source)], capture_output=True, text=True, timeout=600,
                           check=False)
    assert build.returncode == 0, build.stderr[-2000:]
    assert (site / "conf" / "config.yaml").is_file() and (site / "conf" / "task" / "sorting.yaml").is_file()
    env = subprocess_env()
    env["PYTHONPATH"] = str(site)
    code = ("import conf, sys; print(conf.__file__); "
            "sys.argv = ['memoria-exp', '--cfg', 'job']; from experiment.cli import main; main()")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert str(site) in done.stdout.splitlines()[0]
    assert "name: memoria_gpt2_tiny" in done.stdout


@pytest.mark.slow
def test_ddp_spawn_on_two_cpu_processes(tmp_path):
    """trainer=ddp spawns its workers: one run directory, results from rank 0, exact sums across ranks."""
    run_dir = tmp_path / "run"
    done = cli([*TINY_SORTING, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
                "task.data.batch_size=4", "task.data.num_dev=7", "logger=csv", f"hydra.run.dir={run_dir}"],
               cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["global_step"] == 2  # 16 examples / (2 ranks x 4)
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no extra Hydra directories from workers
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert len(state["memory_state_per_rank"]) == 2


def test_compile_true_compiles_every_block_before_training(tmp_path, monkeypatch):
    import experiment.models

    compiled = []
    real = experiment.models.compile_blocks

    def eager_compile(model, **kwargs):  # the real function, with the tracing-only backend (fast on a CPU)
        compiled.append(real(model, backend="eager"))
        return compiled[-1]

    monkeypatch.setattr(experiment.models, "compile_blocks", eager_compile)
    cfg = compose_config([*TINY_SORTING, *FAST, "trainer.max_steps=2", "logger=none", "compile=true"])
    results = run(cfg, run_dir=tmp_path)
    assert compiled == [cfg.model.config.n_layer] and results["test"]
    torch._dynamo.reset()


def test_compile_mode_reaches_torch_compile_and_graph_modes_mark_every_batch(tmp_path, monkeypatch):
    import experiment.models

    modes, marks = [], []
    real = experiment.models.compile_blocks

    def eager_compile(model, **kwargs):  # the real function with the tracing-only backend; record the mode
        modes.append(kwargs.get("mode"))
        return real(model, backend="eager")

    monkeypatch.setattr(experiment.models, "compile_blocks", eager_compile)
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    cfg = compose_config([*TINY_SORTING, *FAST, "trainer.max_steps=2", "logger=none", "compile=true",
                          "compile_mode=reduce-overhead"])
    results = run(cfg, run_dir=tmp_path)
    torch._dynamo.reset()
    assert modes == ["reduce-overhead"] and results["test"]
    assert len(marks) >= 2 + 1  # two training batches, at least one test batch (and the validation batches)
    marks.clear()
    run(compose_config([*TINY_SORTING, *FAST, "trainer.max_steps=1", "logger=none"]), run_dir=tmp_path / "plain")
    assert marks == []  # no marker without a graph mode


def test_unknown_compile_mode_is_refused_with_the_choices():
    with pytest.raises(ConfigError, match="compile_mode=fastest .*reduce-overhead"):
        validate_config(compose_config([*TINY_SORTING, "compile=true", "compile_mode=fastest"]))


def test_compile_options_go_to_torch_compile_with_the_modes_own(tmp_path, monkeypatch):
    """compile_options: inductor options added to compile_mode's (torch.compile takes one or the other); with
    the mode's CUDA graphs among them the step marker is on."""
    import experiment.models

    settings, marks = [], []
    real = experiment.models.compile_blocks

    def eager_compile(model, **kwargs):  # record what torch.compile would get; trace with the eager backend
        settings.append(kwargs)
        return real(model, backend="eager")

    monkeypatch.setattr(experiment.models, "compile_blocks", eager_compile)
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    cfg = compose_config([*TINY_SORTING, *FAST, "trainer.max_steps=1", "logger=none", "compile=true",
                          "compile_mode=reduce-overhead",
                          "compile_options={post_grad_fusion_options: {batch_linear_post_grad: {}}}"])
    results = run(cfg, run_dir=tmp_path)
    torch._dynamo.reset()
    assert settings == [{"options": {"triton.cudagraphs": True,
                                     "post_grad_fusion_options": {"batch_linear_post_grad": {}}}}]
    assert results["test"] and marks


@pytest.mark.parametrize("value, message", [("3", "must be a mapping"), ("{no_such_option: 1}", "no_such_option")])
def test_bad_compile_options_are_refused(value, message):
    with pytest.raises(ConfigError, match=message):
        validate_config(compose_config([*TINY_SORTING, "compile=true", f"compile_options={value}"]))


@pytest.mark.parametrize("overrides, rate", [(["trainer.enable_progress_bar=true"], 1),
                                             (["trainer.enable_progress_bar=true", "progress_refresh_rate=7"], 7),
                                             (["trainer.enable_progress_bar=false"], None)])
def test_progress_bar_updates_every_progress_refresh_rate_steps(overrides, rate, tmp_path, monkeypatch):
    """The bar's refresh rate comes from the config (each update reads the logged values back from the device);
    no bar, no callback."""
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import TQDMProgressBar

    bars = []
    real_init = pl.Trainer.__init__

    def recording_init(self, *args, **kwargs):
        bars.extend(c for c in kwargs.get("callbacks") or [] if isinstance(c, TQDMProgressBar))
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(pl.Trainer, "__init__", recording_init)
    run(compose_config([*TINY_SORTING, *FAST, "trainer.max_steps=1", "logger=none", *overrides]), run_dir=tmp_path)
    assert [bar.refresh_rate for bar in bars] == ([] if rate is None else [rate])


def test_gpu_presets_update_the_progress_bar_every_50_steps():
    for preset in ("wikitext103", "pg19", "enwik8", "sort_paper", "wikitext103_quick", "sort_quick"):
        assert compose_config([f"experiment={preset}"]).progress_refresh_rate == 50, preset
