"""PG-19 for language modelling (experiments.md §a.2).

Sources:
- `path=`: the original layout, a directory with `train/`, `validation/`, `test/` folders of `<book id>.txt` books;
- otherwise a Parquet mirror on the Hugging Face Hub (default `emozilla/pg19`: columns short_book_title,
  publication_date, url, text), at a configured revision.

One book is one document. Training uses the first `train_percent` (7) percent of the train books, so the book order
matters. `book_order`:
- `id` (default): ascending book-id order compared as strings (`10006` < `1001`): the file-name order of the
  original bucket listing, which the original loader followed. Hub rows get their id from the Gutenberg url.
- `source`: the order the source gives (sorted file names locally, row order of the mirror).
The chosen order and the first and last book ids are recorded in the cache metadata.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from .errors import DataUnavailableError
from .lm import SPLITS, TextLMDataModule, load_hub_split, path_fingerprint, resolve_hub_commit

FOLDERS = {"train": "train", "valid": "validation", "test": "test"}
HUB_SPLITS = {"train": "train", "valid": "validation", "test": "test"}
BOOK_ORDERS = ("id", "source")
_URL_ID = re.compile(r"(\d+)/?$")


def percent_slice_count(num_items: int, percent: float) -> int:
    """How many items `split[:percent%]` takes (the `datasets` slicing rule: round to the closest)."""
    return round(percent * num_items / 100.0)


def book_id_from_url(url: str) -> str:
    match = _URL_ID.search(url.strip())
    if match is None:
        raise ValueError(f"cannot read a Gutenberg book id from the url {url!r}")
    return match.group(1)


class PG19DataModule(TextLMDataModule):
    """PG-19, GPT-2 BPE, in lanes.

    Args (besides LMDataModule's and `tokenizer`):
        path: directory with train/, validation/, test/ folders of .txt books; None = the Hub mirror.
        hub_id, revision: the Hub Parquet mirror.
        train_percent: the leading share of train books used (the paper: 7).
        book_order: `id` or `source` (see the module docstring).
    """

    dataset_name = "pg19"

    def __init__(
        self,
        path: str | None = None,
        hub_id: str = "emozilla/pg19",
        revision: str | None = "main",
        train_percent: float = 7.0,
        book_order: str = "id",
        **kwargs,
    ):
        super().__init__(**kwargs)
        if book_order not in BOOK_ORDERS:
            raise ValueError(f"task.data.book_order must be one of {BOOK_ORDERS}, got {book_order!r}")
        if not 0 < float(train_percent) <= 100:
            raise ValueError(f"task.data.train_percent must lie in (0, 100], got {train_percent}")
        self.path = Path(path).expanduser() if path else None
        self.hub_id, self.revision = hub_id, revision
        self.train_percent = float(train_percent)
        self.book_order = book_order

    def _percent(self, split: str) -> float:
        return self.train_percent if split == "train" else 100.0

    def _book_files(self, split: str) -> list[Path]:
        assert self.path is not None
        folder = self.path / FOLDERS[split]
        files = sorted(folder.glob("*.txt")) if folder.is_dir() else []
        if not files:
            raise DataUnavailableError(
                f"pg19: no books (*.txt) in {folder}. task.data.path must be a directory with train/, validation/ "
                f"and test/ folders of <book id>.txt files (the original PG-19 layout); or set task.data.path=null "
                f"to download the Parquet mirror {self.hub_id} from the Hugging Face Hub."
            )
        # Sorted by file name = by book id compared as strings; `source` keeps the same (directory) order.
        return files

    def _selected(self, ids: list[str]) -> tuple[list[int], int]:
        """Indices (into the source order) of the books used, in the order used; and the source's book count."""
        order = list(range(len(ids)))
        if self.book_order == "id":
            order.sort(key=lambda i: ids[i])
        return order, len(ids)

    def check_source(self) -> None:
        """A local copy (path=) must hold every split: checked before the tokenizer is loaded (no network call)."""
        if self.path is not None:
            for split in SPLITS:
                self._book_files(split)

    def _source_key(self, split: str) -> dict[str, Any]:
        key: dict[str, Any] = {"percent": self._percent(split), "book_order": self.book_order}
        if self.path is not None:
            return {"source": "local", "files": path_fingerprint(self._book_files(split)), **key}
        return {"source": "hub", "hub_id": self.hub_id, "revision": self.revision, **key}

    def _documents(self, split: str) -> tuple[Iterable[str], int | None, dict[str, Any]]:
        if self.path is not None:
            files = self._book_files(split)
            ids = [file.stem for file in files]
            order, total = self._selected(ids)
            chosen = order[: percent_slice_count(total, self._percent(split))]

            def read() -> Iterator[str]:
                for i in chosen:
                    yield files[i].read_text(encoding="utf-8")

            source = {"source": str((self.path / FOLDERS[split]).resolve())}
            documents: Iterable[str] = read()
        else:
            rows = load_hub_split("pg19", self.hub_id, None, self.revision, HUB_SPLITS[split])
            ids = [book_id_from_url(url) for url in rows["url"]]
            order, total = self._selected(ids)
            chosen = order[: percent_slice_count(total, self._percent(split))]

            def read_rows() -> Iterator[str]:
                for i in chosen:
                    yield rows[i]["text"]

            source = {"source": f"hf://datasets/{self.hub_id}", "revision": self.revision,
                      "commit": resolve_hub_commit(self.hub_id, self.revision)}
            documents = read_rows()
        meta = {
            **source,
            "document_order": f"book ids ({self.book_order} order)",
            "books_in_source": total,
            "books_used": len(chosen),
            "first_book_id": ids[chosen[0]] if chosen else None,
            "last_book_id": ids[chosen[-1]] if chosen else None,
            "book_ids": [ids[i] for i in chosen],
        }
        return documents, len(chosen), meta
