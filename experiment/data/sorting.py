"""The synthetic sorting task (experiments.md §a.4): generator, on-disk cache and LightningDataModule.

One example of length L: a sequence of L symbols (0..19) whose distribution drifts linearly from `p_init` to
`p_final`; the target lists the symbols by decreasing count (ties: first appearance), then the unseen ones ascending.

    input_ids = sequence + [SEP] + target[:-1]      # (L + 20,)
    labels    = [-100] * L + target                 # (L + 20,), already shifted: SEP's position predicts target[0]

The generated split file is JSON with keys `prompt_length`, `vocab_size`, `train`, `dev`, `test` (each example
`{prompt_ids, target_ids}`) plus `generator` (the parameters and seed that produced it). It is cached under a name
built from those parameters and written atomically (temp file + rename), so a half-written file is never read as a
finished one.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from .tokenized_cache import cache_root
from .transfer import pin_memory_for

NUM_SYMBOLS = 20
SEPARATOR = NUM_SYMBOLS  # token 20
VOCAB_SIZE = NUM_SYMBOLS + 1
NUM_TARGETS = NUM_SYMBOLS
IGNORE_INDEX = -100
GENERATOR_VERSION = 1  # bump when the RNG call sequence changes: it is part of the cache key


def sort_target(sequence: np.ndarray) -> list[int]:
    """Symbols by decreasing count, ties by first appearance (Counter.most_common order), then unseen ascending."""
    counts = np.bincount(sequence, minlength=NUM_SYMBOLS)  # (20,)
    first_seen = np.full(NUM_SYMBOLS, len(sequence), dtype=np.int64)
    symbols, first_index = np.unique(sequence, return_index=True)
    first_seen[symbols] = first_index
    seen = [s for s in range(NUM_SYMBOLS) if counts[s] > 0]
    seen.sort(key=lambda s: (-counts[s], first_seen[s]))
    unseen = [s for s in range(NUM_SYMBOLS) if counts[s] == 0]
    return seen + unseen


def generate_example(length: int, rng: np.random.Generator) -> tuple[list[int], list[int]]:
    """One (prompt_ids, target_ids) pair: prompt = sequence + [SEP] (length + 1 tokens), target = 20 tokens."""
    p_init = rng.integers(1, 10, size=NUM_SYMBOLS).astype(np.float64)
    p_init /= p_init.sum()
    p_final = rng.integers(1, 10, size=NUM_SYMBOLS).astype(np.float64)
    p_final /= p_final.sum()
    r = (np.arange(length, dtype=np.float64) + 1.0) / length  # (L,) r = (j+1)/L
    probs = (1.0 - r)[:, None] * p_init[None, :] + r[:, None] * p_final[None, :]  # (L, 20)
    # Inverse-CDF sampling, one uniform per position; the clip guards the last bin against rounding.
    cdf = np.cumsum(probs, axis=1)  # (L, 20)
    uniforms = rng.random(length)  # (L,)
    sequence = np.minimum((cdf < uniforms[:, None]).sum(axis=1), NUM_SYMBOLS - 1)  # (L,)
    return sequence.tolist() + [SEPARATOR], sort_target(sequence)


def generate_sorting_splits(length: int, num_train: int, num_dev: int, num_test: int, seed: int) -> dict[str, Any]:
    """All three splits from one seeded generator, in the file layout of §a.4."""
    _check_sizes(length, num_train, num_dev, num_test)
    rng = np.random.default_rng(seed)
    data: dict[str, Any] = {"prompt_length": length + 1, "vocab_size": VOCAB_SIZE}
    for split, count in (("train", num_train), ("dev", num_dev), ("test", num_test)):
        examples = []
        for _ in range(count):
            prompt, target = generate_example(length, rng)
            examples.append({"prompt_ids": prompt, "target_ids": target})
        data[split] = examples
    data["generator"] = {
        "version": GENERATOR_VERSION,
        "length": length,
        "num_train": num_train,
        "num_dev": num_dev,
        "num_test": num_test,
        "seed": seed,
    }
    return data


def _check_sizes(length: int, num_train: int, num_dev: int, num_test: int) -> None:
    if int(length) < 1:
        raise ValueError(f"sorting length must be >= 1, got {length}; set task.data.length to a positive number.")
    for name, value in (("num_train", num_train), ("num_dev", num_dev), ("num_test", num_test)):
        if int(value) < 1:
            raise ValueError(f"sorting {name} must be >= 1, got {value}; set task.data.{name} to a positive number.")


def cache_file_name(length: int, num_train: int, num_dev: int, num_test: int, seed: int) -> str:
    return f"sorting-v{GENERATOR_VERSION}-L{length}-train{num_train}-dev{num_dev}-test{num_test}-seed{seed}.json"


def default_cache_dir() -> Path:
    """$MEMORIA_CACHE_DIR, else ~/.cache/memoria; generated data lives under `sorting/` inside."""
    return cache_root() / "sorting"


def write_json_atomic(data: Any, path: str | Path) -> None:
    """Write JSON to a temp file in the same folder, fsync, then rename over `path` (atomic on POSIX)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def load_or_generate(length: int, num_train: int, num_dev: int, num_test: int, seed: int,
                     cache_dir: str | Path | None = None) -> Path:
    """Path of the cached split file for these parameters, generating and caching it first if missing."""
    cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    path = cache_dir / cache_file_name(length, num_train, num_dev, num_test, seed)
    if not path.exists():
        write_json_atomic(generate_sorting_splits(length, num_train, num_dev, num_test, seed), path)
    return path


def read_sorting_file(path: str | Path) -> dict[str, Any]:
    """Read and check a split file (ours or one in the reference's format)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"sorting data file {str(path)!r} does not exist; fix task.data.data_file or set it to "
                                "null to generate data.")
    with open(path) as handle:
        data = json.load(handle)
    missing = [key for key in ("prompt_length", "vocab_size", "train", "dev", "test") if key not in data]
    if missing:
        raise ValueError(f"sorting data file {str(path)!r} lacks keys {missing}; it must hold prompt_length, "
                         "vocab_size, train, dev and test.")
    return data


class SortingDataset(Dataset):
    """Examples of one split as fixed-length (L + 20,) tensors; tokens kept as uint8 to stay small."""

    def __init__(self, examples: list[dict[str, list[int]]], prompt_length: int):
        if not examples:
            raise ValueError("a sorting split is empty; generate at least one example per split.")
        rows = []
        for index, example in enumerate(examples):
            prompt, target = example["prompt_ids"], example["target_ids"]
            if len(prompt) != prompt_length or len(target) != NUM_TARGETS:
                raise ValueError(f"sorting example {index} has prompt length {len(prompt)} and target length "
                                 f"{len(target)}; expected {prompt_length} and {NUM_TARGETS}.")
            rows.append(prompt + target)
        self.tokens = torch.tensor(rows, dtype=torch.uint8)  # (N, L + 1 + 20)
        self.prompt_length = prompt_length

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        row = self.tokens[index].long()  # (L + 21,)
        input_ids = row[:-1]  # prompt + target[:-1]: (L + 20,)
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        labels[self.prompt_length - 1:] = row[self.prompt_length:]  # SEP's position predicts target[0]
        return {"input_ids": input_ids, "labels": labels}


class UnpaddedDistributedSampler(DistributedSampler):
    """Rank r takes examples r, r + world, ...: no padding, so no example is counted twice in evaluation."""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)

    def __iter__(self):
        return iter(range(self.rank, len(self.dataset), self.num_replicas))

    def __len__(self) -> int:
        return len(range(self.rank, len(self.dataset), self.num_replicas))


class SortingDataModule(L.LightningDataModule):
    """Generated (or given) sorting data. `vocab_size` is 21 once `setup()` ran.

    length, num_train/num_dev/num_test, seed: generator parameters (the cache key).
    data_file: a ready split file to use instead of generating one.
    batch_size: examples per device per optimizer step (the paper's global batch is 32).
    eval_batch_size: examples per device in validation and test (the paper used 1).
    """

    def __init__(self, length: int = 1000, num_train: int = 80000, num_dev: int = 800, num_test: int = 800,
                 seed: int = 42, batch_size: int = 32, eval_batch_size: int = 1, num_workers: int = 0,
                 cache_dir: str | None = None, data_file: str | None = None):
        super().__init__()
        if data_file is None:
            _check_sizes(length, num_train, num_dev, num_test)
        for name, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
            if int(value) < 1:
                raise ValueError(f"{name} must be >= 1, got {value}; set task.data.{name} to a positive number.")
        self.length, self.num_train, self.num_dev, self.num_test = length, num_train, num_dev, num_test
        self.seed, self.batch_size, self.eval_batch_size = seed, batch_size, eval_batch_size
        self.num_workers, self.cache_dir, self.data_file = num_workers, cache_dir, data_file
        self.vocab_size = VOCAB_SIZE
        self.splits: dict[str, SortingDataset] = {}
        self.source: str | None = None

    def _path(self) -> Path:
        if self.data_file:
            return Path(self.data_file).expanduser()
        return load_or_generate(self.length, self.num_train, self.num_dev, self.num_test, self.seed, self.cache_dir)

    def prepare_data(self) -> None:
        # Runs on one process per node: generate the cache once, before every rank reads it in setup().
        self._path()

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        path = self._path()
        data = read_sorting_file(path)
        self.vocab_size = int(data["vocab_size"])
        self.length = int(data["prompt_length"]) - 1  # a given file decides L
        self.source = str(path)
        for split in ("train", "dev", "test"):
            self.splits[split] = SortingDataset(data[split], int(data["prompt_length"]))

    @property
    def sequence_length(self) -> int:
        """Tokens per example fed to the model: L + 20."""
        return self.length + NUM_TARGETS

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.splits["train"], batch_size=self.batch_size, shuffle=True,
                          num_workers=self.num_workers, drop_last=False, pin_memory=pin_memory_for(self.trainer))

    def _eval_loader(self, split: str) -> DataLoader:
        dataset = self.splits[split]
        sampler = None
        trainer = self.trainer
        if trainer is not None and trainer.world_size > 1:
            sampler = UnpaddedDistributedSampler(dataset, trainer.world_size, trainer.global_rank)
        return DataLoader(dataset, batch_size=self.eval_batch_size, shuffle=False, sampler=sampler,
                          num_workers=self.num_workers, pin_memory=pin_memory_for(trainer))

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("dev")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")
