"""The sorting generator (experiments.md §a.4), its cache and the data module."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from experiment.data import sorting
from experiment.data.sorting import (
    IGNORE_INDEX,
    SEPARATOR,
    SortingDataModule,
    SortingDataset,
    UnpaddedDistributedSampler,
    generate_example,
    generate_sorting_splits,
    load_or_generate,
    sort_target,
)

FIXTURE = Path(__file__).parent / "fixtures" / "sorting_L30_seed7.json"


def reference_target(sequence: list[int]) -> list[int]:
    """The specification's wording, spelled with Counter.most_common."""
    seen = [symbol for symbol, _ in Counter(sequence).most_common()]
    return seen + sorted(set(range(20)) - set(seen))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=19), min_size=1, max_size=60))
def test_target_is_counter_most_common_then_unseen_ascending(sequence):
    assert sort_target(np.array(sequence)) == reference_target(sequence)


def test_example_layout_and_vocabulary():
    rng = np.random.default_rng(0)
    prompt, target = generate_example(500, rng)
    assert len(prompt) == 501 and prompt[-1] == SEPARATOR
    assert all(0 <= token < 20 for token in prompt[:-1])
    assert sorted(target) == list(range(20))
    assert target == reference_target(prompt[:-1])


def test_distribution_drifts_from_p_init_to_p_final():
    # With one symbol weighted 9 at the start and 1 at the end, it must be far more frequent early than late.
    class FixedRng:
        def __init__(self):
            self.real = np.random.default_rng(3)
            self.calls = 0

        def integers(self, low, high, size):
            self.calls += 1
            weights = np.ones(size, dtype=np.int64)
            weights[0] = 9 if self.calls == 1 else 1  # p_init favours symbol 0, p_final does not
            weights[1] = 1 if self.calls == 1 else 9  # p_final favours symbol 1
            return weights

        def random(self, n):
            return self.real.random(n)

    prompt, _ = generate_example(20000, FixedRng())
    sequence = np.array(prompt[:-1])
    early, late = sequence[:2000], sequence[-2000:]
    assert (early == 0).mean() > 0.25 and (late == 0).mean() < 0.06
    assert (late == 1).mean() > 0.25 and (early == 1).mean() < 0.06


def test_generator_is_seeded_and_matches_the_shipped_fixture():
    shipped = json.loads(FIXTURE.read_text())
    assert generate_sorting_splits(30, 3, 2, 2, seed=7) == shipped  # bump GENERATOR_VERSION if this changes
    assert generate_sorting_splits(30, 3, 2, 2, seed=8)["train"] != shipped["train"]
    assert shipped["prompt_length"] == 31 and shipped["vocab_size"] == 21
    assert set(shipped) >= {"prompt_length", "vocab_size", "train", "dev", "test"}
    assert shipped["generator"]["seed"] == 7


def test_dataset_pairs_are_shifted_and_cover_only_targets():
    shipped = json.loads(FIXTURE.read_text())
    dataset = SortingDataset(shipped["train"], shipped["prompt_length"])
    item = dataset[0]
    prompt, target = shipped["train"][0]["prompt_ids"], shipped["train"][0]["target_ids"]
    assert item["input_ids"].tolist() == prompt + target[:-1]
    assert item["labels"].tolist() == [IGNORE_INDEX] * 30 + target
    assert item["labels"][30].item() == target[0]  # the separator's position predicts target[0]
    assert item["input_ids"][30].item() == SEPARATOR


def test_cache_is_keyed_by_parameters_and_written_once(tmp_path):
    first = load_or_generate(20, 2, 1, 1, seed=1, cache_dir=tmp_path)
    stamp = first.stat().st_mtime_ns
    again = load_or_generate(20, 2, 1, 1, seed=1, cache_dir=tmp_path)
    other = load_or_generate(20, 2, 1, 1, seed=2, cache_dir=tmp_path)
    assert again == first and again.stat().st_mtime_ns == stamp
    assert other != first
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([first.name, other.name])  # no temp files left


def test_interrupted_write_leaves_no_cache_file(tmp_path, monkeypatch):
    def broken_dump(data, handle):
        handle.write('{"prompt_length": 21, "vocab_')  # half a file, then the process "dies"
        raise KeyboardInterrupt

    monkeypatch.setattr(sorting.json, "dump", broken_dump)
    with pytest.raises(KeyboardInterrupt):
        load_or_generate(20, 2, 1, 1, seed=1, cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_datamodule_batches(tmp_path):
    dm = SortingDataModule(length=40, num_train=10, num_dev=3, num_test=3, seed=0, batch_size=4,
                           eval_batch_size=2, cache_dir=str(tmp_path))
    dm.prepare_data()
    dm.setup("fit")
    assert dm.vocab_size == 21 and dm.sequence_length == 60
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (4, 60) and batch["labels"].shape == (4, 60)
    assert batch["input_ids"].dtype == torch.long
    assert ((batch["labels"] != IGNORE_INDEX).sum(dim=1) == 20).all()
    assert sum(b["input_ids"].shape[0] for b in dm.val_dataloader()) == 3


def test_datamodule_reads_a_given_file():
    dm = SortingDataModule(data_file=str(FIXTURE), batch_size=2)
    dm.setup("fit")
    assert len(dm.splits["train"]) == 3 and dm.length == 30 and dm.source == str(FIXTURE)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"length": 0}, "task.data.length"),
        ({"num_train": 0}, "task.data.num_train"),
        ({"batch_size": 0}, "task.data.batch_size"),
        ({"data_file": "/nonexistent/sort.json"}, "task.data.data_file"),
    ],
)
def test_bad_data_settings_name_the_key(kwargs, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        dm = SortingDataModule(**kwargs)
        dm.setup("fit")


def test_unpadded_sampler_counts_every_example_once():
    data = list(range(10))
    seen = [index for rank in range(3) for index in UnpaddedDistributedSampler(data, num_replicas=3, rank=rank)]
    assert sorted(seen) == data
    assert [len(UnpaddedDistributedSampler(data, 3, rank)) for rank in range(3)] == [4, 3, 3]
