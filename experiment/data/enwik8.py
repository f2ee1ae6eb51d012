"""enwik8 for character-level language modelling (experiments.md §a.3).

Sources:
- `path=`: the raw 10^8-byte file `enwik8`, its `enwik8.zip`, or a directory holding either;
- otherwise `enwik8.zip` downloaded once from `url` through `datasets`' download manager (cached there).

Splits: the last `test_bytes` (5M) bytes are test, the `valid_bytes` (5M) before them dev, the rest (90M) train.
Each split is one document.

Vocabulary: the byte values that occur in the file, ascending.
- protocol=reference (default): the reference wrote bytes as decimal strings split on whitespace, so newline (10) is
  dropped from the stream and from the vocabulary: 204 symbols on the real file.
- protocol=standard: newline kept: 205 symbols.
"""

from __future__ import annotations

import hashlib
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DataUnavailableError
from .lm import LMDataModule, path_fingerprint
from .tokenized_cache import TokenWriter

PROTOCOLS = ("reference", "standard")
NEWLINE = 10
ENWIK8_BYTES = 100_000_000
ENWIK8_URL = "http://mattmahoney.net/dc/enwik8.zip"


def byte_vocabulary(data: np.ndarray, protocol: str) -> np.ndarray:
    """(V,) uint8: the byte values occurring in `data`, ascending; newline dropped under protocol=reference."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"task.data.protocol must be one of {PROTOCOLS}, got {protocol!r}")
    present = np.flatnonzero(np.bincount(data, minlength=256))
    if protocol == "reference":
        present = present[present != NEWLINE]
    return present.astype(np.uint8)


def split_bytes(data: np.ndarray, valid_bytes: int, test_bytes: int) -> dict[str, np.ndarray]:
    """train = all but the last valid_bytes + test_bytes, valid = the next valid_bytes, test = the last test_bytes."""
    if valid_bytes < 1 or test_bytes < 1 or valid_bytes + test_bytes >= len(data):
        raise ValueError(
            f"cannot carve {valid_bytes} dev and {test_bytes} test bytes out of {len(data)} bytes; "
            "set task.data.valid_bytes / task.data.test_bytes to smaller values."
        )
    train_end = len(data) - valid_bytes - test_bytes
    return {"train": data[:train_end], "valid": data[train_end : train_end + valid_bytes], "test": data[-test_bytes:]}


def encode_bytes(data: np.ndarray, vocabulary: np.ndarray, protocol: str) -> np.ndarray:
    """Map bytes to symbol ids (uint8); newlines are dropped under protocol=reference; an unseen byte is an error."""
    if protocol == "reference":
        data = data[data != NEWLINE]
    lookup = np.full(256, -1, dtype=np.int16)
    lookup[vocabulary] = np.arange(len(vocabulary), dtype=np.int16)
    ids = lookup[data]
    if ids.size and ids.min() < 0:
        unseen = sorted(set(data[ids < 0].tolist()))
        raise ValueError(f"enwik8: bytes {unseen[:10]} are not in the {len(vocabulary)}-symbol vocabulary")
    return ids.astype(np.uint8)


TEXT_CHECK_BYTES = 1 << 20  # the leading bytes of a raw file that must read as UTF-8 text
MAX_NON_TEXT = 0.01  # the share of them that may fail to decode (real dumps hold a few odd bytes)


def read_enwik8(path: Path) -> bytes:
    """The raw bytes from `enwik8`, `enwik8.zip`, or a directory holding one of them. A damaged zip, or a file that
    is not text (enwik8 is the start of an XML dump of English Wikipedia, UTF-8), is a DataUnavailableError naming
    the file."""
    if path.is_dir():
        for name in ("enwik8", "enwik8.zip"):
            if (path / name).is_file():
                return read_enwik8(path / name)
        raise FileNotFoundError(path / "enwik8")
    with open(path, "rb") as handle:
        looks_zipped = handle.read(4) == b"PK\x03\x04"
    if looks_zipped or path.suffix == ".zip":
        try:
            with zipfile.ZipFile(path) as archive:
                names = [n for n in archive.namelist() if not n.endswith("/")]
                if len(names) != 1:
                    raise ValueError(f"{path} should hold exactly one file (enwik8), found {names}")
                data = archive.read(names[0])  # checks the CRC
        except (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, EOFError, OSError) as error:
            raise DataUnavailableError(
                f"enwik8: task.data.path={path} is a damaged zip ({type(error).__name__}: {error}); download "
                f"enwik8.zip again ({ENWIK8_URL}) or point task.data.path at the unpacked enwik8 file."
            ) from None
    else:
        data = path.read_bytes()
    head = data[:TEXT_CHECK_BYTES]
    bad = head.decode("utf-8", errors="replace").count("\ufffd")
    if head and bad > MAX_NON_TEXT * len(head):
        raise DataUnavailableError(
            f"enwik8: {path} is not enwik8: {bad} of its first {len(head)} bytes are not UTF-8 text (random or "
            f"damaged data); point task.data.path at enwik8 or enwik8.zip ({ENWIK8_URL})."
        )
    return data


class Enwik8DataModule(LMDataModule):
    """enwik8 bytes, in lanes. Tokens are symbol ids (no tokenizer).

    Args (besides LMDataModule's):
        path: the raw file, its zip, or a directory holding one; None = download `url`.
        url: where enwik8.zip is downloaded from when no path is given.
        protocol: `reference` (204 symbols, newline dropped) or `standard` (205, newline kept).
        valid_bytes, test_bytes: sizes of the dev and test splits (the paper: 5M each).
    """

    dataset_name = "enwik8"

    def __init__(
        self,
        path: str | None = None,
        url: str = ENWIK8_URL,
        protocol: str = "reference",
        valid_bytes: int = 5_000_000,
        test_bytes: int = 5_000_000,
        segment_length: int = 512,
        **kwargs,
    ):
        super().__init__(segment_length=segment_length, **kwargs)
        if protocol not in PROTOCOLS:
            raise ValueError(f"task.data.protocol must be one of {PROTOCOLS}, got {protocol!r}")
        self.path = Path(path).expanduser() if path else None
        self.url = url
        self.protocol = protocol
        self.valid_bytes, self.test_bytes = int(valid_bytes), int(test_bytes)
        self._source: Path | None = None
        self._vocabulary: np.ndarray | None = None

    def _source_file(self) -> Path:
        """The local file to read (downloading the zip once if no path is given)."""
        if self._source is not None:
            return self._source
        if self.path is not None:
            candidates = [self.path] if not self.path.is_dir() else [self.path / "enwik8", self.path / "enwik8.zip"]
            found = [c for c in candidates if c.is_file()]
            if not found:
                raise DataUnavailableError(
                    f"enwik8: nothing to read at {self.path}. task.data.path must be the raw enwik8 file, enwik8.zip, "
                    f"or a directory holding one; or set task.data.path=null to download {self.url}."
                )
            self._source = found[0].resolve()
            return self._source
        import datasets

        try:
            self._source = Path(datasets.DownloadManager(dataset_name="enwik8").download(self.url))
        except Exception as error:  # noqa: BLE001  (offline or the server is gone: any failure means no data)
            raise DataUnavailableError(
                f"enwik8: cannot download {self.url} ({type(error).__name__}). Either connect to the internet, or "
                f"point task.data.path at a local enwik8 or enwik8.zip; tokenised splits are cached under "
                f"task.data.cache_dir (or $MEMORIA_CACHE_DIR) and need no source once built."
            ) from None
        return self._source

    def _source_key(self) -> dict[str, Any]:
        if self.path is not None:
            return {"source": "local", "files": path_fingerprint([self._source_file()])}
        return {"source": "url", "url": self.url}

    def _cache_key(self, split: str) -> dict[str, Any]:
        return {**self._source_key(), "protocol": self.protocol, "valid_bytes": self.valid_bytes,
                "test_bytes": self.test_bytes}

    def _token_dtype(self) -> np.dtype:
        return np.dtype(np.uint8)

    @property
    def vocabulary(self) -> np.ndarray:
        """(V,) uint8 byte values, ascending: symbol i is byte vocabulary[i]."""
        if self._vocabulary is None:
            meta = self.load_split("train").meta
            self._vocabulary = np.asarray(meta["vocabulary"], dtype=np.uint8)
        return self._vocabulary

    @property
    def vocab_size(self) -> int:
        return len(self.vocabulary)

    def _build_split(self, split: str, writer: TokenWriter) -> dict[str, Any]:
        raw = read_enwik8(self._source_file())
        data = np.frombuffer(raw, dtype=np.uint8)
        vocabulary = byte_vocabulary(data, self.protocol)
        part = split_bytes(data, self.valid_bytes, self.test_bytes)[split]
        writer.add_document(encode_bytes(part, vocabulary, self.protocol))
        return {
            "source": str(self.path or self.url),
            "sha256": hashlib.sha256(raw).hexdigest(),
            "file_bytes": len(data),
            "is_standard_enwik8": len(data) == ENWIK8_BYTES,
            "protocol": self.protocol,
            "vocabulary": vocabulary.tolist(),
            "split_bytes": len(part),
            "document_order": "one document per split",
        }
