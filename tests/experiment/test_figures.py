"""experiment/figures.py: the run's figures logged as W&B images at the end of its test (with a fake logger), and
when the CLI adds the callback."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from experiment.figures import RunFigures, base_model, figure_callbacks, setting_of
from tests.conftest import TINY_SORTING, compose_config

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class FakeWandbLogger:
    def __init__(self):
        self.images: list[tuple[str, list[str], int]] = []

    def log_image(self, key, images, step=None, **kwargs):
        self.images.append((key, images, step))


class NoImages:  # a logger without log_image (csv): left alone
    pass


def trainer(metrics: dict, step: int, loggers: list) -> SimpleNamespace:
    return SimpleNamespace(callback_metrics={k: torch.tensor(v) for k, v in metrics.items()}, global_step=step,
                           loggers=loggers, is_global_zero=True, sanity_checking=False)


def test_run_figures_logs_the_learning_curve_and_the_sorting_figure_as_images(tmp_path):
    wandb, csv = FakeWandbLogger(), NoImages()
    callback = RunFigures(tmp_path, "sorting", "memoria_gpt2_tiny", "val/acc-final", {"length": 40, "segment": 32})
    sanity = trainer({"val/acc-final": 0.01}, 0, [wandb])
    sanity.sanity_checking = True
    callback.on_validation_end(sanity, None)  # the sanity check is no point of the curve
    for step, acc in ((10, 0.1), (20, 0.2)):
        callback.on_validation_end(trainer({"val/acc-final": acc}, step, [wandb, csv]), None)
    assert callback.curve == [(10, pytest.approx(0.1)), (20, pytest.approx(0.2))]
    done = trainer({"test/acc-final": 0.25, "test/memoryless-acc": 0.2, "val/acc-final": 0.2}, 20, [wandb, csv])
    callback.on_test_end(done, None)
    assert [(key, step) for key, _, step in wandb.images] == [("figures/learning_curve", 20),
                                                               ("figures/sorting_accuracy", 20)]
    for _, images, _ in wandb.images:
        assert len(images) == 1 and open(images[0], "rb").read().startswith(PNG_MAGIC)
        assert images[0].startswith(str(tmp_path / "figures"))


def test_the_cli_adds_the_callback_only_with_wandb(tmp_path):
    for logger, expected in (("wandb", 1), ("wandb_csv", 1), ("csv", 0), ("none", 0)):
        cfg = compose_config([*TINY_SORTING, f"logger={logger}"])
        callbacks = figure_callbacks(cfg, tmp_path, {"task": {"data": {"length": 60}, "module": {"segment_size": 32}}})
        assert len(callbacks) == expected, logger
    assert callbacks == [] and base_model("memoria_gpt2_sort_cpu") == "memoria_gpt2"


def test_setting_of_names_every_setting_column():
    sorting = {"task": {"data": {"length": 1000, "num_train": 80000}, "module": {"segment_size": 256}},
               "trainer": {"max_epochs": 5, "max_steps": -1, "precision": "bf16-mixed"}}
    assert setting_of(sorting) == {"length": 1000, "segment": 256, "train size": 80000, "training": "5 epochs",
                                   "precision": "bf16-mixed"}
    lm = {"task": {"data": {"segment_length": 150, "lanes": 8}, "module": {}},
          "trainer": {"max_steps": 1000, "limit_train_batches": 0.1}}
    assert setting_of(lm) == {"segment": 150, "lanes": 8, "train size": "limit 0.1", "training": "1000 steps",
                              "precision": "32-true"}
