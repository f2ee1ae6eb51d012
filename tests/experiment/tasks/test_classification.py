"""The classification task (experiments.md §c.3): segments in order with memory reset per batch, the masked
per-segment loss, evaluation on the last non-empty segment, whole-document models; a few steps of every
classification model through the CLI; the five-seed summary's statistics."""

from __future__ import annotations

import json
import math
import subprocess
from typing import Any

import pytest
import torch
from omegaconf import OmegaConf
from scipy import stats

from experiment.models.protocol import MemoryModelOutput, MemoryProtocol, no_memory_state
from experiment.tasks.classification import ClassificationTask
from experiment.tasks.classification_stats import summarize_classification
from tests.conftest import CONF_DIR, PYTHON, compose_config, subprocess_env

CLASSIFICATION_MODELS = sorted(p.stem for p in (CONF_DIR / "model").glob("*_tiny.yaml")
                               if OmegaConf.load(p).get("family") == "classification")


class Recorder(torch.nn.Module, MemoryProtocol):
    """A stand-in model: logits from a learnable bias plus a value that names the segment, every call recorded."""

    memory_kind = "recorder"
    max_segment_length = 4

    def __init__(self, document_tokens: int | None = None):
        super().__init__()
        self.bias = torch.nn.Parameter(torch.zeros(2))
        self.calls: list[dict[str, Any]] = []
        self.resets = 0
        if document_tokens is not None:
            self.document_tokens = document_tokens

    def reset_memory(self, rows=None):
        self.resets += 1
        self.calls.append({"reset": True})

    def get_memory_state(self):
        return no_memory_state(self.memory_kind)

    def set_memory_state(self, state):
        self._check_memory_state(state)

    def forward(self, input_ids, attention_mask=None, **kwargs):
        self.calls.append({"ids": input_ids.clone(), "mask": attention_mask.clone()})
        segment = float(len([c for c in self.calls if "ids" in c]))
        # class 1 wins on odd-numbered segments, class 0 on even ones
        sign = 1.0 if segment % 2 == 1 else -1.0
        logits = self.bias + torch.tensor([0.0, sign]) * input_ids.shape[1]
        return MemoryModelOutput(logits=logits.expand(input_ids.shape[0], 2), aux_loss=torch.zeros(()))


def documents() -> dict[str, torch.Tensor]:
    """Two documents of 10 and 3 tokens padded to 10: segments of 4 give 3 and 1 non-empty segments."""
    ids = torch.arange(1, 21).view(2, 10)
    mask = torch.ones(2, 10, dtype=torch.long)
    ids[1, 3:], mask[1, 3:] = 0, 0
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([1, 0])}


def test_segments_run_in_order_and_the_loss_leaves_empty_segments_out(monkeypatch):
    model = Recorder()
    task = ClassificationTask(model, segment_size=4)
    backward_losses = []
    monkeypatch.setattr(task, "manual_backward", lambda loss: backward_losses.append(loss.detach()))
    monkeypatch.setattr(task, "step_optimizer", lambda: None)
    monkeypatch.setattr(task, "log", lambda *a, **k: None)
    batch = documents()
    task.training_step(batch, 0)
    segments = [c for c in model.calls if "ids" in c]
    assert [tuple(c["ids"].shape) for c in segments] == [(2, 4), (2, 4), (2, 2)]
    assert torch.equal(torch.cat([c["ids"] for c in segments], 1), batch["input_ids"])  # in order, all of it
    assert model.calls[0] == {"reset": True} and model.calls[-1] == {"reset": True}  # reset per batch
    labels = batch["labels"]
    expected = []
    for index, call in enumerate(segments, start=1):
        sign = 1.0 if index % 2 else -1.0
        logits = torch.tensor([[0.0, sign * call["ids"].shape[1]]] * 2)
        ce = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
        nonempty = call["mask"].bool().any(1).float()
        expected.append(float((ce * nonempty / torch.tensor([3.0, 1.0])).sum() / 2))
    assert [float(x) for x in backward_losses] == pytest.approx(expected)
    assert [float(x) for x in backward_losses][1] == pytest.approx(expected[1])
    # document 2 has one segment: its CE counts whole in segment 1 and never again
    assert expected[2] == pytest.approx(float(torch.nn.functional.cross_entropy(
        torch.tensor([[0.0, 2.0]]), torch.tensor([1]))) / 3 / 2)


def test_reference_loss_counts_every_segment(monkeypatch):
    task = ClassificationTask(Recorder(), segment_size=4, mask_empty_segments=False)
    losses = []
    monkeypatch.setattr(task, "manual_backward", lambda loss: losses.append(float(loss)))
    monkeypatch.setattr(task, "step_optimizer", lambda: None)
    monkeypatch.setattr(task, "log", lambda *a, **k: None)
    task.training_step(documents(), 0)
    logits = torch.tensor([[0.0, -4.0]] * 2)  # segment 2 (class 0 wins): both rows, padding included
    assert losses[1] == pytest.approx(float(torch.nn.functional.cross_entropy(logits, torch.tensor([1, 0]))) / 3)


def test_evaluation_reads_each_documents_last_non_empty_segment():
    task = ClassificationTask(Recorder(), segment_size=4)
    batch = documents()
    logits = task.last_segment_logits(batch["input_ids"], batch["attention_mask"])
    # document 1: its last segment is the third (class 1 wins, 2 tokens); document 2: its first (class 1, 4 tokens)
    assert logits.tolist() == [[0.0, 2.0], [0.0, 4.0]]


def test_whole_document_models_get_one_truncated_call():
    model = Recorder(document_tokens=6)
    task = ClassificationTask(model, segment_size=512)  # ignored: the model reads documents whole
    batch = documents()
    task.last_segment_logits(batch["input_ids"], batch["attention_mask"])
    calls = [c for c in model.calls if "ids" in c]
    assert len(calls) == 1 and torch.equal(calls[0]["ids"], batch["input_ids"][:, :6])


def test_bad_settings_name_the_fix():
    with pytest.raises(ValueError, match="task.module.segment_size"):
        ClassificationTask(Recorder(), segment_size=8)  # the model takes 4 positions
    with pytest.raises(ValueError, match="num_labels"):
        ClassificationTask(Recorder(), segment_size=4, num_labels=1)


# ---------------------------------------------------------------------------------------------- through the CLI
def tiny_run(model: str, tmp_path, extra: list[str] = ()) -> list[str]:
    return [
        "experiment=hyperpartisan_tiny", f"model={model}", "task.data.generate=36", "task.data.dev_size=6",
        "task.data.test_size=6", "task.data.batch_size=4", "task.data.eval_batch_size=6", "trainer.max_epochs=1",
        "trainer.limit_train_batches=2", "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false", "logger=none", "print_summary=false",
        f"task.data.cache_dir={tmp_path / 'tokens'}", *extra,
    ]


@pytest.mark.parametrize("model", CLASSIFICATION_MODELS)
def test_every_classification_model_trains_a_few_steps_through_the_cli(model, tmp_path):
    from experiment.cli import run

    results = run(compose_config(tiny_run(model, tmp_path)), run_dir=tmp_path / "run")
    assert results["global_step"] == 2
    for split in ("val", "test"):
        for metric in ("acc-final", "macro-f1-final"):
            assert 0.0 <= results[split][f"{split}/{metric}"] <= 1.0
        assert math.isfinite(results[split][f"{split}/loss"])
    split = results["data_source"]["split"]
    assert split["sizes"] == {"train": 24, "dev": 6, "test": 6}
    written = json.loads((tmp_path / "run" / "splits.json").read_text())
    assert written["sha256"] == split["sha256"]
    assert json.loads((tmp_path / "run" / "results.json").read_text())["data_source"]["split"]["sha256"] == \
        split["sha256"]


def test_a_memoria_run_is_reproducible(tmp_path):
    from experiment.cli import run

    first = run(compose_config(tiny_run("memoria_bert_tiny", tmp_path)), run_dir=tmp_path / "a")
    again = run(compose_config(tiny_run("memoria_bert_tiny", tmp_path)), run_dir=tmp_path / "b")
    assert first["test"] == again["test"]


def test_the_cli_reports_missing_data_in_one_line_with_exit_code_3(tmp_path):
    env = subprocess_env()
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", MEMORIA_CACHE_DIR=str(tmp_path / "cache"))
    done = subprocess.run(
        [PYTHON, "-m", "experiment.cli", "task=hyperpartisan", "model=roberta",
         f"task.data.path={tmp_path / 'none'}", f"hydra.run.dir={tmp_path / 'run'}", "logger=none"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180, check=False,
    )
    assert done.returncode == 3, done.stderr[-2000:]
    errors = [line for line in (done.stdout + done.stderr).splitlines() if "memoria-exp: data unavailable" in line]
    assert len(errors) == 1 and "task.data.path" in errors[0]
    assert "Traceback" not in done.stderr


def test_the_paper_preset_holds_the_paper_settings():
    cfg = compose_config(["experiment=hyperpartisan", "trainer.accelerator=cpu"])
    assert cfg.model.name == "memoria_roberta" and cfg.model.pretrained == "roberta-base"
    assert cfg.task.data.tokenizer == "roberta-base"
    assert cfg.task.module.segment_size == 512 and cfg.task.module.learning_rate == 3e-5
    assert cfg.task.module.schedule == "constant" and cfg.task.module.max_grad_norm is None
    assert (cfg.task.data.batch_size, cfg.task.data.eval_batch_size, cfg.trainer.max_epochs) == (8, 32, 20)
    assert (cfg.task.data.dev_size, cfg.task.data.test_size) == (64, 65)
    memory = cfg.model.config
    assert (memory.memory_layer_index, memory.memoria_num_memories, memory.memoria_stm_capacity,
            memory.memoria_num_reminded_stm, memory.memoria_num_reminded_ltm, memory.memoria_ltm_search_depth,
            memory.memoria_initial_lifespan, memory.memoria_lifespan_extend_scale) == (9, 64, 128, 64, 64, 10, 12, 8.0)
    assert cfg.task.monitor == "val/macro-f1-final" and cfg.task.monitor_mode == "max"
    other = compose_config(["experiment=hyperpartisan", "model=longformer", "trainer.accelerator=cpu"])
    assert other.task.data.tokenizer == "allenai/longformer-base-4096"


# -------------------------------------------------------------------------------------------------- the summary
def result(model: str, seed: int, f1: float, acc: float, sha: str = "s") -> dict[str, Any]:
    return {"task": "hyperpartisan", "mode": "train", "model": model, "seed": seed,
            "test": {"test/macro-f1-final": f1, "test/acc-final": acc},
            "val": {"val/macro-f1-final": f1 - 0.1, "val/acc-final": acc - 0.1},
            "data_source": {"split": {"sha256": sha}}}


def test_summary_means_stds_and_one_tailed_welch_tests():
    memoria = [0.95, 0.97, 0.96, 0.98, 0.94]
    roberta = [0.93, 0.95, 0.92, 0.94, 0.96]
    runs = [result("memoria_roberta", s, f, f) for s, f in enumerate(memoria, 1)]
    runs += [result("roberta", s, f, f) for s, f in enumerate(roberta, 1)]
    runs.append({**result("roberta", 9, 0.1, 0.1), "task": "sorting"})  # another task: ignored
    summary = summarize_classification(runs)
    rows = {row["model"]: row for row in summary.rows}
    assert rows["memoria_roberta"]["seeds"] == 5
    mean, std = rows["memoria_roberta"]["test/macro-f1-final"]
    assert mean == pytest.approx(0.96) and std == pytest.approx(0.0158113883)
    test = next(t for t in summary.tests if t["baseline"] == "roberta" and t["metric"] == "test/macro-f1-final")
    expected = stats.ttest_ind(memoria, roberta, equal_var=False)
    assert test["t"] == pytest.approx(expected.statistic)
    assert test["p"] == pytest.approx(expected.pvalue / 2)  # one-tailed, in Memoria's favour
    reverse = summarize_classification([result("memoria_bert", s, f, f) for s, f in enumerate(roberta, 1)]
                                       + [result("bert", s, f, f) for s, f in enumerate(memoria, 1)])
    assert reverse.tests[0]["p"] > 0.5  # Memoria worse: no evidence for it
    assert "memoria_roberta" in summary.to_markdown() and "± 1.58" in summary.to_markdown()
    with pytest.raises(ValueError, match="different splits"):
        summarize_classification([result("roberta", 1, 0.9, 0.9, "a"), result("bert", 1, 0.9, 0.9, "b")])
