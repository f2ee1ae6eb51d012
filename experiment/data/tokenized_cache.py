"""Token caches: every split is tokenised once and kept on disk as a memory-mapped token array.

One cache entry is one directory:

    <cache_dir>/<dataset>-<split>-<hash of the key>/
        tokens.bin     all documents' tokens back to back (raw little-endian array, dtype in meta.json)
        offsets.npy    (num_docs + 1,) int64: document d is tokens[offsets[d]:offsets[d + 1]]
        meta.json      the key, dtype, counts and whatever the builder records (source, revision, document order)

The key holds everything the tokens depend on (dataset, source and revision, protocol, tokenizer fingerprint), so a
changed setting never reads a stale entry. Entries are written into a temporary directory next to the final one and
renamed into place when complete: a crash or Ctrl-C leaves no half-written entry that a later run could read.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_CACHE_ROOT = "~/.cache/memoria"  # see cache_root(); the sorting data lives there too
CACHE_DIR_ENV = "MEMORIA_CACHE_DIR"
FORMAT_VERSION = 1


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

    def close(self) -> np.ndarray:
        self._file.close()
        offsets = np.zeros(len(self._lengths) + 1, dtype=np.int64)
        np.cumsum(self._lengths, out=offsets[1:])
        return offsets


def cache_entry_name(key: dict[str, Any]) -> str:
    """A readable, unique directory name for a cache key."""
    blob = json.dumps({"format": FORMAT_VERSION, **key}, sort_keys=True, default=str)
    digest = hashlib.sha256(blob.encode()).hexdigest()[:16]
    return f"{key.get('dataset', 'data')}-{key.get('split', 'split')}-{digest}"


def open_entry(path: Path) -> TokenizedSplit:
    meta = json.loads((path / "meta.json").read_text())
    dtype = np.dtype(meta["dtype"]).newbyteorder("<")
    offsets = np.load(path / "offsets.npy")
    num_tokens = int(offsets[-1])
    if num_tokens == 0:
        tokens = np.zeros(0, dtype=dtype)  # np.memmap refuses empty files
    else:
        tokens = np.memmap(path / "tokens.bin", dtype=dtype, mode="r", shape=(num_tokens,))
    return TokenizedSplit(tokens=tokens, offsets=offsets, meta=meta, path=path)


def find_entry(cache_dir: str | os.PathLike | None, key: dict[str, Any]) -> TokenizedSplit | None:
    """The complete cache entry for `key`, or None. Never returns a half-written entry."""
    path = resolve_cache_dir(cache_dir) / cache_entry_name(key)
    if (path / "meta.json").is_file():
        return open_entry(path)
    return None


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
    found = find_entry(cache_dir, key)
    if found is not None:
        return found
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
        np.save(tmp / "offsets.npy", offsets)
        meta = {
            "format": FORMAT_VERSION,
            "key": key,
            "dtype": np.dtype(dtype).str,
            "num_docs": len(offsets) - 1,
            "num_tokens": int(offsets[-1]),
            **(extra or {}),
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, default=str))
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "meta.json").is_file():  # not a lost race with another process: a real error
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return open_entry(final)
