"""Batches are pinned for a CUDA trainer (asynchronous copies to the GPU), never otherwise."""

from types import SimpleNamespace

import torch

from experiment.data.sorting import SortingDataModule
from experiment.data.transfer import pin_memory_for

from .lm_fixtures import make_tokenizer, write_wikitext103
from .test_wikitext103 import make_dm


def trainer_on(device: str) -> SimpleNamespace:
    """What the loaders read of a Lightning Trainer (its strategy's root device; one process)."""
    return SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device(device)), world_size=1, global_rank=0,
                           current_epoch=0, training=False, state=SimpleNamespace(fn=None))


def test_pin_memory_only_for_a_cuda_trainer():
    assert pin_memory_for(trainer_on("cuda:0")) and pin_memory_for(trainer_on("cuda"))
    assert not pin_memory_for(trainer_on("cpu"))
    assert not pin_memory_for(None) and not pin_memory_for(SimpleNamespace())  # no trainer, or not a Lightning one


def test_sorting_loaders_pin_for_a_cuda_trainer(tmp_path):
    dm = SortingDataModule(length=40, num_train=10, num_dev=3, num_test=3, seed=0, batch_size=4, eval_batch_size=2,
                           cache_dir=str(tmp_path))
    dm.prepare_data()
    dm.setup("fit")
    for device, pinned in (("cpu", False), ("cuda:0", True)):
        dm.trainer = trainer_on(device)
        assert dm.train_dataloader().pin_memory is pinned and dm.val_dataloader().pin_memory is pinned


def test_language_modelling_loaders_pin_for_a_cuda_trainer(tmp_path):
    write_wikitext103(tmp_path / "raw", {"train": 3, "valid": 2, "test": 2})
    dm = make_dm(tmp_path / "raw", make_tokenizer(tmp_path / "tok"), tmp_path / "cache")
    dm.prepare_data()
    dm.setup("fit")
    for device, pinned in (("cpu", False), ("cuda:0", True)):
        dm.trainer = trainer_on(device)
        assert dm.train_dataloader().pin_memory is pinned and dm.val_dataloader().pin_memory is pinned
