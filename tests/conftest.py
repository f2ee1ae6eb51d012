"""Shared test set-up: generated data goes to a per-session temp cache, CUDA tests skip without a GPU, and helpers
compose the project's Hydra config with tiny settings."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

# Without a GPU, Triton kernels (memoria/kernels.py) can only run in Triton's interpreter, which must be chosen
# before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO_ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = REPO_ROOT / "conf"

# Tiny sorting data and a few optimizer steps: every run of the runner in the tests uses these.
TINY_SORTING = [
    "task.data.length=60",
    "task.data.num_train=16",
    "task.data.num_dev=8",
    "task.data.num_test=8",
    "task.data.batch_size=8",
    "task.data.eval_batch_size=8",
    "task.module.segment_size=32",
    "trainer.max_epochs=1",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
]


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Generated data of the whole session in one temp folder (shared by in-process and subprocess runs)."""
    cache = tmp_path_factory.mktemp("memoria-cache")
    previous = os.environ.get("MEMORIA_CACHE_DIR")
    os.environ["MEMORIA_CACHE_DIR"] = str(cache)
    yield cache
    if previous is None:
        os.environ.pop("MEMORIA_CACHE_DIR", None)
    else:
        os.environ["MEMORIA_CACHE_DIR"] = previous


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def compose_config(overrides: list[str] | None = None):
    """The project's config, composed like `memoria-exp <overrides>` does (without running anything)."""
    from experiment.cli import compose_config as compose

    return compose(overrides)


def subprocess_env() -> dict[str, str]:
    """Environment for running the CLI in a subprocess from any folder: the repo importable, one thread."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.pop("HYDRA_FULL_ERROR", None)
    env["WANDB_MODE"] = "disabled"
    return env


PYTHON = sys.executable
