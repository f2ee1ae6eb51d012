"""The language-modelling DataModule shared by WikiText-103, PG-19 and enwik8.

A dataset subclass says how to read the documents of a split (`_cache_key`, `_build_split`, `vocab_size`); this
class caches the tokens (tokenized_cache.py), lays them out in lanes (lanes.py) and serves this rank's lanes.

Resuming: the DataModule's state (saved in Lightning checkpoints) is the position in the training stream, so a run
restored from a mid-epoch checkpoint continues with the next unseen step instead of replaying the epoch.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from .errors import DataUnavailableError
from .lanes import LaneStream, SegmentTable, build_segments, rank_lanes
from .tokenized_cache import TokenizedSplit, TokenWriter, discard_entry, load_or_build, token_dtype
from .transfer import pin_memory_for

log = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")


class LMDataModule(L.LightningDataModule):
    """Streams of contiguous segments for language modelling.

    Args:
        segment_length: tokens per segment (T) in training.
        lanes: the global number of training lanes, i.e. the global batch size (each of D devices owns lanes / D).
        eval_lanes: the global number of lanes for validation and test (the reference: 1, the whole split one stream).
        eval_segment_length: segment length for validation and test (default: segment_length).
        score_all_tokens: also score each segment's first token (from the previous segment's last position).
        keep_remainders: keep the last partial segment of each document (padded, its padding unscored).
        cache_dir: where tokenised splits are kept (default $MEMORIA_CACHE_DIR/tokens or ~/.cache/memoria/tokens).
        num_workers: DataLoader workers (batches are memmap slices: 0 is usually fastest).
    """

    dataset_name = "lm"

    def __init__(
        self,
        segment_length: int = 150,
        lanes: int = 8,
        eval_lanes: int = 1,
        eval_segment_length: int | None = None,
        score_all_tokens: bool = False,
        keep_remainders: bool = False,
        cache_dir: str | None = None,
        num_workers: int = 0,
        **unknown: Any,
    ):
        super().__init__()
        if unknown:  # dataset subclasses pass their other options through: whatever arrives here is a typo
            raise ValueError(
                f"{type(self).__name__} has no option(s) {sorted(unknown)}; check the names under task.data "
                f"(see conf/task/{self.dataset_name}.yaml)."
            )
        for name, value in (("segment_length", segment_length), ("lanes", lanes), ("eval_lanes", eval_lanes)):
            if int(value) < 1:
                raise ValueError(f"task.data.{name} must be >= 1, got {value}")
        self.segment_length = int(segment_length)
        self.lanes = int(lanes)
        self.eval_lanes = int(eval_lanes)
        self.eval_segment_length = int(eval_segment_length or segment_length)
        self.score_all_tokens = bool(score_all_tokens)
        self.keep_remainders = bool(keep_remainders)
        self.cache_dir = cache_dir
        self.num_workers = int(num_workers)
        self.splits: dict[str, TokenizedSplit] = {}
        self.streams: dict[str, LaneStream] = {}
        # Position in the training stream: the next step to train on, and the epoch it belongs to.
        self._train_epoch = 0
        self._train_next_step = 0
        self._resume: tuple[int, int] | None = None

    def __getstate__(self) -> dict[str, Any]:
        # Spawned DDP workers receive a pickled copy: memory maps would be pickled as full arrays, so drop them
        # (each process re-opens the cache in setup()).
        state = self.__dict__.copy()
        state["splits"], state["streams"] = {}, {}
        return state

    # -- what a dataset subclass provides ---------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    def _cache_key(self, split: str) -> dict[str, Any]:
        raise NotImplementedError

    def _token_dtype(self) -> np.dtype:
        return token_dtype(self.vocab_size)

    def _build_split(self, split: str, writer: TokenWriter) -> dict[str, Any]:
        """Add the split's documents, in order, to `writer`; return metadata worth recording."""
        raise NotImplementedError

    # -- caching ----------------------------------------------------------------------------------------------------
    def load_split(self, split: str) -> TokenizedSplit:
        """The tokenised split, from the cache or built once now."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        if split not in self.splits:
            key = {"dataset": self.dataset_name, "split": split, **self._cache_key(split)}
            entry = load_or_build(self.cache_dir, key, self._token_dtype(), lambda w: self._build_split(split, w))
            log.info("%s %s: %d documents, %d tokens (%s)", self.dataset_name, split, entry.num_docs,
                     entry.num_tokens, entry.path)
            self.splits[split] = entry
        return self.splits[split]

    def _checked_split(self, split: str) -> TokenizedSplit:
        """The split, its largest token id checked against the vocabulary (an id beyond it would be an IndexError
        in the embedding, steps into training): an entry that fails is removed and built again."""
        entry = self.load_split(split)
        largest = int(entry.meta.get("token_max", -1))
        if largest >= self.vocab_size:
            log.warning("the token cache entry %s holds id %d, outside the %d-symbol vocabulary; removing it and "
                        "building it again", entry.path, largest, self.vocab_size)
            discard_entry(entry.path)
            del self.splits[split]
            entry = self.load_split(split)
            if int(entry.meta.get("token_max", -1)) >= self.vocab_size:
                raise ValueError(f"{self.dataset_name} {split}: the tokens reach id {entry.meta['token_max']} but "
                                 f"the vocabulary has {self.vocab_size} symbols; check task.data.tokenizer.")
        return entry

    def _stage_splits(self, stage: str | None) -> tuple[str, ...]:
        return {"fit": ("train", "valid"), "validate": ("valid",), "test": ("test",), "predict": ("test",)}.get(
            stage or "", SPLITS
        )

    def _trainer_stage(self) -> str | None:
        trainer = getattr(self, "trainer", None)
        fn = getattr(getattr(trainer, "state", None), "fn", None)
        return getattr(fn, "value", None)

    def prepare_data(self) -> None:
        # Runs on one process per node before setup: tokenise what this stage needs into the cache.
        for split in self._stage_splits(self._trainer_stage()):
            self.load_split(split)

    def setup(self, stage: str | None = None) -> None:
        trainer = getattr(self, "trainer", None)
        world_size = trainer.world_size if trainer is not None else 1
        rank = trainer.global_rank if trainer is not None else 0
        for split in self._stage_splits(stage):
            entry = self._checked_split(split)
            training = split == "train"
            num_lanes = self.lanes if training else self.eval_lanes
            length = self.segment_length if training else self.eval_segment_length
            table = build_segments(
                entry.offsets, length, score_all_tokens=self.score_all_tokens, keep_remainders=self.keep_remainders
            )
            if len(table) < num_lanes:
                raise ValueError(
                    f"{self.dataset_name} {split} has {len(table)} segments of {length} tokens, fewer than its "
                    f"{num_lanes} lanes; use fewer lanes or a shorter segment length."
                )
            lanes = rank_lanes(num_lanes, world_size, rank)
            start = self._resume_start if training else None
            self.streams[split] = LaneStream(entry.tokens, table, num_lanes, lanes, start_step=start)

    @property
    def source(self) -> dict[str, Any]:
        """What the run read, for results.json: per loaded split its source, revision, order and counts, and the
        protocol switches in force."""
        skip = {"key", "book_ids", "vocabulary", "format"}
        return {
            "dataset": self.dataset_name,
            "protocol": {"segment_length": self.segment_length, "eval_segment_length": self.eval_segment_length,
                         "lanes": self.lanes, "eval_lanes": self.eval_lanes,
                         "score_all_tokens": self.score_all_tokens, "keep_remainders": self.keep_remainders},
            "splits": {split: {k: v for k, v in entry.meta.items() if k not in skip}
                       for split, entry in self.splits.items()},
        }

    def segment_table(self, split: str) -> SegmentTable:
        return self.streams[split].table

    # -- loaders ----------------------------------------------------------------------------------------------------
    def _loader(self, split: str) -> DataLoader:
        if split not in self.streams:
            self.setup({"train": "fit", "valid": "validate", "test": "test"}[split])
        # A private generator: creating the loader's iterator draws a seed from it, and a draw from the global
        # RNG would shift dropout after a resume (the iterator is created at a different point of the run).
        loader_class = _TrainLaneLoader if split == "train" else DataLoader
        loader = loader_class(
            self.streams[split], batch_size=None, num_workers=self.num_workers, persistent_workers=False,
            generator=torch.Generator().manual_seed(0), pin_memory=pin_memory_for(getattr(self, "trainer", None)),
        )
        if split == "train":
            loader.datamodule = self
        return loader

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("valid")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    # -- position in the training stream (resume) -------------------------------------------------------------------
    def _resume_start(self) -> int:
        """Where the training stream starts this epoch: the saved position in the epoch a checkpoint was written,
        the beginning otherwise (also when that checkpoint was written at the very end of its epoch)."""
        trainer = getattr(self, "trainer", None)
        epoch = trainer.current_epoch if trainer is not None else 0
        if self._resume is not None and self._resume[0] == epoch:
            step = self._resume[1]
            return step if step < len(self.streams["train"]) else 0
        return 0

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        trainer = getattr(self, "trainer", None)
        if trainer is not None and trainer.training and isinstance(batch, dict) and "step" in batch:
            self._train_epoch = trainer.current_epoch
            self._train_next_step = int(batch["step"]) + 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"train_epoch": self._train_epoch, "train_next_step": self._train_next_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._train_epoch = int(state_dict["train_epoch"])
        self._train_next_step = int(state_dict["train_next_step"])
        self._resume = (self._train_epoch, self._train_next_step)


class _TrainLaneLoader(DataLoader):
    """The training loader, resumable in Lightning's sense: its state is the DataModule's stream position."""

    datamodule: LMDataModule

    def state_dict(self) -> dict[str, Any]:
        return self.datamodule.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.datamodule.load_state_dict(state_dict)


# -- text datasets: GPT-2 BPE through transformers -----------------------------------------------------------------


def load_tokenizer(name_or_path: str, dataset: str):
    """A fast tokenizer from the hub or a local directory; DataUnavailableError if it cannot be had."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as error:
        raise DataUnavailableError(
            f"{dataset}: cannot load the tokenizer {name_or_path!r} ({type(error).__name__}). Point "
            f"task.data.tokenizer at a local tokenizer directory (e.g. a saved 'gpt2' tokenizer), or run once "
            f"with internet so the Hugging Face cache holds it (offline, HF_HUB_OFFLINE=1 skips the retries)."
        ) from None
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"tokenizer {name_or_path!r} is not a fast tokenizer; install `tokenizers` or use a fast one")
    return tokenizer


def tokenizer_fingerprint(tokenizer) -> str:
    """A content hash of the tokenizer (vocabulary, merges, normalisation): the cache key part for it."""
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()[:16]


def path_fingerprint(paths: Iterable[Path]) -> list[list]:
    """Names, sizes and modification times of local source files: a changed copy is re-tokenised."""
    return [[str(p), p.stat().st_size, int(p.stat().st_mtime)] for p in sorted(paths)]


class TextLMDataModule(LMDataModule):
    """A text dataset tokenised with a (GPT-2 BPE) tokenizer, one document at a time.

    Subclasses provide `_documents(split)` (an iterable of document strings and their count, if known) and
    `_source_key(split)`.
    """

    def __init__(self, tokenizer: str = "gpt2", tokenize_batch_docs: int = 64, **kwargs):
        super().__init__(**kwargs)
        self.tokenizer_name = str(tokenizer)
        self.tokenize_batch_docs = int(tokenize_batch_docs)
        self._tokenizer = None

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self.check_source()  # a wrong data path is named first, without waiting on the Hub for the tokenizer
            try:
                self._tokenizer = load_tokenizer(self.tokenizer_name, self.dataset_name)
            except DataUnavailableError as error:
                if getattr(self, "path", None) is None:  # the Hub copy of the data is out of reach as well
                    raise DataUnavailableError(
                        f"{error} Without the Hub the data needs a local copy too: task.data.path=<local copy> "
                        f"(conf/task/{self.dataset_name}.yaml says what it holds)."
                    ) from None
                raise
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def check_source(self) -> None:
        """Raise DataUnavailableError if a configured local copy of the data is missing (no network use)."""

    def _source_key(self, split: str) -> dict[str, Any]:
        raise NotImplementedError

    def _documents(self, split: str) -> tuple[Iterable[str], int | None, dict[str, Any]]:
        """(documents in order, their number if known, metadata about the source and order)."""
        raise NotImplementedError

    def _cache_key(self, split: str) -> dict[str, Any]:
        return {
            **self._source_key(split),
            "tokenizer": os.path.basename(self.tokenizer_name.rstrip("/")),
            "tokenizer_sha": tokenizer_fingerprint(self.tokenizer),
        }

    def _build_split(self, split: str, writer: TokenWriter) -> dict[str, Any]:
        from tqdm.auto import tqdm

        documents, total, meta = self._documents(split)
        tokenizer = self.tokenizer
        batch: list[str] = []

        def flush() -> None:
            encoded = tokenizer(batch, add_special_tokens=False, return_attention_mask=False, verbose=False)
            for ids in encoded["input_ids"]:
                writer.add_document(np.asarray(ids, dtype=np.int64))
            progress.update(len(batch))
            batch.clear()

        with tqdm(total=total, desc=f"tokenising {self.dataset_name} {split}", unit="doc") as progress:
            for document in documents:
                batch.append(document)
                if len(batch) >= self.tokenize_batch_docs:
                    flush()
            if batch:
                flush()
        return {"tokenizer_name": self.tokenizer_name, "vocab_size": len(tokenizer), **meta}


def load_hub_split(dataset: str, hub_id: str, hub_config: str | None, revision: str | None, split: str):
    """A split of a Parquet dataset on the Hugging Face Hub through `datasets` (no loading scripts), or a
    DataUnavailableError naming the options that fix it."""
    import datasets

    try:
        return datasets.load_dataset(hub_id, hub_config, revision=revision, split=split)
    except Exception as error:  # noqa: BLE001  (offline, unknown revision, missing repo: all mean no data)
        raise DataUnavailableError(
            f"{dataset}: cannot load {split!r} of {hub_id}"
            + (f" ({hub_config})" if hub_config else "")
            + f" at revision {revision!r} from the Hugging Face Hub ({type(error).__name__}: {str(error)[:200]}). "
            f"Either connect to the internet, or point task.data.path at a local copy; tokenised splits are cached "
            f"under task.data.cache_dir (or $MEMORIA_CACHE_DIR) and need no source once built."
        ) from None


def resolve_hub_commit(hub_id: str, revision: str | None) -> str | None:
    """The commit sha a hub revision points to (recorded in the cache metadata), or None if it cannot be asked."""
    try:
        from huggingface_hub import HfApi

        return HfApi().dataset_info(hub_id, revision=revision).sha
    except Exception:  # noqa: BLE001  (only recorded when it can be had)
        return None
