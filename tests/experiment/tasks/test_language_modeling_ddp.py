"""DDP with 2 CPU processes (gloo): each rank owns fixed lanes, equal step counts, nothing replayed, and evaluation
sums reduced across ranks give the single-process totals."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

from experiment.data.enwik8 import Enwik8DataModule
from experiment.data.lanes import IGNORE_INDEX
from experiment.tasks.language_modeling import LanguageModelingTask
from tests.experiment.data.lm_fixtures import enwik8_like_bytes
from tests.experiment.tasks.test_language_modeling import RecordingLM

SEGMENT, LANES, EVAL_LANES, STEPS = 16, 4, 2, 3


class RankRecorder(Callback):
    """Writes what each rank trained and validated on (first token of each row, per step) and its final metrics."""

    def __init__(self, out_dir: str):
        self.out_dir = out_dir
        self.train_rows: list[list[int]] = []
        self.val_rows: list[list[int]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.train_rows.append([int(batch["step"])] + batch["input_ids"][:, 0].tolist())

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.val_rows.append([int(batch["step"])] + batch["input_ids"][:, 0].tolist())

    def on_fit_end(self, trainer, pl_module):
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        record = {"rank": trainer.global_rank, "world": trainer.world_size, "train": self.train_rows, "val": metrics,
                  "val_rows": self.val_rows}
        Path(self.out_dir, f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


def test_two_cpu_processes_own_fixed_lanes_and_reduce_sums(tmp_path):
    data = tmp_path / "enwik8"
    data.write_bytes(enwik8_like_bytes(6000, seed=5))

    def datamodule():
        return Enwik8DataModule(path=str(data), cache_dir=str(tmp_path / "cache"), valid_bytes=1000, test_bytes=1000,
                                segment_length=SEGMENT, lanes=LANES, eval_lanes=EVAL_LANES)

    reference = datamodule()
    reference.setup("fit")  # one process: the global layout
    task = LanguageModelingTask(RecordingLM(reference.vocab_size), segment_length=SEGMENT, reset_period=None)
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=STEPS, limit_train_batches=STEPS,
        limit_val_batches=None, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, inference_mode=False, num_sanity_val_steps=0, use_distributed_sampler=False,
        callbacks=[RankRecorder(str(tmp_path))], default_root_dir=str(tmp_path),
    )
    trainer.fit(task, datamodule=datamodule())

    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world"] for r in records] == [2, 2]
    assert len(records[0]["train"]) == len(records[1]["train"]) == STEPS  # equal step counts
    whole = reference.streams["train"]
    for rank, record in enumerate(records):
        for step, row in enumerate(record["train"]):
            expected = whole.batch(step)["input_ids"][:, 0]  # (LANES,)
            per_rank = LANES // 2
            assert row == [step] + expected[rank * per_rank:(rank + 1) * per_rank].tolist()

    # Validation over the whole dev stream, split over the ranks by lanes: the reduced sums are the global ones.
    valid = reference.streams["valid"]
    expected_tokens = sum(int((valid.batch(s)["labels"] != IGNORE_INDEX).sum()) for s in range(len(valid)))
    for rank, record in enumerate(records):
        assert [row[0] for row in record["val_rows"]] == list(range(len(valid)))  # each rank: its own eval lane
        assert [row[1] for row in record["val_rows"]] == [int(valid.batch(s)["input_ids"][rank, 0])
                                                          for s in range(len(valid))]
        assert record["val"]["val/scored_tokens"] == expected_tokens
        assert np.isfinite(record["val"]["val/ppl"])
    assert records[0]["val"] == records[1]["val"]
    assert torch.distributed.is_available()
