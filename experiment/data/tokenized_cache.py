"""Token caches: every split is tokenised once and kept on disk as a memory-mapped token array.

One cache entry is one directory:

    <cache_dir>/<dataset>-<split>-<hash of the key>/
        tokens.bin     all documents' tokens back to back (raw little-endian array, dtype in meta.json)
        offsets.npy    (num_docs + 1,) int64: document d is tokens[offsets[d]:offsets[d + 1]]
        meta.json      the key, dtype, counts and whatever the builder records (source, revision, document order)

The key holds everything the tokens depend on (dataset, source and revision, protocol, tokenizer fingerprint), so a
changed setting never reads a stale entry. Entries are written into a temporary directory next to the final one,
fsync'ed, and renamed into place when complete: a crash or Ctrl-C leaves no half-written entry that a later run could
read.

Integrity: meta.json records the size of tokens.bin, the SHA-256 of offsets.npy, the sum and the largest id of the
tokens, and a SHA-256 of its own content. Every open checks all of them (one pass over the tokens: the sum and the
maximum, about as fast as reading the file), so a truncated or damaged file is found before training, not as an
IndexError steps into it. A bad entry is reported by its path, removed and built again from the source; where the
source cannot be read (offline), the error names the entry and the fix.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DataUnavailableError

DEFAULT_CACHE_ROOT = "~/.cache/memoria"  # see cache_root(); the sorting data lives there too
CACHE_DIR_ENV = "MEMORIA_CACHE_DIR"
FORMAT_VERSION = 1  # part of every entry's name: a change forces every cache to be rebuilt
SCAN_CHUNK = 1 << 24  # tokens per step of the integrity pass

log = logging.getLogger(__name__)


class CorruptEntryError(ValueError):
    """A cache entry whose files do not match its metadata; the message names the entry and what is wrong."""


def cache_root() -> Path:
    """$MEMORIA_CACHE_DIR, else ~/.cache/memoria: the root of every generated or tokenised data cache."""
    return Path(os.environ.get(CACHE_DIR_ENV) or DEFAULT_CACHE_ROOT).expanduser()


def resolve_cache_dir(cache_dir: str | os.PathLike | None) -> Path:
    """`cache_dir` if given, else $MEMORIA_CACHE_DIR/tokens, else ~/.cache/memoria/tokens."""
    if cache_dir:
        return Path(cache_dir).expanduser().resolve()
    return (cache_root() / "tokens").resolve()


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every token id."""
    if vocab_size <= 2**8:
        return np.dtype(np.uint8)
    if vocab_size <= 2**16:
        return np.dtype(np.uint16)
    return np.dtype(np.uint32)


@dataclass(frozen=True)
class TokenizedSplit:
    """One split, memory-mapped: read slices of `tokens`, never load it whole."""

    tokens: np.ndarray  # (N,) memmap
    offsets: np.ndarray  # (num_docs + 1,) int64
    meta: dict[str, Any]
    path: Path

    @property
    def num_docs(self) -> int:
        return len(self.offsets) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])


class TokenWriter:
    """Appends documents to a cache entry being built (streams to disk; RAM holds one document at a time)."""

    def __init__(self, directory: Path, dtype: np.dtype):
        self.dtype = np.dtype(dtype)
        self._file = open(directory / "tokens.bin", "wb")  # noqa: SIM115  (closed by close())
        self._lengths: list[int] = []
        self._max_id = np.iinfo(self.dtype).max
        self.token_sum = 0  # of every id written: the integrity record (meta.json)
        self.token_max = -1

    def add_document(self, token_ids: Iterable[int] | np.ndarray) -> None:
        ids = np.asarray(token_ids)
        if ids.ndim != 1:
            raise ValueError(f"a document must be a 1-D sequence of token ids, got shape {ids.shape}")
        if ids.size and (ids.min() < 0 or ids.max() > self._max_id):
            raise ValueError(
                f"token ids must lie in [0, {self._max_id}] for dtype {self.dtype}; got {ids.min()}..{ids.max()}"
            )
        ids.astype(self.dtype.newbyteorder("<"), copy=False).tofile(self._file)
        self._lengths.append(int(ids.size))
        if ids.size:
            self.token_sum += int(ids.sum(dtype=np.uint64))
            self.token_max = max(self.token_max, int(ids.max()))

    def close(self) -> np.ndarray:
        if not self._file.closed:
            self._file.flush()
            os.fsync(self._file.fileno())
        self._file.close()
        offsets = np.zeros(len(self._lengths) + 1, dtype=np.int64)
        np.cumsum(self._lengths, out=offsets[1:])
        return offsets


def cache_entry_name(key: dict[str, Any]) -> str:
    """A readable, unique directory name for a cache key."""
    blob = json.dumps({"format": FORMAT_VERSION, **key}, sort_keys=True, default=str)
    digest = hashlib.sha256(blob.encode()).hexdigest()[:16]
    return f"{key.get('dataset', 'data')}-{key.get('split', 'split')}-{digest}"


def _meta_checksum(meta: dict[str, Any]) -> str:
    body = {key: value for key, value in meta.items() if key != "meta_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def scan_tokens(tokens: np.ndarray) -> tuple[int, int]:
    """(sum, largest id) of a token array, read in chunks (a memmap is never loaded whole); (0, -1) when empty."""
    total, largest = 0, -1
    for start in range(0, len(tokens), SCAN_CHUNK):
        chunk = np.asarray(tokens[start:start + SCAN_CHUNK])
        total += int(chunk.sum(dtype=np.uint64))
        largest = max(largest, int(chunk.max()))
    return total, largest


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def fsync_dir(folder: Path) -> None:
    """Make a folder's entries (a rename into it) durable, where the file system lets a folder be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # a file system without directory handles: nothing to sync
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def open_entry(path: Path) -> TokenizedSplit:
    """Open a complete entry and check it against its metadata (sizes, checksums, the tokens' sum and largest id);
    CorruptEntryError names the entry and the first thing that does not match."""

    def corrupt(problem: str) -> CorruptEntryError:
        return CorruptEntryError(f"the token cache entry {path} is damaged: {problem}")

    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, ValueError) as error:  # unreadable, truncated or not JSON
        raise corrupt(f"meta.json cannot be read ({type(error).__name__})") from None
    if not isinstance(meta, dict) or "dtype" not in meta or "num_tokens" not in meta:
        raise corrupt("meta.json lacks the entry's dtype and counts")
    integrity = "meta_sha256" in meta
    if integrity and meta["meta_sha256"] != _meta_checksum(meta):
        raise corrupt("meta.json does not match its checksum")
    try:
        dtype = np.dtype(meta["dtype"]).newbyteorder("<")
        offsets = np.load(path / "offsets.npy", allow_pickle=False)
    except (OSError, ValueError, TypeError, EOFError) as error:
        raise corrupt(f"offsets.npy cannot be read ({type(error).__name__})") from None
    if integrity and _file_sha256(path / "offsets.npy") != meta["offsets_sha256"]:
        raise corrupt("offsets.npy does not match its checksum")
    if offsets.ndim != 1 or len(offsets) < 1 or offsets[0] != 0 or np.any(np.diff(offsets) < 0):
        raise corrupt("offsets.npy is not an increasing list of document starts")
    num_tokens = int(offsets[-1])
    if num_tokens != int(meta["num_tokens"]) or len(offsets) - 1 != int(meta.get("num_docs", len(offsets) - 1)):
        raise corrupt(f"offsets.npy counts {num_tokens} tokens in {len(offsets) - 1} documents, meta.json "
                      f"{meta['num_tokens']} in {meta.get('num_docs')}")
    size = (path / "tokens.bin").stat().st_size if (path / "tokens.bin").is_file() else -1
    if size != num_tokens * dtype.itemsize:
        raise corrupt(f"tokens.bin has {max(size, 0)} bytes, not the {num_tokens * dtype.itemsize} of {num_tokens} "
                      f"{dtype.name} tokens (truncated or replaced)")
    if num_tokens == 0:
        tokens = np.zeros(0, dtype=dtype)  # np.memmap refuses empty files
    else:
        tokens = np.memmap(path / "tokens.bin", dtype=dtype, mode="r", shape=(num_tokens,))
    total, largest = scan_tokens(tokens)
    if integrity and (total, largest) != (int(meta["token_sum"]), int(meta["token_max"])):
        raise corrupt(f"the tokens sum to {total} with largest id {largest}, not the recorded {meta['token_sum']} "
                      f"and {meta['token_max']} (the file was changed)")
    if not integrity:  # an entry written before the integrity record: record what it holds now
        meta.update(token_sum=total, token_max=largest, offsets_sha256=_file_sha256(path / "offsets.npy"),
                    tokens_bytes=size)
        meta["meta_sha256"] = _meta_checksum(meta)
        tmp = path / f".meta.json.{uuid.uuid4().hex[:8]}.tmp"
        try:
            _write_synced(tmp, json.dumps(meta, indent=2, default=str).encode())
            os.replace(tmp, path / "meta.json")
        except OSError:  # a read-only cache still works, unrecorded
            tmp.unlink(missing_ok=True)
    return TokenizedSplit(tokens=tokens, offsets=offsets, meta=meta, path=path)


def find_entry(cache_dir: str | os.PathLike | None, key: dict[str, Any]) -> TokenizedSplit | None:
    """The complete cache entry for `key`, or None. Never returns a half-written entry; CorruptEntryError for a
    damaged one."""
    path = resolve_cache_dir(cache_dir) / cache_entry_name(key)
    if (path / "meta.json").is_file():
        return open_entry(path)
    return None


def discard_entry(path: Path) -> None:
    """Remove an entry: renamed away first (atomic), so no reader ever sees it half-deleted."""
    trash = path.parent / f".corrupt-{path.name}-{uuid.uuid4().hex[:8]}"
    try:
        os.rename(path, trash)
    except FileNotFoundError:  # another process removed it first
        return
    shutil.rmtree(trash, ignore_errors=True)


def load_or_build(
    cache_dir: str | os.PathLike | None,
    key: dict[str, Any],
    dtype: np.dtype,
    build: Callable[[TokenWriter], dict[str, Any]],
) -> TokenizedSplit:
    """Open the entry for `key`, building it first with `build(writer)` if absent.

    `build` adds the documents in order and returns extra metadata to record (source, revision, document order...).
    Whatever `build` raises propagates and leaves no entry behind.
    """
    damaged: CorruptEntryError | None = None
    try:
        found = find_entry(cache_dir, key)
    except CorruptEntryError as error:
        damaged, found = error, None
        log.warning("%s; removing it and building it again", error)
        discard_entry(resolve_cache_dir(cache_dir) / cache_entry_name(key))
    if found is not None:
        return found
    try:
        return _build_entry(cache_dir, key, dtype, build)
    except DataUnavailableError as error:
        if damaged is not None:  # offline: say which entry was bad, and what brings its source back
            raise DataUnavailableError(f"{damaged}, and it cannot be built again: {error}") from None
        raise


def _build_entry(cache_dir: str | os.PathLike | None, key: dict[str, Any], dtype: np.dtype,
                 build: Callable[[TokenWriter], dict[str, Any]]) -> TokenizedSplit:
    root = resolve_cache_dir(cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / cache_entry_name(key)
    tmp = root / f".tmp-{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        writer = TokenWriter(tmp, dtype)
        try:
            extra = build(writer)
        finally:
            offsets = writer.close()
        with open(tmp / "offsets.npy", "wb") as handle:
            np.save(handle, offsets)
            handle.flush()
            os.fsync(handle.fileno())
        meta = {
            "format": FORMAT_VERSION,
            "key": key,
            "dtype": np.dtype(dtype).str,
            "num_docs": len(offsets) - 1,
            "num_tokens": int(offsets[-1]),
            **(extra or {}),
            "tokens_bytes": int(offsets[-1]) * np.dtype(dtype).itemsize,
            "token_sum": writer.token_sum,
            "token_max": writer.token_max,
            "offsets_sha256": _file_sha256(tmp / "offsets.npy"),
        }
        meta["meta_sha256"] = _meta_checksum(meta)
        _write_synced(tmp / "meta.json", json.dumps(meta, indent=2, default=str).encode())
        fsync_dir(tmp)
        try:
            os.rename(tmp, final)
            fsync_dir(root)
        except OSError:
            if not (final / "meta.json").is_file():  # not a lost race with another process: a real error
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return open_entry(final)
