"""The sorting generator (experiments.md §a.4), its cache and the data module."""

from __future__ import annotations

import json
import pickle
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
    export_sorting_json,
    generate_rows,
    generate_sequences,
    generate_sorting_splits,
    load_or_generate,
    sort_target,
    sort_targets,
)

FIXTURE_V1 = Path(__file__).parent / "fixtures" / "sorting_L30_seed7.json"  # generator version 1 (import format)
FIXTURE = Path(__file__).parent / "fixtures" / "sorting_L30_seed7_v2.json"  # what version 2 makes of seed 7


def reference_target(sequence: list[int]) -> list[int]:
    """The specification's wording, spelled with Counter.most_common."""
    seen = [symbol for symbol, _ in Counter(sequence).most_common()]
    return seen + sorted(set(range(20)) - set(seen))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=19), min_size=1, max_size=60))
def test_target_is_counter_most_common_then_unseen_ascending(sequence):
    assert sort_target(np.array(sequence)) == reference_target(sequence)


@settings(max_examples=50, deadline=None)
@given(st.integers(min_value=1, max_value=5), st.integers(min_value=1, max_value=40), st.data())
def test_batched_targets_with_first_appearances_past_the_window(rows, length, data):
    # A window of 4 tokens forces the fallback that finds first appearances in the whole sequence.
    sequences = np.array(data.draw(st.lists(st.lists(st.integers(0, 19), min_size=length, max_size=length),
                                            min_size=rows, max_size=rows)), dtype=np.uint8)
    original = sorting.FIRST_SEEN_WINDOW
    sorting.FIRST_SEEN_WINDOW = 4
    try:
        targets = sort_targets(sequences)
    finally:
        sorting.FIRST_SEEN_WINDOW = original
    assert targets.dtype == np.uint8 and targets.shape == (rows, 20)
    assert [row.tolist() for row in targets] == [reference_target(row.tolist()) for row in sequences]


def test_example_layout_and_vocabulary():
    rows = generate_rows(500, 4, np.random.default_rng(0))
    assert rows.shape == (4, 521) and rows.dtype == np.uint8
    for row in rows:
        assert row[500] == SEPARATOR and row[:500].max() < 20
        assert row[501:].tolist() == reference_target(row[:500].tolist())


def test_every_position_follows_the_drifting_mixture():
    # Per position j and symbol s, the count over n examples against sum_n p_n,j(s) with
    # p_n,j = (1 - r) p_init + r p_final, r = (j + 1)/L: standardised residuals must look like N(0, 1).
    length, n = 50, 4000
    rng = np.random.default_rng(1)
    state = rng.bit_generator.state
    weights = rng.integers(1, 10, size=(n, 2, 20))  # the generator's first draw
    rng.bit_generator.state = state
    sequences = generate_sequences(length, n, rng)  # (n, L)
    p = weights / weights.sum(axis=2, keepdims=True)  # (n, 2, 20)
    r = (np.arange(length) + 1) / length  # (L,)
    probs = (1 - r)[None, :, None] * p[:, None, 0] + r[None, :, None] * p[:, None, 1]  # (n, L, 20)
    observed = (sequences[:, :, None] == np.arange(20)).sum(axis=0)  # (L, 20)
    z = (observed - probs.sum(axis=0)) / np.sqrt((probs * (1 - probs)).sum(axis=0))
    assert 0.85 < (z ** 2).mean() < 1.15 and np.abs(z).max() < 5.0
    # The last position draws from p_final alone (r = 1), the first almost from p_init (r = 1/L).
    assert np.array_equal(probs[:, -1], p[:, 1])


def test_generator_is_seeded_and_matches_the_shipped_fixture():
    shipped = json.loads(FIXTURE.read_text())
    assert generate_sorting_splits(30, 3, 2, 2, seed=7) == shipped  # bump GENERATOR_VERSION if this changes
    assert generate_sorting_splits(30, 3, 2, 2, seed=8)["train"] != shipped["train"]
    assert shipped["prompt_length"] == 31 and shipped["vocab_size"] == 21
    assert shipped["generator"] == {"version": 2, "length": 30, "num_train": 3, "num_dev": 2, "num_test": 2,
                                    "seed": 7}


def test_dataset_pairs_are_shifted_and_cover_only_targets():
    shipped = json.loads(FIXTURE.read_text())
    dataset = SortingDataset.from_examples(shipped["train"], shipped["prompt_length"])
    item = dataset[0]
    prompt, target = shipped["train"][0]["prompt_ids"], shipped["train"][0]["target_ids"]
    assert item["input_ids"].tolist() == prompt + target[:-1]
    assert item["labels"].tolist() == [IGNORE_INDEX] * 30 + target
    assert item["labels"][30].item() == target[0]  # the separator's position predicts target[0]
    assert item["input_ids"][30].item() == SEPARATOR


def cache_files(folder):
    return sorted(p.name for p in Path(folder).iterdir())


def test_cache_is_keyed_by_parameters_and_written_once(tmp_path):
    first = load_or_generate(20, 2, 1, 1, seed=1, cache_dir=tmp_path)
    stamp = first.stat().st_mtime_ns
    again = load_or_generate(20, 2, 1, 1, seed=1, cache_dir=tmp_path)
    other = load_or_generate(20, 2, 1, 1, seed=2, cache_dir=tmp_path)
    assert again == first and again.stat().st_mtime_ns == stamp
    assert other != first
    stem, other_stem = first.name[:-3], other.name[:-3]
    assert cache_files(tmp_path) == sorted([f"{stem}.u8", f"{stem}.meta.json", f"{other_stem}.u8",
                                            f"{other_stem}.meta.json"])  # no temp files left
    assert first.stat().st_size == 4 * (20 + 21)  # one uint8 row per example
    meta = json.loads((tmp_path / f"{stem}.meta.json").read_text())
    assert meta["generator"]["version"] == sorting.GENERATOR_VERSION and meta["rows"] == {"train": 2, "dev": 1,
                                                                                          "test": 1}


def test_interrupted_write_leaves_no_cache_file(tmp_path, monkeypatch):
    real = sorting.iter_split_rows

    def dies_after_one_chunk(*args):
        yield next(real(*args))
        raise KeyboardInterrupt  # the process "dies" half way

    monkeypatch.setattr(sorting, "iter_split_rows", dies_after_one_chunk)
    with pytest.raises(KeyboardInterrupt):
        load_or_generate(20, 2, 1, 1, seed=1, cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def truncate(data, meta):
    data.write_bytes(data.read_bytes()[:-7])


def flip_token(data, meta):
    raw = bytearray(data.read_bytes())
    raw[3] = 77  # a symbol out of range
    data.write_bytes(bytes(raw))


def swap_target(data, meta):
    raw = bytearray(data.read_bytes())
    raw[-1] = raw[-2]  # the last target is no longer a permutation of 0..19
    data.write_bytes(bytes(raw))


def shift_rows(data, meta):
    raw = data.read_bytes()
    data.write_bytes(raw[1:] + raw[:1])  # same size, every row shifted by one byte


def edit_metadata(data, meta):
    record = json.loads(meta.read_text())
    record["rows"]["train"] = 3  # sizes no longer match the checksum
    meta.write_text(json.dumps(record))


def garble_metadata(data, meta):
    meta.write_text('{"format": "memoria-sor')


def drop_metadata(data, meta):
    meta.unlink()


@pytest.mark.parametrize("damage", [truncate, flip_token, swap_target, shift_rows, edit_metadata, garble_metadata,
                                    drop_metadata])
def test_a_corrupt_entry_is_reported_by_path_and_rebuilt(tmp_path, caplog, damage):
    data = load_or_generate(30, 4, 2, 2, seed=3, cache_dir=tmp_path)
    meta = data.with_name(data.name[:-3] + ".meta.json")
    good_data, good_meta = data.read_bytes(), meta.read_text()
    damage(data, meta)
    sorting._VALIDATED.clear()  # a new process
    with caplog.at_level("WARNING", logger="experiment.data.sorting"):
        again = load_or_generate(30, 4, 2, 2, seed=3, cache_dir=tmp_path)
    warnings = [record.getMessage() for record in caplog.records if record.levelname == "WARNING"]
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert "corrupt" in warnings[0] and (str(data) in warnings[0] or str(meta) in warnings[0])
    assert again == data and data.read_bytes() == good_data and meta.read_text() == good_meta
    assert len(cache_files(tmp_path)) == 2


def test_a_cache_is_checked_once_per_process(tmp_path, monkeypatch):
    path = load_or_generate(20, 2, 1, 1, seed=1, cache_dir=tmp_path)
    calls = []
    monkeypatch.setattr(sorting, "validate_cache_tokens", lambda *args: calls.append(args))
    load_or_generate(20, 2, 1, 1, seed=1, cache_dir=tmp_path)
    assert calls == []  # written by this process: already known good
    sorting._VALIDATED.clear()
    load_or_generate(20, 2, 1, 1, seed=1, cache_dir=tmp_path)
    load_or_generate(20, 2, 1, 1, seed=1, cache_dir=tmp_path)
    assert len(calls) == 1 and calls[0][0] == path


def test_long_generation_shows_a_progress_bar(tmp_path, capsys):
    load_or_generate(50, 3, 1, 1, seed=0, cache_dir=tmp_path, progress=True)
    assert "sorting data L=50" in capsys.readouterr().err


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
    assert [len(dm.splits[split]) for split in ("train", "dev", "test")] == [10, 3, 3]


def test_cached_splits_are_memory_mapped_and_pickle_without_their_data(tmp_path):
    dm = SortingDataModule(length=1000, num_train=64, num_dev=2, num_test=2, seed=0, cache_dir=str(tmp_path))
    dm.setup("fit")
    test_split = dm.splits["test"]
    assert isinstance(test_split.rows, np.memmap) and not test_split.rows.flags.writeable
    blob = pickle.dumps(dm.splits["train"])  # what a DataLoader worker receives
    assert len(blob) < 2000
    assert torch.equal(pickle.loads(blob)[63]["input_ids"], dm.splits["train"][63]["input_ids"])
    expected = generate_sorting_splits(1000, 64, 2, 2, seed=0)["test"][1]
    assert test_split[1]["input_ids"].tolist() == expected["prompt_ids"] + expected["target_ids"][:-1]


def test_export_then_import_gives_the_same_examples(tmp_path):
    out = export_sorting_json(tmp_path / "sort.json", 30, 3, 2, 2, seed=7, cache_dir=tmp_path / "cache")
    assert json.loads(out.read_text()) == json.loads(FIXTURE.read_text())
    given = SortingDataModule(data_file=str(out))
    generated = SortingDataModule(length=30, num_train=3, num_dev=2, num_test=2, seed=7,
                                  cache_dir=str(tmp_path / "cache"))
    given.setup("fit")
    generated.setup("fit")
    for split in ("train", "dev", "test"):
        for index in range(len(generated.splits[split])):
            for key in ("input_ids", "labels"):
                assert torch.equal(given.splits[split][index][key], generated.splits[split][index][key])


def test_export_command_line(tmp_path):
    sorting.main(["--length", "30", "--num-train", "3", "--num-dev", "2", "--num-test", "2", "--seed", "7",
                  "--cache-dir", str(tmp_path), "--out", str(tmp_path / "out.json")])
    assert json.loads((tmp_path / "out.json").read_text()) == json.loads(FIXTURE.read_text())


@pytest.mark.parametrize("fixture", [FIXTURE_V1, FIXTURE])
def test_datamodule_reads_a_given_file(fixture):
    dm = SortingDataModule(data_file=str(fixture), batch_size=2)
    dm.setup("fit")
    assert len(dm.splits["train"]) == 3 and dm.length == 30 and dm.source == str(fixture)
    shipped = json.loads(fixture.read_text())
    assert dm.splits["dev"][1]["input_ids"].tolist() == shipped["dev"][1]["prompt_ids"] + \
        shipped["dev"][1]["target_ids"][:-1]


def bad_file(tmp_path, edit):
    data = json.loads(FIXTURE.read_text())
    text = edit(data)
    path = tmp_path / "bad.json"
    path.write_text(text if isinstance(text, str) else json.dumps(data))
    return path


def short_prompt(data):
    data["train"][1]["prompt_ids"].pop()


def out_of_range(data):
    data["test"][0]["target_ids"][3] = 25


def no_separator(data):
    data["dev"][0]["prompt_ids"][-1] = 4


@pytest.mark.parametrize(
    "edit, problem",
    [
        (lambda data: '{"prompt_length": 31, "train": [', "not valid JSON"),
        (lambda data: "[1, 2]", "top level is a list"),
        (lambda data: data.pop("dev"), "lacks keys \\['dev'\\]"),
        (lambda data: data.update(vocab_size=30), "vocab_size=30"),
        (lambda data: data.update(train=[]), "split 'train' is not a non-empty list"),
        (short_prompt, "train example 1 has a prompt of 30 tokens"),
        (out_of_range, "test example 0 does not hold symbols"),
        (no_separator, "dev example 0 does not hold symbols"),
    ],
)
def test_a_bad_data_file_is_one_clear_value_error(tmp_path, edit, problem):
    dm = SortingDataModule(data_file=str(bad_file(tmp_path, edit)))
    with pytest.raises(ValueError, match=problem) as error:
        dm.setup("fit")
    assert "task.data.data_file=" in str(error.value) and "\n" not in str(error.value)


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
        dm.prepare_data()
        dm.setup("fit")


def test_unpadded_sampler_counts_every_example_once():
    data = list(range(10))
    seen = [index for rank in range(3) for index in UnpaddedDistributedSampler(data, num_replicas=3, rank=rank)]
    assert sorted(seen) == data
    assert [len(UnpaddedDistributedSampler(data, 3, rank)) for rank in range(3)] == [4, 3, 3]
