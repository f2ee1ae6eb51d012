"""The language-modelling task: metrics, memory resets, validation hand-over, exact resume, CLI runs per model."""

from __future__ import annotations

import math
import subprocess
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from omegaconf import OmegaConf

from experiment.data.enwik8 import Enwik8DataModule
from experiment.models import build_model
from experiment.models.protocol import MemoryModelOutput, MemoryProtocol
from experiment.tasks.language_modeling import LanguageModelingTask, SplitNLL, compiled_token_nll, token_nll
from tests.conftest import CONF_DIR, PYTHON, compose_config, subprocess_env
from tests.experiment.data.lm_fixtures import enwik8_like_bytes, make_tokenizer, write_wikitext103

SEGMENT = 16


# ------------------------------------------------------------------------------------------------------------------
# metrics
def test_token_nll_sums_only_scored_tokens():
    logits = torch.randn(2, 4, 7)
    labels = torch.tensor([[1, 2, 3, -100], [4, -100, 5, 6]])
    nll_sum, count = token_nll(logits, labels)
    log_probs = logits.log_softmax(-1)
    expected = -sum(log_probs[b, t, labels[b, t]] for b in range(2) for t in range(4) if labels[b, t] >= 0)
    assert count.item() == 6
    assert torch.allclose(nll_sum, expected)


def test_compiled_token_nll_equals_the_eager_one_with_gradients():
    """compile_loss (compile=true): inductor's code for the loss gives the eager sums and logits gradient, in
    float32 and from bf16 logits (the loss itself is float32)."""
    torch.manual_seed(0)
    labels = torch.randint(0, 11, (3, 5))
    labels[1, 2] = labels[2, -1] = -100
    try:
        for dtype in (torch.float32, torch.bfloat16):
            logits = torch.randn(3, 5, 11).to(dtype).requires_grad_()
            results = []
            for fn in (token_nll, compiled_token_nll()):
                nll_sum, count = fn(logits, labels)
                (grad,) = torch.autograd.grad(nll_sum / count, logits)
                results.append((nll_sum.detach(), count, grad))
            (eager_sum, eager_count, eager_grad), (sum_, count, grad) = results
            assert count.item() == eager_count.item() == 13 and grad.dtype == dtype
            torch.testing.assert_close(sum_, eager_sum)
            torch.testing.assert_close(grad, eager_grad)
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("compile_flag", [False, True])
def test_compile_true_compiles_the_lm_tasks_loss(compile_flag, monkeypatch):
    """The LM task configs tie compile_loss to compile; the task then computes its loss through
    `compiled_token_nll`."""
    import experiment.tasks.language_modeling as lm

    for task in ("wikitext103", "pg19", "enwik8"):
        cfg = compose_config([f"task={task}", f"compile={str(compile_flag).lower()}"])
        assert cfg.task.module.compile_loss is compile_flag
    calls = []

    def recording(logits, labels):
        calls.append(tuple(logits.shape))
        return token_nll(logits, labels)

    monkeypatch.setattr(lm, "compiled_token_nll", lambda: recording)
    task = LanguageModelingTask(build_model(compose_config(["model=gpt2_tiny"]).model, 50), segment_length=8,
                                compile_loss=compile_flag)
    logits, labels = torch.randn(2, 8, 50), torch.randint(0, 50, (2, 8))
    torch.testing.assert_close(task.token_nll(logits, labels)[0], token_nll(logits, labels)[0])
    assert calls == ([(2, 8, 50)] if compile_flag else [])


def test_split_ppl_is_token_weighted_and_the_reference_mean_is_separate():
    metric = SplitNLL()
    metric.update(torch.tensor(10.0), torch.tensor(10))  # mean NLL 1.0
    metric.update(torch.tensor(30.0), torch.tensor(10))  # mean NLL 3.0
    values = metric.compute()
    assert values["ppl"].item() == pytest.approx(math.exp(2.0))
    assert values["ppl_mean_of_batches"].item() == pytest.approx((math.exp(1.0) + math.exp(3.0)) / 2)
    assert values["ppl_mean_of_batches"] > values["ppl"]  # Jensen
    assert values["bpc"].item() == pytest.approx(2.0 / math.log(2.0))
    assert values["scored_tokens"].item() == 20


# ------------------------------------------------------------------------------------------------------------------
# a recording model: every memory call is visible
class RecordingLM(torch.nn.Module, MemoryProtocol):
    """A bigram model whose "memory" counts the segments seen per row; records every reset."""

    memory_kind = "recording"

    def __init__(self, vocab_size: int):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab_size, vocab_size)
        self.seen: torch.Tensor | None = None
        self.events: list[tuple[str, Any]] = []

    @property
    def max_segment_length(self) -> int:
        return 1024

    def reset_memory(self, rows=None):
        if rows is None:
            self.seen = None
            self.events.append(("reset", None))
        else:
            if self.seen is not None:
                self.seen = self.seen.masked_fill(rows.to(self.seen.device), 0)
            self.events.append(("reset_rows", rows.tolist()))

    def get_memory_state(self):
        return {"memory_kind": self.memory_kind, "seen": None if self.seen is None else self.seen.clone()}

    def set_memory_state(self, state):
        self._check_memory_state(state)
        self.seen = None if state["seen"] is None else state["seen"].clone()
        self.events.append(("set_state", None))

    def forward(self, input_ids, attention_mask=None, labels=None):
        batch = input_ids.shape[0]
        self.seen = (torch.zeros(batch, dtype=torch.long) if self.seen is None else self.seen) + 1
        self.events.append(("forward", (input_ids[:, 0].tolist(), self.seen.tolist())))
        return MemoryModelOutput(logits=self.embed(input_ids), aux_loss=torch.zeros(()))


@pytest.fixture(scope="module")
def enwik8_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("enwik8") / "enwik8"
    path.write_bytes(enwik8_like_bytes(6000, seed=3))
    return path


def enwik8_dm(path, cache, **kwargs):
    defaults = {"valid_bytes": 1000, "test_bytes": 1000, "segment_length": SEGMENT, "lanes": 2, "eval_lanes": 1}
    return Enwik8DataModule(path=str(path), cache_dir=str(cache), **{**defaults, **kwargs})


def trainer(tmp_path, **kwargs):
    defaults = {"accelerator": "cpu", "devices": 1, "logger": False, "enable_checkpointing": False,
                "enable_progress_bar": False, "enable_model_summary": False, "inference_mode": False,
                "num_sanity_val_steps": 0, "deterministic": True}
    return L.Trainer(default_root_dir=str(tmp_path), **{**defaults, **kwargs})


def test_resets_every_period_counted_in_optimizer_steps(enwik8_file, tmp_path):
    dm = enwik8_dm(enwik8_file, tmp_path / "cache")
    model = RecordingLM(256)
    task = LanguageModelingTask(model, segment_length=SEGMENT, reset_period=3)
    trainer(tmp_path, max_steps=7, accumulate_grad_batches=2, limit_val_batches=0).fit(task, datamodule=dm)
    # 14 micro-batches = 7 optimizer steps. Resets before the micro-batches that start optimizer steps 0, 3 and 6.
    forwards_since_reset, counts = 0, []
    for kind, _ in model.events:
        if kind == "reset":
            counts.append(forwards_since_reset)
            forwards_since_reset = 0
        elif kind == "forward":
            forwards_since_reset += 1
    counts.append(forwards_since_reset)
    assert counts[0] == 0  # nothing runs before the first reset
    assert [c for c in counts if c] == [6, 6, 2]  # 3 optimizer steps x 2 micro-batches between resets


def test_reset_on_document_end_resets_only_rows_that_start_a_document(tmp_path):
    from experiment.data.lanes import LaneStream, build_segments

    model = RecordingLM(50)
    task = LanguageModelingTask(model, segment_length=4, reset_period=None, reset_on_document_end=True)
    offsets = torch.tensor([0, 8, 12, 24, 32]).numpy()  # documents of 8, 4, 12 and 8 tokens: 2+1+3+2 segments
    stream = LaneStream(torch.arange(32).numpy() % 50, build_segments(offsets, 4), num_lanes=2)  # 4 steps
    for batch in stream:
        task._reset_before_step(batch, batch["step"], training=False)
        task._forward(batch)
    resets = [e for e in model.events if e[0].startswith("reset")]
    # segments: doc0 = 0, 1; doc1 = 2; doc2 = 3, 4, 5; doc3 = 6, 7. Lane 0 = segments 0-3, lane 1 = segments 4-7.
    # Step 0 resets everything (the stream starts); step 1 starts no document; step 2 starts doc1 in lane 0 and
    # doc3 in lane 1; step 3 starts doc2 in lane 0.
    assert resets == [("reset", None), ("reset_rows", [True, True]), ("reset_rows", [True, False])]
    seen = [e[1][1] for e in model.events if e[0] == "forward"]
    assert seen == [[1, 1], [2, 2], [1, 1], [1, 2]]  # per-row memory: a reset row starts over


def test_validation_starts_empty_and_restores_the_training_memory(enwik8_file, tmp_path):
    dm = enwik8_dm(enwik8_file, tmp_path / "cache")
    model = RecordingLM(256)
    task = LanguageModelingTask(model, segment_length=SEGMENT, reset_period=None)
    trainer(tmp_path, max_steps=6, val_check_interval=3, limit_val_batches=2).fit(task, datamodule=dm)
    forwards = [e[1] for e in model.events if e[0] == "forward"]
    seen = [counts for _, counts in forwards]
    # train 1,2,3 | val (1 lane) 1,2 | train continues 4,5,6 with the restored memory | val 1,2
    assert seen == [[1, 1], [2, 2], [3, 3], [1], [2], [4, 4], [5, 5], [6, 6], [1], [2]]


# ------------------------------------------------------------------------------------------------------------------
# exact resume (CPU, deterministic): the memory, optimizer, scheduler, RNG and data position come back
class LossRecorder(Callback):
    def __init__(self):
        self.losses: dict[int, float] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses[trainer.global_step] = float(outputs["loss"])


def memoria_tiny(vocab_size: int):
    cfg = compose_config(["model=memoria_gpt2_tiny", "memory=tiny"])
    return build_model(cfg.model, vocab_size)


def fit_memoria(tmp_path, enwik8_file, name, max_steps, ckpt_path=None, every=None):
    L.seed_everything(0, workers=True)
    dm = enwik8_dm(enwik8_file, tmp_path / "cache")
    model = memoria_tiny(dm.vocab_size)
    task = LanguageModelingTask(model, segment_length=SEGMENT, reset_period=4, warmup_ratio=0.25)
    recorder = LossRecorder()
    callbacks: list[Callback] = [recorder]
    if every:
        callbacks.append(ModelCheckpoint(dirpath=str(tmp_path / name), every_n_train_steps=every, save_top_k=-1,
                                         filename="{step}"))
        # and one written at the end of each validation, as the CLI's monitored checkpoint is
        callbacks.append(ModelCheckpoint(dirpath=str(tmp_path / name), every_n_epochs=1, save_top_k=-1,
                                         save_on_train_epoch_end=False, filename="val-{epoch}"))
    run = trainer(tmp_path / name, max_steps=max_steps, limit_train_batches=5, limit_val_batches=2, max_epochs=-1,
                  val_check_interval=3, callbacks=callbacks, enable_checkpointing=bool(every))
    run.fit(task, datamodule=dm, ckpt_path=ckpt_path)
    return recorder.losses


def test_resumed_training_matches_uninterrupted(enwik8_file, tmp_path):
    # 5 steps per epoch, validation after the 3rd step of each epoch, memory reset every 4 optimizer steps, dropout.
    whole = fit_memoria(tmp_path, enwik8_file, "whole", max_steps=12, every=1)
    assert len(whole) == 12
    checkpoints = {2: "step=2", 5: "step=5", 3: "val-epoch=0"}
    for step, name in checkpoints.items():  # mid-epoch; end of an epoch; written by validation in mid-epoch
        ckpt = tmp_path / "whole" / f"{name}.ckpt"
        resumed = fit_memoria(tmp_path, enwik8_file, f"resumed{step}", max_steps=12, ckpt_path=str(ckpt))
        assert sorted(resumed) == list(range(step + 1, 13))
        for global_step, loss in resumed.items():
            assert loss == pytest.approx(whole[global_step], rel=1e-6, abs=1e-6), (step, global_step)


# ------------------------------------------------------------------------------------------------------------------
# the CLI: a few steps of every tiny model on generated WikiText-103, and the offline error
@pytest.fixture(scope="module")
def wikitext(tmp_path_factory):
    root = tmp_path_factory.mktemp("wt103")
    write_wikitext103(root / "raw", {"train": 10, "valid": 2, "test": 2})
    return root / "raw", make_tokenizer(root / "tokenizer")


TINY_MODELS = sorted(p.stem for p in (CONF_DIR / "model").glob("*_tiny.yaml")
                     if OmegaConf.load(p).get("family") != "classification")  # LM models only


def wikitext_overrides(wikitext, model: str = "memoria_gpt2_tiny") -> list[str]:
    """CLI overrides of a quiet WikiText-103 run on the generated local copy (2 lanes of SEGMENT tokens)."""
    raw, tokenizer = wikitext
    return [
        "task=wikitext103", f"model={model}", "memory=tiny", f"task.data.path={raw}",
        f"task.data.tokenizer={tokenizer}", f"task.data.segment_length={SEGMENT}", "task.data.lanes=2",
        "trainer.enable_progress_bar=false", "print_summary=false",
    ]


SHORT_RUN = ["trainer.limit_train_batches=4", "trainer.limit_val_batches=2", "trainer.limit_test_batches=2",
             "logger=none"]


@pytest.mark.parametrize("model_name", TINY_MODELS)
def test_cli_trains_and_tests_every_tiny_model(model_name, wikitext, tmp_path):
    from experiment.cli import run

    cfg = compose_config([
        *wikitext_overrides(wikitext, model_name),
        "trainer.max_epochs=1", "trainer.limit_train_batches=3", "trainer.limit_val_batches=2",
        "trainer.limit_test_batches=2", "trainer.log_every_n_steps=1", "logger=csv",
    ])
    results = run(cfg, run_dir=tmp_path / "run")
    assert results["global_step"] == 3
    for split in ("val", "test"):
        ppl = results[split][f"{split}/ppl"]
        assert math.isfinite(ppl) and 1.0 < ppl < 10 * results["num_parameters"]
        assert results[split][f"{split}/scored_tokens"] == 2 * (SEGMENT - 1)  # 2 steps x 1 lane x (T - 1)
        assert f"{split}/ppl_mean_of_batches" in results[split]


def test_cli_reports_missing_data_without_a_traceback(tmp_path):
    env = subprocess_env()
    env["MEMORIA_CACHE_DIR"] = str(tmp_path / "cache")
    env["HF_HUB_OFFLINE"] = "1"
    done = subprocess.run(
        [PYTHON, "-m", "experiment.cli", "task=enwik8", "model=gpt2_tiny", f"task.data.path={tmp_path / 'none'}",
         f"hydra.run.dir={tmp_path / 'run'}", "logger=none"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False,
    )
    output = done.stdout + done.stderr
    assert done.returncode != 0
    assert "Traceback" not in output
    assert "enwik8" in output and "task.data.path" in output
    assert not list((tmp_path / "cache").glob("enwik8-*"))  # nothing half-written


def test_cli_evaluates_a_checkpoint_with_other_segment_length_and_lanes(wikitext, tmp_path):
    from experiment.cli import run
    from experiment.data.wikitext103 import WikiText103DataModule

    raw, tokenizer = wikitext
    common = [*wikitext_overrides(wikitext), "logger=none"]
    trained = run(compose_config([*common, "trainer.max_epochs=1", "trainer.limit_train_batches=2",
                                  "trainer.limit_val_batches=1", "trainer.limit_test_batches=1"]),
                  run_dir=tmp_path / "train")
    evaluated = run(compose_config([*common, "mode=eval", f"ckpt_path={trained['last_checkpoint']}",
                                    "task.data.eval_segment_length=8", "task.data.eval_lanes=2"]),
                    run_dir=tmp_path / "eval")
    dm = WikiText103DataModule(path=str(raw), tokenizer=tokenizer, segment_length=SEGMENT, eval_segment_length=8,
                               eval_lanes=2)
    dm.setup("test")
    stream = dm.streams["test"]
    assert stream.table.segment_length == 8 and stream.num_lanes == 2
    assert evaluated["test"]["test/scored_tokens"] == len(stream) * 2 * 7  # every step: 2 lanes x (8 - 1) tokens
    assert math.isfinite(evaluated["val"]["val/ppl"]) and math.isfinite(evaluated["test"]["test/ppl"])


def test_a_segment_longer_than_the_model_positions_is_refused():
    class ShortModel(RecordingLM):
        max_segment_length = 8

    with pytest.raises(ValueError, match=r"task.data.segment_length=16.*8 positions"):
        LanguageModelingTask(ShortModel(10), segment_length=16)
    with pytest.raises(ValueError, match=r"task.data.eval_segment_length=512"):
        LanguageModelingTask(ShortModel(10), segment_length=8, eval_segment_length=512)


def test_cli_protocol_switches_score_every_token_but_each_documents_first(wikitext, tmp_path):
    from experiment.cli import run
    from experiment.data.wikitext103 import WikiText103DataModule

    raw, tokenizer = wikitext
    results = run(compose_config([
        *wikitext_overrides(wikitext),
        "task.data.score_all_tokens=true", "task.data.keep_remainders=true", "task.module.reset_on_document_end=true",
        "trainer.max_epochs=1", "trainer.limit_train_batches=2", "logger=none",
    ]), run_dir=tmp_path / "run")
    dm = WikiText103DataModule(path=str(raw), tokenizer=tokenizer)
    for split, stage in (("valid", "val"), ("test", "test")):
        lengths = np.diff(dm.load_split(split).offsets)
        assert results[stage][f"{stage}/scored_tokens"] == int((lengths - 1).sum())  # one eval lane: whole split
        assert math.isfinite(results[stage][f"{stage}/ppl"])


@pytest.mark.parametrize("speed_option", ["memory.compile=true", "compile=true"])
def test_cli_language_modelling_with_a_speed_option(speed_option, wikitext, tmp_path):
    """The speed options through the whole LM task (lanes, validation saving and restoring the training memory,
    a checkpoint, testing it): memory.compile gives the eager run exactly; compile=true (the blocks, with the
    compiler's own dropout stream) a close one."""
    from experiment.cli import run

    common = [*wikitext_overrides(wikitext), *SHORT_RUN, "trainer.max_epochs=1"]
    eager = run(compose_config(common), run_dir=tmp_path / "eager")
    fast = run(compose_config([*common, speed_option]), run_dir=tmp_path / "fast")
    torch._dynamo.reset()
    for split in ("val", "test"):
        a, b = eager[split][f"{split}/ppl"], fast[split][f"{split}/ppl"]
        if speed_option.startswith("memory."):
            assert a == b, split
        else:
            assert math.isfinite(b) and abs(b - a) / a < 0.05, (split, a, b)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cli_language_modelling_on_gpu_with_blocks_as_cuda_graphs(wikitext, tmp_path):
    """A whole LM run on the GPU (training, validation restoring the training memory, checkpoint, test) with the
    memory step graphed (the default) and every block replayed as CUDA graphs (compile_mode=reduce-overhead):
    close to the eager run (the compiled blocks draw their own dropout masks)."""
    from experiment.cli import run

    common = [*wikitext_overrides(wikitext), *SHORT_RUN, "trainer=gpu", "trainer.max_epochs=2"]
    eager = run(compose_config(common), run_dir=tmp_path / "eager")
    graphed = run(compose_config([*common, "compile=true", "compile_mode=reduce-overhead"]), run_dir=tmp_path / "g")
    torch._dynamo.reset()
    for split in ("val", "test"):
        a, b = eager[split][f"{split}/ppl"], graphed[split][f"{split}/ppl"]
        assert math.isfinite(b) and abs(b - a) / a < 0.05, (split, a, b)


def test_cli_language_modelling_with_emulated_cuda_graphs(wikitext, tmp_path, monkeypatch):
    """memory.cuda_graph=true through the LM task, with CUDA graphs emulated on the CPU: every Memoria the task
    makes (training, validation, restored) replays its steps, and the run is the eager run."""
    from experiment.cli import run
    from memoria import Memoria
    from tests.memoria.test_graphs import EmulatedGraphs

    common = [*wikitext_overrides(wikitext), *SHORT_RUN, "trainer.max_epochs=2"]
    monkeypatch.setattr(Memoria, "_force_sync_free", True)
    eager = run(compose_config([*common, "memory.cuda_graph=false"]), run_dir=tmp_path / "eager")
    backend = EmulatedGraphs()
    monkeypatch.setattr(Memoria, "_graph_backend", backend)
    graphed = run(compose_config([*common, "memory.cuda_graph=true"]), run_dir=tmp_path / "graphed")
    assert backend.replays > 0
    for split in ("val", "test"):
        assert eager[split][f"{split}/ppl"] == graphed[split][f"{split}/ppl"], split
