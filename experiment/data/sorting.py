"""The synthetic sorting task (experiments.md §a.4): generator, on-disk cache and LightningDataModule.

One example of length L: a sequence of L symbols (0..19) whose distribution drifts linearly from `p_init` to
`p_final`; the target lists the symbols by decreasing count (ties: first appearance), then the unseen ones ascending.

    input_ids = sequence + [SEP] + target[:-1]      # (L + 20,)
    labels    = [-100] * L + target                 # (L + 20,), already shifted: SEP's position predicts target[0]

Generation (version 2) is vectorised over a chunk of examples. `p = (1 - r) p_init + r p_final` is a mixture, so a
position draws its symbol from p_final with probability r = (j + 1)/L and from p_init otherwise; the weights are
integers 1..9, so each component is a lookup table of sum(weights) cells. One 64-bit random word per position does
both draws (its high half picks the component, its low half the cell). Chunk c of split s (max(1, 2^21 // L)
examples) comes from the generator seeded with (seed, s, c): splits and chunks are independent streams. Version 1
(one example at a time, inverse CDF, about 12 ms per example at L = 32,000 against 0.5 ms here) drew the same
distribution with other numbers: a seed gives other examples than it did there.

The cache is compact: one row of L + 21 uint8 tokens per example (sequence, separator, target), train then dev then
test, in `<key>.u8`, read memory-mapped, and a metadata file `<key>.meta.json` (generator version and parameters,
rows per split, row width, byte size, and a SHA-256 of the metadata itself). Both are written to temporary names,
fsync'ed and renamed (the metadata last: it marks the entry complete). Opening an entry checks the metadata's
checksum and parameters, the data file's size and every token (range, the separator column, each target a
permutation of 0..19); a bad entry is reported in one line naming its path and rebuilt.

JSON (keys `prompt_length`, `vocab_size`, `train`, `dev`, `test`, each example `{prompt_ids, target_ids}`, plus
`generator`) stays the import format (`task.data.data_file=<file>.json`) and the export format
(`python -m experiment.data.sorting --length 1000 --out sort.json`, or `export_sorting_json`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from .tokenized_cache import cache_root, fsync_dir
from .transfer import pin_memory_for

log = logging.getLogger(__name__)

NUM_SYMBOLS = 20
SEPARATOR = NUM_SYMBOLS  # token 20
VOCAB_SIZE = NUM_SYMBOLS + 1
NUM_TARGETS = NUM_SYMBOLS
IGNORE_INDEX = -100
GENERATOR_VERSION = 2  # bump when the examples a seed produces change: it is part of the cache key
MAX_WEIGHT = 9  # p_init / p_final weights are integers 1..MAX_WEIGHT
TABLE_SIZE = NUM_SYMBOLS * MAX_WEIGHT  # the largest sum of 20 weights: cells of a component's lookup table
CHUNK_TOKENS = 1 << 21  # examples per generator chunk: max(1, CHUNK_TOKENS // L) (part of the generator version)
FIRST_SEEN_WINDOW = 1024  # first appearances are looked up in this prefix first (fallback: the whole sequence)
SPLITS = ("train", "dev", "test")
CACHE_FORMAT = "memoria-sorting-u8"
PROGRESS_MIN_TOKENS = 50_000_000  # show a progress bar when a cache this large is generated


# --------------------------------------------------------------------------------------------------------------
# the generator
def sort_target(sequence: np.ndarray) -> list[int]:
    """Symbols by decreasing count, ties by first appearance (Counter.most_common order), then unseen ascending."""
    return sort_targets(np.asarray(sequence)[None, :])[0].tolist()


def sort_targets(sequences: np.ndarray) -> np.ndarray:
    """(n, L) symbols -> (n, 20) uint8 targets of `sort_target`, for a whole chunk at once."""
    sequences = np.asarray(sequences)
    n, length = sequences.shape
    rows = np.arange(n)
    flat = (rows[:, None] * NUM_SYMBOLS + sequences).ravel()
    counts = np.bincount(flat, minlength=n * NUM_SYMBOLS).reshape(n, NUM_SYMBOLS)  # (n, 20)
    window = sequences[:, :FIRST_SEEN_WINDOW]  # (n, W)
    hits = window[:, :, None] == np.arange(NUM_SYMBOLS, dtype=sequences.dtype)  # (n, W, 20)
    found = hits.any(axis=1)  # (n, 20)
    first_seen = np.where(found, hits.argmax(axis=1), length)  # (n, 20)
    for row, symbol in zip(*np.nonzero((counts > 0) & ~found)):  # seen, but only after the window (rare)
        first_seen[row, symbol] = int(np.argmax(sequences[row] == symbol))
    # One key per symbol: seen symbols by (-count, first appearance), then unseen ones by symbol, after all seen.
    seen_key = -counts * (length + 1) + first_seen
    unseen_key = length + 1 + np.arange(NUM_SYMBOLS)
    keys = np.where(counts > 0, seen_key, unseen_key[None, :])  # (n, 20), distinct within a row
    return np.argsort(keys, axis=1, kind="stable").astype(np.uint8)


def _uniform_below(words: np.ndarray, bound: np.ndarray | int) -> np.ndarray:
    """floor(u * bound) for u = words / 2^32 (32-bit words): a uniform integer in [0, bound) (bias < bound / 2^32)."""
    return (words * np.asarray(bound, dtype=np.uint64)) >> np.uint64(32)


def generate_sequences(length: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """(count, length) uint8 sequences of §a.4: weights 1..9 for p_init and p_final, then a linear drift."""
    weights = rng.integers(1, MAX_WEIGHT + 1, size=(count, 2, NUM_SYMBOLS))  # (n, 2, 20): p_init, p_final
    totals = weights.sum(axis=2).astype(np.uint64)  # (n, 2)
    # Lookup tables: cell u of component c holds the symbol s with cum[s-1] <= u < cum[s].
    cum = np.cumsum(weights, axis=2)  # (n, 2, 20)
    cells = np.arange(TABLE_SIZE)
    tables = (cum[:, :, None, :] <= cells[None, None, :, None]).sum(axis=3).astype(np.uint8)  # (n, 2, 180)
    words = rng.bit_generator.random_raw(count * length).reshape(count, length)  # (n, L) uint64
    high, low = words >> np.uint64(32), words & np.uint64(0xFFFFFFFF)
    # Component: p_final with probability r = (j + 1) / L, i.e. a uniform integer in [0, L) below j + 1.
    final = _uniform_below(high, length) < np.arange(1, length + 1, dtype=np.uint64)  # (n, L) bool
    component_total = np.where(final, totals[:, 1:2], totals[:, 0:1])  # (n, L)
    cell = _uniform_below(low, component_total).astype(np.int64)  # (n, L)
    table_row = np.arange(count)[:, None] * 2 + final  # (n, L): which of the 2n tables
    return tables.reshape(-1)[table_row * TABLE_SIZE + cell]  # (n, L) uint8


def generate_rows(length: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """(count, length + 21) uint8 rows: sequence, separator, target."""
    sequences = generate_sequences(length, count, rng)
    separator = np.full((count, 1), SEPARATOR, dtype=np.uint8)
    return np.concatenate([sequences, separator, sort_targets(sequences)], axis=1)


def chunk_rows(length: int) -> int:
    """Examples per generator chunk for this length."""
    return max(1, CHUNK_TOKENS // int(length))


def iter_split_rows(length: int, count: int, seed: int, split: str) -> Iterator[np.ndarray]:
    """The rows of one split, chunk by chunk; chunk c is drawn from the generator seeded with (seed, split, c)."""
    per_chunk = chunk_rows(length)
    split_index = SPLITS.index(split)
    for chunk, start in enumerate(range(0, count, per_chunk)):
        rng = np.random.default_rng([int(seed), split_index, chunk])
        yield generate_rows(length, min(per_chunk, count - start), rng)


def _check_sizes(length: int, num_train: int, num_dev: int, num_test: int) -> None:
    if int(length) < 1:
        raise ValueError(f"sorting length must be >= 1, got {length}; set task.data.length to a positive number.")
    for name, value in (("num_train", num_train), ("num_dev", num_dev), ("num_test", num_test)):
        if int(value) < 1:
            raise ValueError(f"sorting {name} must be >= 1, got {value}; set task.data.{name} to a positive number.")


def generator_record(length: int, num_train: int, num_dev: int, num_test: int, seed: int) -> dict[str, int]:
    return {"version": GENERATOR_VERSION, "length": int(length), "num_train": int(num_train),
            "num_dev": int(num_dev), "num_test": int(num_test), "seed": int(seed)}


def generate_sorting_splits(length: int, num_train: int, num_dev: int, num_test: int, seed: int) -> dict[str, Any]:
    """All three splits in the JSON layout of §a.4 (lists of ints: for export and small runs)."""
    _check_sizes(length, num_train, num_dev, num_test)
    data: dict[str, Any] = {"prompt_length": length + 1, "vocab_size": VOCAB_SIZE}
    for split, count in zip(SPLITS, (num_train, num_dev, num_test)):
        rows = np.concatenate(list(iter_split_rows(length, count, seed, split)))
        data[split] = rows_to_examples(rows, length + 1)
    data["generator"] = generator_record(length, num_train, num_dev, num_test, seed)
    return data


def rows_to_examples(rows: np.ndarray, prompt_length: int) -> list[dict[str, list[int]]]:
    return [{"prompt_ids": row[:prompt_length].tolist(), "target_ids": row[prompt_length:].tolist()}
            for row in np.asarray(rows)]


# --------------------------------------------------------------------------------------------------------------
# the compact cache
class CorruptCacheError(ValueError):
    """A cache entry that fails validation; the message names the path and what is wrong."""


def default_cache_dir() -> Path:
    """$MEMORIA_CACHE_DIR, else ~/.cache/memoria; generated data lives under `sorting/` inside."""
    return cache_root() / "sorting"


def cache_stem(length: int, num_train: int, num_dev: int, num_test: int, seed: int) -> str:
    return f"sorting-v{GENERATOR_VERSION}-L{length}-train{num_train}-dev{num_dev}-test{num_test}-seed{seed}"


def cache_paths(cache_dir: Path, generator: dict[str, int]) -> tuple[Path, Path]:
    """(data file, metadata file) of the cache entry for these generator parameters."""
    stem = cache_stem(generator["length"], generator["num_train"], generator["num_dev"], generator["num_test"],
                      generator["seed"])
    return cache_dir / f"{stem}.u8", cache_dir / f"{stem}.meta.json"


def _metadata_checksum(meta: dict[str, Any]) -> str:
    body = {key: value for key, value in meta.items() if key != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def cache_metadata(generator: dict[str, int]) -> dict[str, Any]:
    length = generator["length"]
    rows = {split: generator[f"num_{split}"] for split in SPLITS}
    width = length + 1 + NUM_TARGETS
    meta = {"format": CACHE_FORMAT, "generator": dict(generator), "prompt_length": length + 1,
            "vocab_size": VOCAB_SIZE, "row_width": width, "rows": rows,
            "data_bytes": sum(rows.values()) * width, "dtype": "uint8"}
    meta["checksum"] = _metadata_checksum(meta)
    return meta


def _temp_file(path: Path) -> tuple[int, str]:
    """A temp file next to `path`, with the permissions a plain open() would give (mkstemp's are 0600)."""
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)
    return fd, name


def write_json_atomic(data: Any, path: str | Path) -> None:
    """Write JSON to a temp file in the same folder, fsync, then rename over `path` (atomic on POSIX)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = _temp_file(path)
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
        fsync_dir(path.parent)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def write_cache(cache_dir: Path, generator: dict[str, int], progress: bool | None = None) -> Path:
    """Generate every split into the cache entry for `generator` (atomically); returns the data file's path."""
    data_path, meta_path = cache_paths(cache_dir, generator)
    cache_dir.mkdir(parents=True, exist_ok=True)
    meta = cache_metadata(generator)
    length = generator["length"]
    total_rows = sum(meta["rows"].values())
    if progress is None:
        progress = meta["data_bytes"] >= PROGRESS_MIN_TOKENS
    started = time.perf_counter()
    fd, tmp_name = _temp_file(data_path)
    meta_tmp: str | None = None
    try:
        from tqdm import tqdm

        with os.fdopen(fd, "wb") as handle, tqdm(total=total_rows, disable=not progress, unit="ex", mininterval=1.0,
                                                 desc=f"sorting data L={length}") as bar:
            for split in SPLITS:
                for rows in iter_split_rows(length, meta["rows"][split], generator["seed"], split):
                    handle.write(rows.tobytes())
                    bar.update(len(rows))
            handle.flush()
            os.fsync(handle.fileno())
        meta_fd, meta_tmp = _temp_file(meta_path)
        with os.fdopen(meta_fd, "w") as handle:
            json.dump(meta, handle, indent=1)
            handle.flush()
            os.fsync(handle.fileno())
        # Data first, then the metadata that marks the entry complete. Both are determined by the key, so a
        # process that rebuilds an entry while another reads it (ranks on several nodes) swaps in identical files.
        os.replace(tmp_name, data_path)
        os.replace(meta_tmp, meta_path)
        fsync_dir(cache_dir)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        if meta_tmp is not None:
            Path(meta_tmp).unlink(missing_ok=True)
        raise
    log.info("sorting data: %d examples of L=%d generated in %.1f s -> %s (%.1f MB)", total_rows, length,
             time.perf_counter() - started, data_path, meta["data_bytes"] / 1e6)
    _VALIDATED.add(_stamp(data_path, meta_path))
    return data_path


_VALIDATED: set[tuple] = set()  # entries this process checked (or wrote) and that have not changed since


def _stamp(data_path: Path, meta_path: Path) -> tuple:
    data, meta = data_path.stat(), meta_path.stat()
    return str(data_path), data.st_size, data.st_mtime_ns, meta.st_size, meta.st_mtime_ns


def read_cache_metadata(data_path: Path, meta_path: Path, generator: dict[str, int] | None = None) -> dict[str, Any]:
    """The entry's metadata after checking it (checksum, parameters, data size); CorruptCacheError otherwise."""
    if not meta_path.exists():
        raise CorruptCacheError(f"{meta_path} is missing (an interrupted write)")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CorruptCacheError(f"{meta_path} is not valid JSON ({error})") from error
    if not isinstance(meta, dict) or meta.get("checksum") != _metadata_checksum(meta):
        raise CorruptCacheError(f"{meta_path} fails its checksum")
    try:
        expected = cache_metadata(generator if generator is not None else meta["generator"])
    except (KeyError, TypeError) as error:
        raise CorruptCacheError(f"{meta_path} lacks the generator's parameters ({error})") from error
    if meta != expected:
        raise CorruptCacheError(f"{meta_path} describes other data than its name says")
    size = data_path.stat().st_size if data_path.exists() else None
    if size != meta["data_bytes"]:
        raise CorruptCacheError(f"{data_path} holds {size} bytes, not the {meta['data_bytes']} its metadata gives")
    return meta


def validate_cache_tokens(data_path: Path, meta: dict[str, Any], chunk_bytes: int = 1 << 26) -> None:
    """Every token in range, one separator per row in its column, every target a permutation of 0..19, and the
    first and last rows' targets recomputed from their sequences."""
    width, length = meta["row_width"], meta["generator"]["length"]
    tokens = np.memmap(data_path, dtype=np.uint8, mode="r").reshape(-1, width)
    symbols = np.arange(NUM_SYMBOLS, dtype=np.uint8)
    step = max(1, chunk_bytes // width)
    for start in range(0, len(tokens), step):
        chunk = np.asarray(tokens[start:start + step])  # (rows, L + 21)
        bad = (chunk.max(axis=1) > SEPARATOR) | (chunk[:, length] != SEPARATOR) | \
              ((chunk == SEPARATOR).sum(axis=1) != 1) | \
              (np.sort(chunk[:, length + 1:], axis=1) != symbols).any(axis=1)
        if bad.any():
            raise CorruptCacheError(f"{data_path} row {start + int(np.argmax(bad))} is not a valid example")
    for row in {0, len(tokens) - 1}:
        if not np.array_equal(sort_targets(tokens[row:row + 1, :length])[0], tokens[row, length + 1:]):
            raise CorruptCacheError(f"{data_path} row {row}'s target does not match its sequence")


def open_cache(data_path: Path, meta_path: Path, generator: dict[str, int] | None = None) -> dict[str, Any]:
    """Check a cache entry (once per process while it is unchanged); returns its metadata."""
    meta = read_cache_metadata(data_path, meta_path, generator)
    stamp = _stamp(data_path, meta_path)
    if stamp not in _VALIDATED:
        validate_cache_tokens(data_path, meta)
        _VALIDATED.add(stamp)
    return meta


def load_or_generate(length: int, num_train: int, num_dev: int, num_test: int, seed: int,
                     cache_dir: str | Path | None = None, progress: bool | None = None) -> Path:
    """Path of the cache entry (`.u8` data file) for these parameters after checking it; a missing entry is
    generated, a corrupt one reported (one line, by path) and rebuilt."""
    _check_sizes(length, num_train, num_dev, num_test)
    cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    generator = generator_record(length, num_train, num_dev, num_test, seed)
    data_path, meta_path = cache_paths(cache_dir, generator)
    if data_path.exists() or meta_path.exists():
        try:
            open_cache(data_path, meta_path, generator)
            return data_path
        except CorruptCacheError as error:
            log.warning("sorting cache is corrupt: %s; rebuilding it", error)
    return write_cache(cache_dir, generator, progress)


# --------------------------------------------------------------------------------------------------------------
# JSON import / export
def _json_error(path: Path, problem: str) -> ValueError:
    return ValueError(f"task.data.data_file={path}: {problem}; give a sorting split file (JSON of experiments.md "
                      "§a.4: prompt_length, vocab_size, train, dev, test of {prompt_ids, target_ids}) or set "
                      "task.data.data_file=null to generate data.")


def read_sorting_file(path: str | Path) -> dict[str, Any]:
    """Read and check a JSON split file (ours or one in the reference's format)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"sorting data file {str(path)!r} does not exist; fix task.data.data_file or set it to "
                                "null to generate data.")
    try:
        with open(path) as handle:
            data = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise _json_error(path, f"not valid JSON ({error})") from error
    if not isinstance(data, dict):
        raise _json_error(path, f"the top level is a {type(data).__name__}, not an object")
    missing = [key for key in ("prompt_length", "vocab_size", "train", "dev", "test") if key not in data]
    if missing:
        raise _json_error(path, f"lacks keys {missing}")
    if not isinstance(data["prompt_length"], int) or data["prompt_length"] < 2:
        raise _json_error(path, f"prompt_length={data['prompt_length']!r} is not an integer >= 2")
    if data["vocab_size"] != VOCAB_SIZE:
        raise _json_error(path, f"vocab_size={data['vocab_size']!r}, but the sorting task has {VOCAB_SIZE} symbols")
    return data


def examples_to_rows(examples: Any, prompt_length: int, split: str, path: Path) -> np.ndarray:
    """(N, prompt_length + 20) uint8 rows of one JSON split, after checking every example's shape and tokens."""
    if not isinstance(examples, list) or not examples:
        raise _json_error(path, f"split {split!r} is not a non-empty list of examples")
    rows = []
    for index, example in enumerate(examples):
        if not isinstance(example, dict) or "prompt_ids" not in example or "target_ids" not in example:
            raise _json_error(path, f"{split} example {index} is not an object with prompt_ids and target_ids")
        prompt, target = example["prompt_ids"], example["target_ids"]
        if not isinstance(prompt, list) or not isinstance(target, list) or len(prompt) != prompt_length \
                or len(target) != NUM_TARGETS:
            raise _json_error(path, f"{split} example {index} has a prompt of {len(prompt)} tokens and a target of "
                                    f"{len(target)} (expected {prompt_length} and {NUM_TARGETS})")
        rows.append(prompt + target)
    try:
        array = np.array(rows, dtype=np.int64)  # (N, prompt_length + 20)
    except (TypeError, ValueError, OverflowError) as error:
        raise _json_error(path, f"split {split!r} holds tokens that are not integers ({error})") from error
    body = np.delete(array, prompt_length - 1, axis=1)  # every token but the separator
    bad = (array[:, prompt_length - 1] != SEPARATOR) | (body < 0).any(axis=1) | (body >= NUM_SYMBOLS).any(axis=1)
    if bad.any():
        index = int(np.argmax(bad))
        raise _json_error(path, f"{split} example {index} does not hold symbols 0..{NUM_SYMBOLS - 1} with the "
                                f"separator {SEPARATOR} as its last prompt token")
    return array.astype(np.uint8)


def export_sorting_json(out: str | Path, length: int, num_train: int, num_dev: int, num_test: int, seed: int,
                        cache_dir: str | Path | None = None) -> Path:
    """Write the splits these parameters generate as JSON (§a.4 layout), from the cache (made if missing)."""
    data_path = load_or_generate(length, num_train, num_dev, num_test, seed, cache_dir)
    meta_path = data_path.with_name(data_path.name[:-len(".u8")] + ".meta.json")
    meta = open_cache(data_path, meta_path)
    tokens = np.memmap(data_path, dtype=np.uint8, mode="r").reshape(-1, meta["row_width"])
    data: dict[str, Any] = {"prompt_length": meta["prompt_length"], "vocab_size": VOCAB_SIZE}
    start = 0
    for split in SPLITS:
        count = meta["rows"][split]
        data[split] = rows_to_examples(tokens[start:start + count], meta["prompt_length"])
        start += count
    data["generator"] = meta["generator"]
    write_json_atomic(data, out)
    return Path(out)


# --------------------------------------------------------------------------------------------------------------
# dataset and data module
class SortingDataset(Dataset):
    """Examples of one split as fixed-length (L + 20,) tensors, from uint8 rows (sequence, separator, target).

    The rows are an array in memory (JSON import) or a slice of a cache file, memory-mapped lazily in each process
    (a DataLoader worker maps the file itself instead of receiving a copy of it).
    """

    def __init__(self, rows: np.ndarray | None, prompt_length: int, *, path: str | Path | None = None,
                 row_start: int = 0, num_rows: int = 0):
        if rows is None and path is None:
            raise ValueError("SortingDataset needs rows or a cache path")
        self._rows = None if rows is None else np.asarray(rows, dtype=np.uint8)
        self.path = None if path is None else str(path)
        self.row_start = int(row_start)
        self.num_rows = len(self._rows) if self._rows is not None else int(num_rows)
        self.prompt_length = prompt_length
        if self.num_rows < 1:
            raise ValueError("a sorting split is empty; generate at least one example per split.")

    @classmethod
    def from_examples(cls, examples: list[dict[str, list[int]]], prompt_length: int,
                      path: str | Path = "<examples>", split: str = "train") -> SortingDataset:
        return cls(examples_to_rows(examples, prompt_length, split, Path(path)), prompt_length)

    @property
    def rows(self) -> np.ndarray:
        """(N, L + 21) uint8."""
        if self._rows is None:
            width = self.prompt_length + NUM_TARGETS
            mapped = np.memmap(self.path, dtype=np.uint8, mode="r").reshape(-1, width)
            self._rows = mapped[self.row_start:self.row_start + self.num_rows]
        return self._rows

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        if self.path is not None:
            state["_rows"] = None  # workers map the file themselves
        return state

    def __len__(self) -> int:
        return self.num_rows

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        row = torch.from_numpy(self.rows[index].astype(np.int64))  # (L + 21,)
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


class EpochShuffle(torch.utils.data.Sampler):
    """The training order: a permutation drawn from (seed, epoch) alone, so a run resumed in the middle of an
    epoch can replay it. Lightning calls `set_epoch` at each epoch's start; `skip` leaves out the epoch's first
    indices (the batches a resumed run already trained on) in every pass over this epoch, until the next one
    starts (Lightning may start and drop an iterator before the one it trains on)."""

    def __init__(self, num_examples: int, seed: int):
        self.num_examples, self.seed, self.epoch, self.skip = num_examples, seed, 0, 0

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.skip = 0
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.num_examples, generator=generator)[self.skip:].tolist())

    def __len__(self) -> int:
        return self.num_examples


class ResumableTrainLoader(DataLoader):
    """The training loader, resumable: its state is the epoch and the batches served in it. The DataModule saves
    it in every checkpoint (Lightning's datamodule state: the loop's own loader state is not restored when the
    optimizer's schedule built the loader first); a run resumed mid-epoch continues with the batches it had not
    seen yet."""

    def __init__(self, dataset: Dataset, batch_size: int, seed: int, **kwargs: Any):
        self.shuffle_order = EpochShuffle(len(dataset), seed)
        # a generator of its own: the iterator's worker seed is otherwise drawn from the global RNG at each
        # epoch's start, which a resumed run would draw at another point of the dropout stream
        super().__init__(dataset, batch_size=batch_size, sampler=self.shuffle_order, drop_last=False,
                         generator=torch.Generator().manual_seed(seed), **kwargs)
        self._served = 0

    def __iter__(self):
        self._served = self.shuffle_order.skip // self.batch_size
        for batch in super().__iter__():
            self._served += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.shuffle_order.epoch, "batches": self._served}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.shuffle_order.epoch = int(state["epoch"])
        self.shuffle_order.skip = int(state["batches"]) * self.batch_size
        self._served = int(state["batches"])


class SortingDataModule(L.LightningDataModule):
    """Generated (or given) sorting data. `vocab_size` is 21 once `setup()` ran.

    length, num_train/num_dev/num_test, seed: generator parameters (the cache key).
    data_file: a ready JSON split file to use instead of generating one.
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
        self._train_loader: ResumableTrainLoader | None = None
        self._train_state: dict[str, int] | None = None  # restored before the loader exists

    def _path(self) -> Path:
        if self.data_file:
            path = Path(self.data_file).expanduser()
            if not path.is_file():
                raise FileNotFoundError(f"sorting data file {str(path)!r} does not exist; fix task.data.data_file or "
                                        "set it to null to generate data.")
            return path
        return load_or_generate(self.length, self.num_train, self.num_dev, self.num_test, self.seed, self.cache_dir)

    def prepare_data(self) -> None:
        # Runs on one process per node: generate (or check) the cache once, before every rank reads it in setup().
        self._path()

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        path = self._path()
        self.source = str(path)
        if self.data_file:
            data = read_sorting_file(path)
            prompt_length = int(data["prompt_length"])
            for split in SPLITS:
                rows = examples_to_rows(data[split], prompt_length, split, path)
                self.splits[split] = SortingDataset(rows, prompt_length)
        else:
            meta = open_cache(path, path.with_name(path.name[:-len(".u8")] + ".meta.json"))
            prompt_length = meta["prompt_length"]
            start = 0
            for split in SPLITS:
                count = meta["rows"][split]
                self.splits[split] = SortingDataset(None, prompt_length, path=path, row_start=start, num_rows=count)
                start += count
        self.length = prompt_length - 1  # a given file decides L

    @property
    def sequence_length(self) -> int:
        """Tokens per example fed to the model: L + 20."""
        return self.length + NUM_TARGETS

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        if trainer is not None and trainer.world_size > 1:  # Lightning's DistributedSampler (seeded per epoch)
            return DataLoader(self.splits["train"], batch_size=self.batch_size, shuffle=True,
                              num_workers=self.num_workers, drop_last=False, pin_memory=pin_memory_for(trainer))
        self._train_loader = ResumableTrainLoader(self.splits["train"], self.batch_size, self.seed,
                                                  num_workers=self.num_workers, pin_memory=pin_memory_for(trainer))
        if self._train_state is not None:
            self._train_loader.load_state_dict(self._train_state)
            self._train_state = None
        return self._train_loader

    def state_dict(self) -> dict[str, Any]:
        return {"train_loader": self._train_loader.state_dict()} if self._train_loader is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "train_loader" not in state:
            return
        if self._train_loader is not None:
            self._train_loader.load_state_dict(state["train_loader"])
        else:
            self._train_state = dict(state["train_loader"])

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


def main(argv: list[str] | None = None) -> None:
    """Export generated splits as JSON: python -m experiment.data.sorting --length 1000 --out sort.json"""
    parser = argparse.ArgumentParser(description="Generate sorting data (experiments.md §a.4) and write it as JSON.")
    parser.add_argument("--length", type=int, default=1000)
    parser.add_argument("--num-train", type=int, default=80000)
    parser.add_argument("--num-dev", type=int, default=800)
    parser.add_argument("--num-test", type=int, default=800)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--cache-dir", default=None, help="default: $MEMORIA_CACHE_DIR/sorting or ~/.cache/memoria")
    parser.add_argument("--out", required=True, help="the JSON file to write")
    args = parser.parse_args(argv)
    try:
        path = export_sorting_json(args.out, args.length, args.num_train, args.num_dev, args.num_test, args.seed,
                                   args.cache_dir)
    except ValueError as error:
        parser.error(str(error))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
