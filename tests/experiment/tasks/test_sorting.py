"""The sorting LightningModule (experiments.md §c.2) and the task base it builds on."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from experiment.data.sorting import SortingDataModule
from experiment.models import build_model
from experiment.tasks.base import MEMORY_STATE_KEY, linear_warmup_decay
from experiment.tasks.sorting import SortingTask

TINY_MEMORY = {
    "memoria_num_memories": 4, "memoria_lifespan_extend_scale": 8.0, "memoria_num_reminded_stm": 4,
    "memoria_num_reminded_ltm": 4, "memoria_stm_capacity": 8, "memoria_ltm_search_depth": 2,
    "memoria_initial_lifespan": 3, "memoria_reset_period": 50, "memoria_ltm_capacity": 64,
    "memoria_deterministic": True, "memoria_seed": 0,
}
TINY_GPT2 = {"n_layer": 1, "n_embd": 32, "n_head": 2, "n_positions": 64, "bos_token_id": None, "eos_token_id": None}


def memoria_model():
    torch.manual_seed(0)
    return build_model({"class_path": "experiment.models.gpt2_memoria.GPT2WithMemoriaLMHeadModel",
                        "config": {**TINY_GPT2, **TINY_MEMORY}}, vocab_size=21)


def plain_model():
    torch.manual_seed(0)
    return build_model({"class_path": "experiment.models.gpt2.GPT2LMHeadModel", "config": dict(TINY_GPT2)},
                       vocab_size=21)


@pytest.fixture(scope="module")
def datamodule(tmp_path_factory):
    dm = SortingDataModule(length=60, num_train=16, num_dev=8, num_test=8, seed=3, batch_size=8, eval_batch_size=8,
                           cache_dir=str(tmp_path_factory.mktemp("sorting")))
    dm.prepare_data()
    dm.setup("fit")
    return dm


def tiny_trainer(tmp_path, **kwargs):
    settings = {"accelerator": "cpu", "devices": 1, "max_epochs": 1, "inference_mode": False, "logger": False,
                "enable_checkpointing": False, "enable_progress_bar": False, "enable_model_summary": False,
                "num_sanity_val_steps": 0, "default_root_dir": str(tmp_path)}
    settings.update(kwargs)
    return L.Trainer(**settings)


class Spy(torch.nn.Module):
    """Wraps a model and records, per call, the chunk length and whether gradients were on."""

    def __init__(self, model):
        super().__init__()
        self.inner = model
        self.calls: list[tuple[int, bool]] = []
        self.resets = 0

    @property
    def max_segment_length(self):
        return self.inner.max_segment_length

    def forward(self, input_ids):
        self.calls.append((input_ids.shape[1], torch.is_grad_enabled()))
        return self.inner(input_ids)

    def reset_memory(self, rows=None):
        self.resets += 1
        self.inner.reset_memory(rows)

    def get_memory_state(self):
        return self.inner.get_memory_state()

    def set_memory_state(self, state):
        self.inner.set_memory_state(state)


def test_chunks_without_targets_run_without_gradient(datamodule, tmp_path):
    # L = 60 -> 80 tokens -> chunks 32, 32, 16; targets sit at positions 60..79: chunks 2 and 3.
    spy = Spy(memoria_model())
    task = SortingTask(spy, segment_size=32)
    tiny_trainer(tmp_path, max_steps=1, limit_val_batches=0).fit(task, datamodule=datamodule)
    assert spy.calls == [(32, False), (32, True), (16, True)]
    assert spy.resets >= 2  # before and after the batch


def test_loss_is_target_ce_sum_over_20_averaged_over_batch(datamodule):
    model = plain_model().eval()
    task = SortingTask(model, segment_size=32)
    batch = next(iter(datamodule.val_dataloader()))
    with torch.no_grad():
        loss, correct, counted = task._run_example_batch(batch, train=False)
        # Independent computation: per chunk logits, CE on every target, mean over the example's 20 targets.
        logits = torch.cat([model(batch["input_ids"][:, s:s + 32]).logits for s in range(0, 80, 32)], dim=1)
        expected = F.cross_entropy(logits[:, 60:].reshape(-1, 21), batch["labels"][:, 60:].reshape(-1))
        accuracy = (logits[:, 60:].argmax(-1) == batch["labels"][:, 60:]).float().mean()
    assert torch.allclose(loss, expected, atol=1e-5)
    assert counted.item() == 8 * 20
    assert correct.item() / counted.item() == pytest.approx(accuracy.item())


def test_training_steps_update_weights_and_always_zero_gradients(datamodule, tmp_path):
    model = memoria_model()
    task = SortingTask(model, segment_size=32, warmup_ratio=0.0)
    before = [p.detach().clone() for p in model.parameters()]
    trainer = tiny_trainer(tmp_path, max_epochs=2, limit_val_batches=1)
    trainer.fit(task, datamodule=datamodule)
    assert trainer.global_step == 4  # 16 examples / batch 8 * 2 epochs: one optimizer step per batch
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(p.grad is None for p in model.parameters())
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert scheduler.last_epoch == 4  # stepped once per optimizer step
    assert 0.0 <= trainer.callback_metrics["val/acc-final"].item() <= 1.0
    assert "train/acc" in trainer.callback_metrics


def test_gradient_is_clipped_to_max_norm(datamodule, tmp_path):
    norms = []

    class Recording(SortingTask):
        def on_before_optimizer_step(self, optimizer):
            super().on_before_optimizer_step(optimizer)
            grads = [p.grad.norm() for p in self.parameters() if p.grad is not None]
            norms.append(torch.linalg.vector_norm(torch.stack(grads)).item())

    task = Recording(plain_model(), segment_size=32, max_grad_norm=1e-3, learning_rate=1.0)
    tiny_trainer(tmp_path, max_steps=1, limit_val_batches=0).fit(task, datamodule=datamodule)
    assert norms and norms[0] <= 1e-3 * 1.001


def test_linear_warmup_then_decay_to_zero():
    multiplier = linear_warmup_decay(warmup_steps=10, total_steps=110)
    assert multiplier(0) == pytest.approx(0.1)
    assert multiplier(9) == pytest.approx(1.0)
    assert multiplier(10) == pytest.approx(1.0)
    assert multiplier(60) == pytest.approx(0.5)
    assert multiplier(110) == 0.0 and multiplier(200) == 0.0


def test_segment_longer_than_positions_is_refused():
    with pytest.raises(ValueError, match=r"segment_size=65 is longer than the model's 64 positions; lower"):
        SortingTask(plain_model(), segment_size=65)


def test_inference_mode_trainer_is_refused(datamodule, tmp_path):
    task = SortingTask(plain_model(), segment_size=32)
    trainer = tiny_trainer(tmp_path, inference_mode=True, max_steps=1)
    with pytest.raises(ValueError, match="inference_mode=False"):
        trainer.fit(task, datamodule=datamodule)


def test_memory_state_travels_through_checkpoint_hooks(datamodule):
    model = memoria_model()
    task = SortingTask(model, segment_size=32)
    batch = next(iter(datamodule.train_dataloader()))
    with torch.no_grad():
        for start in (0, 32):
            model(batch["input_ids"][:, start:start + 32])  # two segments: memory now holds engrams
    state = model.get_memory_state()
    checkpoint: dict = {}
    task.on_save_checkpoint(checkpoint)
    model.reset_memory()
    assert model.get_memory_state()["prev_hidden"] is None
    task.on_load_checkpoint(checkpoint)
    restored = model.get_memory_state()
    assert len(checkpoint[MEMORY_STATE_KEY]) == 1
    assert torch.equal(restored["prev_hidden"], state["prev_hidden"])
    for key, value in state["memoria"].items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(restored["memoria"][key], value), key


def test_validation_keeps_the_training_memory(datamodule, tmp_path):
    model = memoria_model()
    task = SortingTask(model, segment_size=32)
    trainer = tiny_trainer(tmp_path, max_steps=1)
    trainer.fit(task, datamodule=datamodule)  # attaches the trainer
    with torch.no_grad():
        model(next(iter(datamodule.train_dataloader()))["input_ids"][:, :32])
    before = model.get_memory_state()["prev_hidden"].clone()
    task.on_validation_start()
    assert model.get_memory_state()["prev_hidden"] is None  # evaluation starts from empty memory
    task.on_validation_end()
    assert torch.equal(model.get_memory_state()["prev_hidden"], before)


def _train_steps_with_precision(datamodule, tmp_path, accelerator, precision):
    model = memoria_model()
    task = SortingTask(model, segment_size=32, warmup_ratio=0.0)
    before = [p.detach().clone() for p in model.parameters()]
    trainer = tiny_trainer(tmp_path, accelerator=accelerator, precision=precision, max_steps=2, limit_val_batches=1)
    trainer.fit(task, datamodule=datamodule)
    assert trainer.global_step == 2
    after = [p.detach().cpu() for p in model.parameters()]
    assert all(torch.isfinite(p).all() for p in after)
    assert any(not torch.equal(a.cpu(), b) for a, b in zip(before, after))
    assert 0.0 <= trainer.callback_metrics["val/acc-final"].item() <= 1.0


def test_bf16_mixed_precision_on_cpu(datamodule, tmp_path):
    _train_steps_with_precision(datamodule, tmp_path, "cpu", "bf16-mixed")


@pytest.mark.cuda
@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
def test_mixed_precision_on_gpu(datamodule, tmp_path, precision):
    _train_steps_with_precision(datamodule, tmp_path, "gpu", precision)


def test_checkpoint_during_validation_holds_the_training_memory(datamodule, tmp_path):
    model = memoria_model()
    task = SortingTask(model, segment_size=32)
    tiny_trainer(tmp_path, max_steps=1).fit(task, datamodule=datamodule)  # attaches a trainer in state "fit"
    task.trainer.state.fn = "fit"
    with torch.no_grad():
        model(next(iter(datamodule.train_dataloader()))["input_ids"][:, :32])
    training_memory = model.get_memory_state()["prev_hidden"].clone()
    task.on_validation_start()  # validation: empty memory, training memory in the snapshot
    checkpoint: dict = {}
    task.on_save_checkpoint(checkpoint)  # what ModelCheckpoint does in on_validation_end
    assert torch.equal(checkpoint[MEMORY_STATE_KEY][0]["prev_hidden"], training_memory)
    task.on_validation_end()


def test_resumed_training_keeps_the_restored_memory(datamodule, tmp_path):
    model = memoria_model()
    task = SortingTask(model, segment_size=32)
    trainer = tiny_trainer(tmp_path, max_steps=1)
    trainer.fit(task, datamodule=datamodule)
    trainer.state.fn = "fit"
    with torch.no_grad():
        model(next(iter(datamodule.train_dataloader()))["input_ids"][:, :32])
    checkpoint: dict = {}
    task.on_save_checkpoint(checkpoint)
    saved = model.get_memory_state()["prev_hidden"].clone()
    model.reset_memory()
    task.on_load_checkpoint(checkpoint)
    task.on_train_start()  # a resumed fit: the restored memory stays
    assert torch.equal(model.get_memory_state()["prev_hidden"], saved)
    task.on_train_start()  # a later, fresh start: empty again
    assert model.get_memory_state()["prev_hidden"] is None


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_blocks_replayed_as_cuda_graphs_train_like_eager_on_gpu(datamodule, tmp_path):
    """compile=true compile_mode=reduce-overhead as the CLI sets it up (blocks compiled, each batch marked as a new
    graph step): two segments per example, validation, test; without dropout the run is the eager run."""
    from experiment.callbacks import CudaGraphStepMarker
    from experiment.models import compile_blocks

    results = {}
    for graphed in (False, True):
        model = memoria_model()
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        callbacks = []
        if graphed:
            compile_blocks(model, mode="reduce-overhead")
            callbacks.append(CudaGraphStepMarker())
        task = SortingTask(model, segment_size=32, warmup_ratio=0.0)
        trainer = tiny_trainer(tmp_path / str(graphed), accelerator="gpu", max_steps=4, limit_val_batches=1,
                               callbacks=callbacks)
        trainer.fit(task, datamodule=datamodule)
        results[graphed] = trainer.test(task, datamodule=datamodule, verbose=False)[0]
    torch._dynamo.reset()
    assert torch.isfinite(torch.tensor(results[True]["test/loss"]))
    torch.testing.assert_close(results[True]["test/loss"], results[False]["test/loss"], rtol=1e-3, atol=1e-4)


def brute_force_memoryless(sequence: list[int], target: list[int], segment_size: int) -> int:
    """Correct predictions of a perfect counter that sees only the chunk of each target position (plain Python)."""
    from collections import Counter

    length = len(sequence)
    inputs = sequence + [20] + target[:-1]
    correct = 0
    for k, answer in enumerate(target):
        p = length + k  # this position predicts target[k]
        start = p // segment_size * segment_size
        window = sequence[start:] if start < length else []
        answered = {tok for pos, tok in enumerate(inputs) if length < pos <= p and pos >= start}
        counts = Counter(window)
        first = {}
        for pos, tok in enumerate(window):
            first.setdefault(tok, pos)
        candidates = [s for s in range(20) if s not in answered]
        best = sorted(candidates, key=lambda s: (-counts[s], first.get(s, len(inputs)), s))[0]
        correct += best == answer
    return correct


@pytest.mark.parametrize("length,segment_size", [(12, 8), (30, 16), (44, 32), (60, 16), (25, 64), (40, 7)])
def test_memoryless_line_against_brute_force(length, segment_size):
    from experiment.data.sorting import generate_sorting_splits
    from experiment.tasks.sorting import memoryless_correct

    split = generate_sorting_splits(length, 1, 1, 24, seed=length)["test"]
    sequences = [example["prompt_ids"][:-1] for example in split]
    targets = [example["target_ids"] for example in split]
    input_ids = torch.tensor([s + [20] + t[:-1] for s, t in zip(sequences, targets)])
    labels = torch.tensor([[-100] * length + t for t in targets])
    correct, counted = memoryless_correct(input_ids, labels, segment_size)
    assert counted.item() == 24 * 20
    assert correct.item() == sum(brute_force_memoryless(s, t, segment_size) for s, t in zip(sequences, targets))


def test_memoryless_line_hand_case():
    # L = 4: sequence 3 3 5 1, target 3 5 1 then 0 2 4 ... (unseen, ascending). Seeing everything (one chunk),
    # the counter is always right; with chunks of 4 the targets' chunks ([4, 8), [8, 12), ...) show no symbol, so
    # it predicts the smallest unanswered symbol it can see: right only where the target lists unseen symbols.
    sequence = [3, 3, 5, 1]
    target = [3, 5, 1] + [s for s in range(20) if s not in (3, 5, 1)]
    input_ids = torch.tensor([sequence + [20] + target[:-1]])
    labels = torch.tensor([[-100] * 4 + target])
    from experiment.tasks.sorting import memoryless_correct

    assert memoryless_correct(input_ids, labels, 32)[0].item() == 20
    assert memoryless_correct(input_ids, labels, 4)[0].item() == brute_force_memoryless(sequence, target, 4)


def test_resumed_mid_epoch_trains_like_an_uninterrupted_run(tmp_path):
    """A checkpoint written after 3 of an epoch's 4 batches, resumed: the same batches in the same order as the run
    that never stopped, so the same final weights."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    def datamodule():
        dm = SortingDataModule(length=60, num_train=32, num_dev=8, num_test=8, seed=3, batch_size=8, eval_batch_size=8,
                               cache_dir=str(tmp_path / "cache"))
        dm.prepare_data()
        return dm

    seen: dict[str, list] = {"whole": [], "resumed": []}

    class Recording(SortingTask):
        def __init__(self, *args, log_to: str, **kwargs):
            super().__init__(*args, **kwargs)
            self.log_to = log_to

        def training_step(self, batch, batch_idx):
            seen[self.log_to].append(batch["input_ids"][:, :4].clone())
            return super().training_step(batch, batch_idx)

    every_3 = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)
    whole = Recording(memoria_model(), segment_size=32, log_to="whole")
    tiny_trainer(tmp_path, max_epochs=2, limit_val_batches=0, enable_checkpointing=True,
                 callbacks=[every_3]).fit(whole, datamodule=datamodule())

    resumed = Recording(memoria_model(), segment_size=32, log_to="resumed")
    checkpoint = next((tmp_path / "ckpt").glob("*step=3.ckpt"))
    tiny_trainer(tmp_path, max_epochs=2, limit_val_batches=0).fit(resumed, datamodule=datamodule(),
                                                                  ckpt_path=checkpoint)
    assert len(seen["whole"]) == 8 and len(seen["resumed"]) == 5
    for a, b in zip(seen["whole"][3:], seen["resumed"]):
        assert torch.equal(a, b)
    assert not torch.equal(seen["whole"][0], seen["whole"][4])  # epochs differ in order
    for a, b in zip(whole.parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b)
