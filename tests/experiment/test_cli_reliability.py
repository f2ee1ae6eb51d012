"""The runner's reliability (issue 24): a run directory of its own for every run, no code from checkpoints, one-line
errors with exit codes 2 (bad setting or file) and 3 (data unavailable), data paths checked before the network, and
Ctrl-C / SIGTERM saving a checkpoint that resumes to the same result."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from experiment.checkpoints import CheckpointError, read_checkpoint
from experiment.cli import RUN_DIR_ENV, ConfigError, RunStopped, run, unique_dir
from tests.conftest import PYTHON, TINY_SORTING, compose_config, subprocess_env
from tests.experiment.data.lm_fixtures import enwik8_like_bytes

QUIET = ["trainer.enable_progress_bar=false", "print_summary=false"]


def cli(args: list[str], cwd: Path, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", "experiment.cli", *args], cwd=cwd, env=env or subprocess_env(),
                          capture_output=True, text=True, timeout=timeout, check=False)


def one_line_error(done: subprocess.CompletedProcess, code: int) -> str:
    """The single error line of a run that must fail with `code` and no traceback."""
    output = done.stdout + done.stderr
    assert done.returncode == code, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    lines = [line for line in output.splitlines() if line.startswith("memoria-exp: ")]
    assert len(lines) == 1, output[-3000:]
    return lines[0]


# ------------------------------------------------------------------------------------------------------------------
# 1. a run directory of its own
def test_the_same_base_twice_gives_two_directories_created_exclusively(tmp_path, monkeypatch):
    base = str(tmp_path / "outputs" / "sorting" / "2026-01-01_00-00-00")  # a fixed clock: the same second
    monkeypatch.delenv(RUN_DIR_ENV, raising=False)
    first = unique_dir(base)
    assert unique_dir(base) == first  # Hydra resolves the run directory more than once in one process
    monkeypatch.delenv(RUN_DIR_ENV)  # another process, started in the same second
    second = unique_dir(base)
    monkeypatch.delenv(RUN_DIR_ENV)
    third = unique_dir(base)
    assert (first, second, third) == (base, f"{base}-1", f"{base}-2")
    assert all(Path(path).is_dir() for path in (first, second, third))
    monkeypatch.delenv(RUN_DIR_ENV)


def test_two_runs_started_together_never_share_a_directory(tmp_path):
    # The same timestamp for both (the resolver's argument is fixed here), two processes at once.
    base = tmp_path / "outputs" / "same-second"
    commands = [[PYTHON, "-m", "experiment.cli", f"seed={seed}", *TINY_SORTING, *QUIET, "logger=none",
                 "trainer.max_steps=1", "trainer.limit_val_batches=1", "trainer.limit_test_batches=1",
                 f"hydra.run.dir=${{unique_dir:{base}}}"] for seed in (1, 2)]
    env = subprocess_env()
    env.pop(RUN_DIR_ENV, None)
    processes = [subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for command in commands]
    outputs = [process.communicate(timeout=300) for process in processes]
    assert [process.returncode for process in processes] == [0, 0], [out[1][-2000:] for out in outputs]
    dirs = sorted(path for path in base.parent.iterdir() if path.name.startswith("same-second"))
    assert [path.name for path in dirs] == ["same-second", "same-second-1"]
    seeds = set()
    for path in dirs:  # each directory holds one run, consistently: results, config and checkpoint agree
        results = json.loads((path / "results.json").read_text())
        assert results["run_dir"] == str(path)
        assert OmegaConf.load(path / "config_resolved.yaml").seed == results["seed"]
        assert results["last_checkpoint"] == str(path / "checkpoints" / "last.ckpt")
        seeds.add(results["seed"])
    assert seeds == {1, 2}


def test_config_dirs_use_the_exclusive_resolver():
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="conf", version_base="1.3"):
        cfg = compose(config_name="config", return_hydra_config=True)
    for key in ("run", "sweep"):
        assert OmegaConf.to_container(cfg.hydra[key], resolve=False)["dir"].startswith("${unique_dir:")


# ------------------------------------------------------------------------------------------------------------------
# 2. no code from checkpoints
class _Planted:
    """What an attacker writes into a checkpoint: unpickling it creates a file (it could run anything)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


@pytest.fixture(scope="module")
def memoria_checkpoint(tmp_path_factory) -> Path:
    """last.ckpt of a one-step tiny Memoria GPT-2 run on sorting data."""
    run_dir = tmp_path_factory.mktemp("trained")
    results = run(compose_config([*TINY_SORTING, *QUIET, "logger=none", "trainer.max_steps=1",
                                  "trainer.limit_val_batches=1", "trainer.limit_test_batches=1"]), run_dir=run_dir)
    return Path(results["last_checkpoint"])


def test_a_planted_checkpoint_is_refused_and_runs_nothing(tmp_path, memoria_checkpoint):
    marker = tmp_path / "code-ran"
    state = torch.load(memoria_checkpoint, map_location="cpu", weights_only=True)
    state["hyper_parameters"] = {"payload": _Planted(marker)}
    planted = tmp_path / "run" / "checkpoints" / "last.ckpt"
    planted.parent.mkdir(parents=True)
    torch.save(state, planted)
    with pytest.raises(CheckpointError, match=r"holds .*unpickling can run code.*It is not loaded"):
        read_checkpoint(planted)
    assert not marker.exists()
    # The same file resumed through the CLI, in the run directory it was planted in.
    done = cli([*TINY_SORTING, *QUIET, "logger=none", f"ckpt_path={planted}", f"hydra.run.dir={planted.parent.parent}"],
               cwd=tmp_path)
    assert "unpickling can run code" in one_line_error(done, 2)
    assert not marker.exists()


def test_the_runners_own_checkpoints_read_safely(memoria_checkpoint):
    state = read_checkpoint(memoria_checkpoint)
    assert state["global_step"] == 1 and "state_dict" in state


# ------------------------------------------------------------------------------------------------------------------
# 4. bad input: one line, exit 2 (setting or file) / 3 (data unavailable), before any work
@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, memoria_checkpoint) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad")
    files = {
        "malformed.json": b'{"train": [1, 2',
        "shape.json": b'{"train": 5}',
        "truncated.ckpt": memoria_checkpoint.read_bytes()[:300],
        "garbage.ckpt": os.urandom(4000),
        "random.bin": os.urandom(3000),
    }
    zipped = root / "good.zip"
    import zipfile

    with zipfile.ZipFile(zipped, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("enwik8", enwik8_like_bytes(20_000))
    files["enwik8.zip"] = zipped.read_bytes()[:-200]  # truncated: its directory is gone
    for name, data in files.items():
        (root / name).write_bytes(data)
    paths = {name: root / name for name in files}
    paths["memoria.ckpt"] = memoria_checkpoint
    return paths


ENWIK8_SMALL = ["task=enwik8", "task.data.valid_bytes=2000", "task.data.test_bytes=2000"]


@pytest.mark.parametrize(
    "overrides, code, message",
    [
        (["trainer.max_epochs=abc"], 2, r"trainer\.max_epochs='abc' has the wrong type; it must be int or null"),
        (["trainer.max_epochs=-5"], 2, r"trainer\.max_epochs=-5 is not allowed"),
        (["trainer.precision=32-true", "trainer.log_every_n_steps=x"], 2, r"trainer\.log_every_n_steps='x'"),
        (["task.data.data_file={malformed.json}"], 2, r"malformed\.json: not valid JSON"),
        (["task.data.data_file={shape.json}"], 2, r"shape\.json: lacks keys"),
        (["task.data.data_file={missing.json}"], 3, r"missing\.json' does not exist"),
        (["ckpt_path={truncated.ckpt}"], 2, r"truncated\.ckpt is not a readable checkpoint"),
        (["ckpt_path={garbage.ckpt}"], 2, r"garbage\.ckpt is not a readable checkpoint"),
        (["mode=eval", "model=gpt2_tiny", "ckpt_path={memoria.ckpt}"], 2,
         r"was not written by this model: .* run with model=memoria_gpt2_tiny"),
        (["+model.config.foo=1"], 2, r"model\.config\.foo is not an option of GPT2WithMemoriaConfig"),
        ([*ENWIK8_SMALL, "task.data.path={enwik8.zip}"], 3, r"enwik8\.zip is a damaged zip"),
        ([*ENWIK8_SMALL, "task.data.path={random.bin}"], 3, r"random\.bin is not enwik8: .* not UTF-8 text"),
    ],
)
def test_bad_input_fails_in_one_line_with_its_exit_code(overrides, code, message, bad_files, tmp_path):
    import re

    args = [_fill(item, bad_files, tmp_path) for item in overrides]
    started = time.time()
    data = [] if args[0] == "task=enwik8" else TINY_SORTING
    done = cli([*data, *QUIET, "logger=none", *args, f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    line = one_line_error(done, code)
    assert re.search(message, line), line
    assert not (tmp_path / "run" / "results.json").exists()
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert time.time() - started < 120


def _fill(item: str, files: dict[str, Path], tmp_path: Path) -> str:
    """`{name}` in an override → the path of that bad file (`missing.json`: a path that does not exist)."""
    for name, path in {**files, "missing.json": tmp_path / "missing.json"}.items():
        item = item.replace("{" + name + "}", str(path))
    return item


def test_every_tiny_model_and_preset_still_validates():
    from experiment.cli import validate_config

    for overrides in (["model=gpt2_tiny"], ["model=memoria_gpt2_tiny"], ["model=transformer_xl_tiny"],
                      ["model=compressive_tiny"], ["model=infinity_former_tiny"],
                      ["experiment=sort_paper", "trainer.accelerator=cpu"],
                      ["experiment=wikitext103", "trainer.accelerator=cpu"]):
        validate_config(compose_config(overrides))
    with pytest.raises(ConfigError, match=r"model\.config\.n_layr is not an option"):
        validate_config(compose_config(["+model.config.n_layr=2"]))


# ------------------------------------------------------------------------------------------------------------------
# 5. data paths checked first, offline named at once
def test_a_missing_local_copy_is_named_before_any_network_call(tmp_path):
    env = subprocess_env()
    env.pop("HF_HUB_OFFLINE", None)  # would the tokenizer be fetched first, this would wait on the Hub
    started = time.time()
    done = cli(["task=wikitext103", "task.data.path=/nonexistent", f"hydra.run.dir={tmp_path / 'run'}"],
               cwd=tmp_path, env=env)
    line = one_line_error(done, 3)
    assert "/nonexistent/wiki.train.raw does not exist" in line and "task.data.path" in line
    assert "tokenizer" not in line
    assert time.time() - started < 90


def test_offline_without_a_path_names_every_option_at_once(tmp_path):
    env = {**subprocess_env(), "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}  # an empty Hub cache
    started = time.time()
    done = cli(["task=wikitext103", f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, env=env)
    line = one_line_error(done, 3)
    assert "task.data.tokenizer" in line and "task.data.path" in line
    assert "retry" not in (done.stdout + done.stderr).lower().replace("skips the retries", "")
    assert time.time() - started < 90


# ------------------------------------------------------------------------------------------------------------------
# 6. Ctrl-C / SIGTERM: a resumable checkpoint, partial results, the resume command
@pytest.fixture(scope="module")
def enwik8_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("enwik8") / "enwik8"
    path.write_bytes(enwik8_like_bytes(6000, seed=3))
    return path


def lm_overrides(enwik8_file: Path) -> list[str]:
    """A tiny enwik8 run: 2 lanes of 16 bytes, 5 training steps per epoch, validation after each epoch."""
    return ["task=enwik8", f"task.data.path={enwik8_file}", "task.data.valid_bytes=1000",
            "task.data.test_bytes=1000", "task.data.segment_length=16", "task.data.lanes=2",
            "task.module.reset_period=4", "memory=tiny", "trainer.max_epochs=2", "trainer.limit_train_batches=5",
            "trainer.limit_val_batches=2", "trainer.limit_test_batches=2", "trainer.log_every_n_steps=1",
            "logger=csv", *QUIET, "trainer.enable_model_summary=false"]


def _final_state(results: dict) -> dict:
    return read_checkpoint(results["last_checkpoint"])["state_dict"]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_mid_epoch_saves_and_the_resumed_run_ends_as_an_uninterrupted_one(signum, enwik8_file, tmp_path,
                                                                                   monkeypatch):
    from experiment.tasks.language_modeling import LanguageModelingTask

    base = lm_overrides(enwik8_file)
    straight = run(compose_config(base), run_dir=tmp_path / "straight")
    original = LanguageModelingTask.on_train_batch_end

    def signal_at_step_3(self, outputs, batch, batch_idx):
        if self.trainer.global_step == 3:
            os.kill(os.getpid(), signum)  # as from the terminal (SIGINT) or a scheduler (SIGTERM)
        return original(self, outputs, batch, batch_idx)

    with monkeypatch.context() as patch:
        patch.setattr(LanguageModelingTask, "on_train_batch_end", signal_at_step_3)
        with pytest.raises(RunStopped) as stopped:
            run(compose_config(base), run_dir=tmp_path / "run")
    assert stopped.value.exit_code == 128 + signum
    partial = json.loads((tmp_path / "run" / "results.json").read_text())
    assert partial["status"] == "interrupted" and "test" not in partial
    assert 3 <= partial["global_step"] < 5  # mid-epoch: the batch in flight finished, then it saved
    assert partial["last_checkpoint"] == str(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert f"ckpt_path={partial['last_checkpoint']}" in partial["resume_command"]
    assert f"hydra.run.dir={tmp_path / 'run'}" in partial["resume_command"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handlers are put back
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL

    resumed = run(compose_config([*base, f"ckpt_path={partial['last_checkpoint']}"]), run_dir=tmp_path / "run")
    assert resumed["status"] == "finished" and resumed["resumed_from"] == partial["last_checkpoint"]
    assert resumed["global_step"] == straight["global_step"] == 10
    expected, got = _final_state(straight), _final_state(resumed)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.allclose(expected[name], got[name], atol=1e-6), name
    assert resumed["test"] == pytest.approx(straight["test"], rel=1e-6, abs=1e-6)
    # One metrics file for the whole run: the rows before the interruption, then the resumed ones.
    import csv

    with open(tmp_path / "run" / "metrics.csv", newline="") as handle:
        steps = [int(row["step"]) for row in csv.DictReader(handle) if row.get("train/loss_step")]
    assert steps[0] < partial["global_step"] <= steps[-1]
    assert not (tmp_path / "run" / "metrics.before-resume.csv").exists()


def test_ctrl_c_in_the_cli_prints_the_resume_command_and_exits_130(tmp_path):
    run_dir = tmp_path / "run"
    args = [*(item for item in TINY_SORTING if "enable_progress_bar" not in item), "task.data.num_train=4000",
            "trainer.enable_progress_bar=true", "print_summary=false",
            "logger=csv", f"hydra.run.dir={run_dir}"]
    process = subprocess.Popen([PYTHON, "-m", "experiment.cli", *args], cwd=tmp_path, env=subprocess_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    seen = b""
    deadline = time.time() + 240
    os.set_blocking(process.stdout.fileno(), False)
    while b"Epoch 0:" not in seen or b"/500" not in seen:  # the progress bar (stdout): training has started
        assert process.poll() is None and time.time() < deadline, seen[-2000:]
        seen += process.stdout.read() or b""
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    output = (seen + out + err).decode(errors="replace")
    assert process.returncode == 130, output[-3000:]
    assert "Traceback" not in output
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "interrupted" and 0 < results["global_step"] < 500
    assert results["resume_command"] in output  # printed as is, ready to paste
    assert results["resume_command"].startswith("memoria-exp ") and "task.data.num_train=4000" in results[
        "resume_command"]
    state = read_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert state["global_step"] == results["global_step"]
