"""WikiText-103 (raw) for language modelling (experiments.md §a.1).

Sources:
- `path=`: a directory with the original raw files `wiki.train.raw`, `wiki.valid.raw`, `wiki.test.raw`;
- otherwise the Parquet copy on the Hugging Face Hub (`Salesforce/wikitext`, config `wikitext-103-raw-v1`) at a
  configured revision, one row per line.

Documents: the split's lines are concatenated, whitespace-only lines as empty strings (as the Hub copy and the
reference's loader hold them); the text is cut into articles at every top-level heading (`= Title =` on its own
line, never `= = Section = =`), one character before the heading's newline; articles are stripped and empty ones
dropped.
Tokens: GPT-2 BPE per article, no separator between articles.
"""

from __future__ import annotations

import hashlib
import itertools
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .errors import DataUnavailableError
from .lm import SPLITS, TextLMDataModule, load_hub_split, path_fingerprint, resolve_hub_commit

# A newline, an optional space, "= Title =" with single equals signs, an optional space, a newline. The title
# neither starts nor ends with "=", which excludes "= = Section = =".
TOP_LEVEL_HEADING = re.compile(r"\n ?= (?!=)[^\n]*?(?<!=) = ?\n")

RAW_FILES = {"train": "wiki.train.raw", "valid": "wiki.valid.raw", "test": "wiki.test.raw"}
HUB_SPLITS = {"train": "train", "valid": "validation", "test": "test"}


def split_articles(text: str) -> list[str]:
    """Cut a whole split into articles at top-level headings; strip them and drop empty ones."""
    cuts = [0] + [max(match.start() - 1, 0) for match in TOP_LEVEL_HEADING.finditer(text)] + [len(text)]
    articles = (text[begin:end].strip() for begin, end in itertools.pairwise(cuts))
    return [article for article in articles if article]


class WikiText103DataModule(TextLMDataModule):
    """WikiText-103 raw, GPT-2 BPE, in lanes.

    Args (besides LMDataModule's and `tokenizer`):
        path: directory with wiki.{train,valid,test}.raw; None = the Hub copy.
        hub_id, hub_config, revision: the Hub Parquet source (revision: a commit sha to pin; the resolved sha is
            recorded in the cache metadata either way).
    """

    dataset_name = "wikitext103"

    def __init__(
        self,
        path: str | None = None,
        hub_id: str = "Salesforce/wikitext",
        hub_config: str = "wikitext-103-raw-v1",
        revision: str | None = "main",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.path = Path(path).expanduser() if path else None
        self.hub_id, self.hub_config, self.revision = hub_id, hub_config, revision

    def _raw_file(self, split: str) -> Path:
        assert self.path is not None
        file = self.path / RAW_FILES[split]
        if not file.is_file():
            raise DataUnavailableError(
                f"wikitext103: {file} does not exist. task.data.path must be a directory holding the raw files "
                f"{', '.join(RAW_FILES.values())} (from wikitext-103-raw-v1.zip); or set task.data.path=null to "
                f"download the Parquet copy from the Hugging Face Hub."
            )
        return file

    def check_source(self) -> None:
        """A local copy (path=) must hold every split: checked before the tokenizer is loaded (no network call)."""
        if self.path is not None:
            for split in SPLITS:
                self._raw_file(split)

    def _source_key(self, split: str) -> dict[str, Any]:
        if self.path is not None:
            return {"source": "local", "files": path_fingerprint([self._raw_file(split).resolve()])}
        return {"source": "hub", "hub_id": self.hub_id, "hub_config": self.hub_config, "revision": self.revision}

    def _split_text(self, split: str) -> tuple[str, dict[str, Any]]:
        if self.path is not None:
            file = self._raw_file(split)
            # Read it the way the Hub copy (and the reference's loader) holds it: whitespace-only lines become
            # empty, so both sources give the same articles and tokens.
            with open(file, encoding="utf-8") as lines:
                text = "".join(line if line.strip() else "" for line in lines)
            return text, {"source": str(file.resolve()), "sha256": hashlib.sha256(file.read_bytes()).hexdigest()}
        rows = load_hub_split("wikitext103", self.hub_id, self.hub_config, self.revision, HUB_SPLITS[split])
        # Each row is one line of the original file with its newline (blank lines are empty rows).
        text = "".join(rows["text"])
        meta = {"source": f"hf://datasets/{self.hub_id}/{self.hub_config}", "revision": self.revision,
                "commit": resolve_hub_commit(self.hub_id, self.revision)}
        return text, meta

    def _documents(self, split: str) -> tuple[Iterable[str], int | None, dict[str, Any]]:
        text, meta = self._split_text(split)
        articles = split_articles(text)
        meta.update(document_order="source order, articles split at top-level headings", num_articles=len(articles))
        return articles, len(articles), meta
