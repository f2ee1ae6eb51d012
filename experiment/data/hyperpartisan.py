"""Hyperpartisan news detection (SemEval-2019 Task 4, by-article: 645 articles, binary labels;
experiments.md §a.5, §c.3).

Sources, in order of preference:
- `path`: a folder with the original files `articles-training-byarticle-20181122.xml` and
  `ground-truth-training-byarticle-20181122.xml` (Zenodo record 1489920);
- otherwise the Hub's Parquet copy (`hub_id`, `hub_config`, pinned by `revision`) through `datasets`, no loading
  scripts;
- `generate=N`: N generated articles written in the original XML format (the CPU demo and the tests), read through
  the same loader.

Text: each article's HTML → BeautifulSoup `get_text` (a space between elements) → whitespace collapsed; label =
int(hyperpartisan).

Splits (516 / 64 / 65 for the 645 articles): the reference's id lists overlap (§a.5), so the splits are built here,
**disjoint**: ids sorted, stratified by label, shuffled with `split_seed` (the same split for every training seed),
`dev_size` and `test_size` articles taken per class in proportion (largest remainders), the rest train. A user's
split (`split_file=`, JSON {"train": [ids], "dev": [ids], "test": [ids]}) is checked for overlap and unknown ids
and used instead. The split's SHA-256 (of its canonical JSON) is in `source` (hence results.json) and
`write_run_files` writes the id lists to the run directory.

Each split is tokenised once (with the tokenizer's special tokens, no truncation) and cached like the LM data
(`tokenized_cache.py`), keyed by the source, the tokenizer's content hash and the split checksum. Batches are padded
to their longest document with the tokenizer's pad id: `input_ids` (B, L), `attention_mask` (B, L), `labels` (B,).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .errors import DataUnavailableError
from .lm import load_hub_split, load_tokenizer, path_fingerprint, tokenizer_fingerprint
from .tokenized_cache import TokenizedSplit, cache_root, load_or_build, token_dtype
from .transfer import pin_memory_for

log = logging.getLogger(__name__)

DATASET = "hyperpartisan"
ARTICLES_FILE = "articles-training-byarticle-20181122.xml"
LABELS_FILE = "ground-truth-training-byarticle-20181122.xml"
SPLITS = ("train", "dev", "test")
GENERATED_TOKENIZERS = ("generated-wordpiece", "generated-bpe")


@dataclass(frozen=True)
class Article:
    id: str
    text: str
    label: int


# ---------------------------------------------------------------------------------------------------------- reading
def html_to_text(html: str) -> str:
    """An article's HTML as plain text: BeautifulSoup's get_text (elements separated by a space), whitespace
    collapsed."""
    from bs4 import BeautifulSoup

    return " ".join(BeautifulSoup(html, "html.parser").get_text(" ").split())


def read_semeval(path: str | Path) -> list[Article]:
    """The articles of a SemEval-2019 Task 4 by-article folder, sorted by id."""
    folder = Path(path).expanduser()
    articles_file, labels_file = folder / ARTICLES_FILE, folder / LABELS_FILE
    missing = [p.name for p in (articles_file, labels_file) if not p.is_file()]
    if missing:
        raise DataUnavailableError(
            f"{DATASET}: task.data.path={path} lacks {', '.join(missing)}; point task.data.path at the folder holding "
            f"{ARTICLES_FILE} and {LABELS_FILE} (Zenodo record 1489920), or set task.data.path=null for the Hub's "
            f"copy."
        )
    labels: dict[str, int] = {}
    for element in ET.parse(labels_file).getroot().iter("article"):
        value = element.get("hyperpartisan", "").strip().lower()
        if value not in ("true", "false"):
            raise ValueError(f"{labels_file}: article {element.get('id')} has hyperpartisan={value!r}, not true/false")
        labels[element.get("id")] = int(value == "true")
    articles = []
    for _, element in ET.iterparse(articles_file, events=("end",)):
        if element.tag != "article":
            continue
        article_id = element.get("id")
        if article_id not in labels:
            raise ValueError(f"{articles_file}: article {article_id} has no label in {labels_file.name}")
        inner = (element.text or "") + "".join(ET.tostring(child, encoding="unicode") for child in element)
        articles.append(Article(article_id, html_to_text(inner), labels[article_id]))
        element.clear()
    if not articles:
        raise ValueError(f"{articles_file} holds no <article> elements")
    return sorted(articles, key=lambda a: a.id)


def read_hub(hub_id: str, hub_config: str | None, revision: str | None) -> list[Article]:
    """The Hub's Parquet copy (all 645 articles are its train split). Ids: an `id` column when present, else the
    row number (7 digits, like the original ids)."""
    table = load_hub_split(DATASET, hub_id, hub_config, revision, "train")
    columns = set(table.column_names)
    if not {"text", "hyperpartisan"} <= columns:
        raise ValueError(f"{hub_id} ({hub_config}) has columns {sorted(columns)}, not text and hyperpartisan; "
                         "set task.data.hub_id / hub_config to a by-article copy of the corpus")
    ids = table["id"] if "id" in columns else [f"{row:07d}" for row in range(len(table))]
    return sorted((Article(str(i), html_to_text(text), int(bool(label)))
                   for i, text, label in zip(ids, table["text"], table["hyperpartisan"])), key=lambda a: a.id)


# ----------------------------------------------------------------------------------------------------------- splits
def make_splits(articles: list[Article], dev_size: int, test_size: int, seed: int) -> dict[str, list[str]]:
    """Disjoint train/dev/test id lists covering every article: stratified by label, seeded, each list sorted."""
    n = len(articles)
    if dev_size < 1 or test_size < 1 or dev_size + test_size >= n:
        raise ValueError(f"task.data.dev_size={dev_size} and test_size={test_size} must be >= 1 and leave training "
                         f"articles out of {n}; lower them")
    by_label: dict[int, list[str]] = {}
    for article in sorted(articles, key=lambda a: a.id):
        by_label.setdefault(article.label, []).append(article.id)
    rng = random.Random(seed)
    for ids in by_label.values():
        rng.shuffle(ids)
    labels = sorted(by_label)
    splits: dict[str, list[str]] = {name: [] for name in SPLITS}
    taken = dict.fromkeys(labels, 0)
    for name, size in (("test", test_size), ("dev", dev_size)):
        counts = _proportional([len(by_label[c]) for c in labels], size)
        for label, count in zip(labels, counts):
            splits[name] += by_label[label][taken[label]:taken[label] + count]
            taken[label] += count
    for label in labels:
        splits["train"] += by_label[label][taken[label]:]
    return {name: sorted(ids) for name, ids in splits.items()}


def _proportional(class_sizes: list[int], total: int) -> list[int]:
    """`total` split over classes in proportion to their sizes, by largest remainders (ties: larger class)."""
    n = sum(class_sizes)
    exact = [total * size / n for size in class_sizes]
    counts = [int(x) for x in exact]
    order = sorted(range(len(class_sizes)), key=lambda i: (exact[i] - counts[i], class_sizes[i]), reverse=True)
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    return counts


def check_splits(splits: dict[str, list[str]], known_ids: set[str], origin: str) -> None:
    """ValueError unless the three lists exist, are disjoint and name only known articles."""
    missing = [name for name in SPLITS if not splits.get(name)]
    if missing:
        raise ValueError(f"{origin} has no (or empty) {missing} id list(s); it needs 'train', 'dev' and 'test'")
    for i, a in enumerate(SPLITS):
        for b in SPLITS[i + 1:]:
            both = set(splits[a]) & set(splits[b])
            if both:
                raise ValueError(f"{origin}: {len(both)} ids are in both {a} and {b} (e.g. {sorted(both)[:3]}); the "
                                 "splits must be disjoint")
    unknown = set().union(*(set(splits[name]) for name in SPLITS)) - known_ids
    if unknown:
        raise ValueError(f"{origin} names {len(unknown)} ids not in the corpus (e.g. {sorted(unknown)[:3]})")


def split_checksum(splits: dict[str, list[str]]) -> str:
    """SHA-256 of the canonical JSON of the sorted id lists."""
    canonical = json.dumps({name: sorted(splits[name]) for name in SPLITS}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def load_split_file(path: str | Path) -> dict[str, list[str]]:
    file = Path(path).expanduser()
    if not file.is_file():
        raise ValueError(f"task.data.split_file={path} is not a file; give a JSON file with train/dev/test id lists")
    data = json.loads(file.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"task.data.split_file={path} must hold a JSON object with train/dev/test id lists")
    return {name: [str(i) for i in data.get(name) or []] for name in SPLITS}


# -------------------------------------------------------------------------------------------------- generated data
PARTISAN_WORDS = ("outrage", "traitors", "radical", "corrupt", "disgrace", "elites", "rigged", "destroy")
NEUTRAL_WORDS = ("reported", "according", "officials", "statement", "analysis", "percent", "survey", "quarter")
FILLER_WORDS = (
    "the", "a", "of", "to", "and", "in", "on", "for", "with", "city", "state", "people", "year", "said", "new",
    "government", "police", "market", "school", "health", "team", "week", "water", "road", "plan", "local", "court",
    "news", "data", "money", "power", "vote", "law", "game", "music", "film", "food", "home", "work", "time",
)


def generate_articles(directory: str | Path, num_articles: int, seed: int = 0, cue_words: int = 6,
                      filler_words: tuple[int, int] = (60, 160)) -> Path:
    """Write `num_articles` generated articles as the SemEval files into `directory` (returned).

    An article opens with `cue_words` words telling its class (partisan or neutral vocabulary) and continues with
    filler shared by both classes, in HTML paragraphs with links, so the label sits only in its first segment: a
    model classifying from the last segment needs to carry it there (memory). Labels alternate (balanced)."""
    rng = random.Random(seed)
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    articles, truths = ET.Element("articles"), ET.Element("articles")
    for index in range(num_articles):
        label = index % 2
        article_id = f"{index:07d}"
        cues = [rng.choice(PARTISAN_WORDS if label else NEUTRAL_WORDS) for _ in range(cue_words)]
        filler = [rng.choice(FILLER_WORDS) for _ in range(rng.randint(*filler_words))]
        element = ET.SubElement(articles, "article", id=article_id, title=f"Article {index}",
                                **{"published-at": "2018-01-01"})
        first = ET.SubElement(element, "p")
        first.text = " ".join(cues) + " "
        link = ET.SubElement(first, "a", href=f"https://example.org/{index}")
        link.text = "link"
        link.tail = " " + " ".join(filler[: len(filler) // 2])
        ET.SubElement(element, "p").text = " ".join(filler[len(filler) // 2:])
        ET.SubElement(truths, "article", id=article_id, hyperpartisan="true" if label else "false",
                      **{"labeled-by": "article", "url": f"https://example.org/{index}"})
    ET.ElementTree(articles).write(folder / ARTICLES_FILE, encoding="utf-8", xml_declaration=True)
    ET.ElementTree(truths).write(folder / LABELS_FILE, encoding="utf-8", xml_declaration=True)
    return folder


def build_tokenizer(kind: str, texts: list[str], directory: str | Path):
    """A small fast tokenizer trained on `texts` and saved to `directory`: kind "wordpiece" (BERT: [PAD]=0,
    [CLS] ... [SEP]) or "bpe" (RoBERTa byte-level: <s>=0, <pad>=1, <s> ... </s>). No hub needed."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if kind == "wordpiece":
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        backend = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        backend.normalizer = normalizers.BertNormalizer(lowercase=True)
        backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        backend.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=400, special_tokens=specials))
        cls_id, sep_id = backend.token_to_id("[CLS]"), backend.token_to_id("[SEP]")
        backend.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
            special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
        backend.decoder = decoders.WordPiece()
        names = {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]",
                 "mask_token": "[MASK]"}
    elif kind == "bpe":
        specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
        backend = Tokenizer(models.BPE(unk_token="<unk>"))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.train_from_iterator(texts, trainers.BpeTrainer(
            vocab_size=600, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        backend.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
        backend.decoder = decoders.ByteLevel()
        names = {"bos_token": "<s>", "pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>",
                 "cls_token": "<s>", "sep_token": "</s>", "mask_token": "<mask>"}
    else:
        raise ValueError(f"tokenizer kind must be 'wordpiece' or 'bpe', got {kind!r}")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **names)
    tokenizer.save_pretrained(str(directory))
    return tokenizer


# ---------------------------------------------------------------------------------------------------- data module
class DocumentDataset(Dataset):
    """(token ids (L,) int64, label) per document of a cached split."""

    def __init__(self, split: TokenizedSplit):
        self.split = split
        self.labels = split.meta["labels"]

    def __len__(self) -> int:
        return self.split.num_docs

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        start, end = self.split.offsets[index], self.split.offsets[index + 1]
        return np.asarray(self.split.tokens[start:end], dtype=np.int64), int(self.labels[index])


class PadCollate:
    """Pads a batch to its longest document with `pad_id` (a class, so DataLoader workers can pickle it)."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, items: list[tuple[np.ndarray, int]]) -> dict[str, torch.Tensor]:
        length = max(len(ids) for ids, _ in items)
        input_ids = torch.full((len(items), length), self.pad_id, dtype=torch.long)  # (B, L)
        attention_mask = torch.zeros((len(items), length), dtype=torch.long)  # (B, L)
        for row, (ids, _) in enumerate(items):
            input_ids[row, :len(ids)] = torch.from_numpy(ids)
            attention_mask[row, :len(ids)] = 1
        labels = torch.tensor([label for _, label in items], dtype=torch.long)  # (B,)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class HyperpartisanDataModule(L.LightningDataModule):
    """Hyperpartisan articles, split disjointly, tokenised once and cached.

    Args:
        path: folder with the original XML files; null = the Hub's copy (hub_id / hub_config / revision).
        tokenizer: a hub id or local folder (must match the model: roberta-base, bert-base-uncased, ...), or
            generated-wordpiece / generated-bpe (built from the generated articles; only with `generate`).
        split_file: a JSON {"train","dev","test"} of id lists to use instead of the built split.
        split_seed, dev_size, test_size: the built split (the same for every training `seed`).
        generate: > 0 = generate this many articles (written in the original format under the cache) instead of
            reading real data; generate_seed seeds them; each has generate_filler / 2 to generate_filler filler
            words after its class cues.
        batch_size / eval_batch_size: documents per device batch; seed: the training order's shuffle.
    """

    def __init__(self, path: str | None = None, hub_id: str = "SemEvalWorkshop/hyperpartisan_news_detection",
                 hub_config: str | None = "byarticle", revision: str | None = "refs/convert/parquet",
                 tokenizer: str = "roberta-base", split_file: str | None = None, split_seed: int = 0,
                 dev_size: int = 64, test_size: int = 65, batch_size: int = 8, eval_batch_size: int = 32,
                 seed: int = 42, cache_dir: str | None = None, num_workers: int = 0, generate: int = 0,
                 generate_seed: int = 0, generate_filler: int = 160):
        super().__init__()
        if batch_size < 1 or eval_batch_size < 1:
            raise ValueError(f"task.data.batch_size ({batch_size}) and eval_batch_size ({eval_batch_size}) must be "
                             ">= 1")
        if generate < 0:
            raise ValueError(f"task.data.generate must be >= 0 (articles to generate; 0 = real data), got {generate}")
        if str(tokenizer) in GENERATED_TOKENIZERS and not generate:
            raise ValueError(f"task.data.tokenizer={tokenizer} is built from generated articles; set task.data.generate"
                             " > 0, or name a real tokenizer (e.g. roberta-base)")
        self.path = path
        self.hub_id, self.hub_config, self.revision = hub_id, hub_config, revision
        self.tokenizer_name = str(tokenizer)
        self.split_file = split_file
        self.split_seed, self.dev_size, self.test_size = int(split_seed), int(dev_size), int(test_size)
        self.batch_size, self.eval_batch_size = int(batch_size), int(eval_batch_size)
        self.seed = int(seed)
        self.cache_dir = cache_dir
        self.num_workers = int(num_workers)
        self.generate, self.generate_seed = int(generate), int(generate_seed)
        if generate_filler < 2:
            raise ValueError(f"task.data.generate_filler must be >= 2 (filler words per generated article, at most), "
                             f"got {generate_filler}")
        self.generate_filler = int(generate_filler)
        self._articles: list[Article] | None = None
        self._tokenizer = None
        self.splits: dict[str, list[str]] | None = None
        self.split_origin: str | None = None
        self.tokenized: dict[str, TokenizedSplit] = {}

    def __getstate__(self) -> dict[str, Any]:  # spawned workers re-open the memory maps
        state = self.__dict__.copy()
        state["tokenized"] = {}
        return state

    # -- source ---------------------------------------------------------------------------------------------------
    @property
    def generated_dir(self) -> Path:
        name = f"n{self.generate}-seed{self.generate_seed}-filler{self.generate_filler}-v1"
        return cache_root() / "hyperpartisan-generated" / name

    def _source_folder(self) -> Path | None:
        if self.generate:
            folder = self.generated_dir
            if not (folder / LABELS_FILE).is_file():
                tmp = folder.with_name(folder.name + f".tmp{random.getrandbits(32):08x}")
                generate_articles(tmp, self.generate, self.generate_seed,
                                  filler_words=(self.generate_filler // 2, self.generate_filler))
                try:
                    tmp.rename(folder)
                except OSError:  # another process made it first
                    import shutil

                    shutil.rmtree(tmp, ignore_errors=True)
            return folder
        return None if self.path is None else Path(self.path).expanduser()

    @property
    def articles(self) -> list[Article]:
        if self._articles is None:
            folder = self._source_folder()
            if folder is not None:
                self._articles = read_semeval(folder)
            else:
                self._articles = read_hub(self.hub_id, self.hub_config, self.revision)
            log.info("%s: %d articles (%d hyperpartisan)", DATASET, len(self._articles),
                     sum(a.label for a in self._articles))
        return self._articles

    def _source_key(self) -> dict[str, Any]:
        folder = self._source_folder()
        if folder is not None:
            return {"source": "local", "files": path_fingerprint([folder / ARTICLES_FILE, folder / LABELS_FILE])}
        return {"source": "hub", "hub_id": self.hub_id, "hub_config": self.hub_config, "revision": self.revision}

    # -- tokenizer ------------------------------------------------------------------------------------------------
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            if self.tokenizer_name in GENERATED_TOKENIZERS:
                folder = self.generated_dir / self.tokenizer_name
                if not (folder / "tokenizer.json").is_file():
                    build_tokenizer(self.tokenizer_name.split("-")[1], [a.text for a in self.articles], folder)
                self._tokenizer = load_tokenizer(str(folder), DATASET)
            else:
                self._tokenizer = load_tokenizer(self.tokenizer_name, DATASET)
            if self._tokenizer.pad_token_id is None:
                raise ValueError(f"tokenizer {self.tokenizer_name!r} has no pad token; use one that has (BERT and "
                                 "RoBERTa tokenizers do)")
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        self.articles  # noqa: B018  (the data first: its absence is the error to report, not the tokenizer's)
        return len(self.tokenizer)

    @property
    def pad_token_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    # -- splits and tokens ----------------------------------------------------------------------------------------
    def build_splits(self) -> dict[str, list[str]]:
        if self.splits is None:
            known = {a.id for a in self.articles}
            if self.split_file:
                splits = load_split_file(self.split_file)
                origin = f"task.data.split_file={self.split_file}"
            else:
                splits = make_splits(self.articles, self.dev_size, self.test_size, self.split_seed)
                origin = f"built: stratified, split_seed={self.split_seed}, dev {self.dev_size}, test {self.test_size}"
            check_splits(splits, known, origin)
            self.splits, self.split_origin = splits, origin
        return self.splits

    def load_split(self, split: str) -> TokenizedSplit:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        if split not in self.tokenized:
            splits = self.build_splits()
            key = {"dataset": DATASET, "split": split, **self._source_key(),
                   "tokenizer_sha": tokenizer_fingerprint(self.tokenizer), "split_sha": split_checksum(splits)}
            by_id = {a.id: a for a in self.articles}
            chosen = [by_id[i] for i in splits[split]]

            def build(writer) -> dict[str, Any]:
                encoded = self.tokenizer([a.text for a in chosen], add_special_tokens=True, truncation=False,
                                         return_attention_mask=False, verbose=False)["input_ids"]
                for ids in encoded:
                    writer.add_document(np.asarray(ids, dtype=np.int64))
                return {"ids": [a.id for a in chosen], "labels": [a.label for a in chosen],
                        "tokenizer_name": self.tokenizer_name}

            entry = load_or_build(self.cache_dir, key, token_dtype(len(self.tokenizer)), build)
            log.info("%s %s: %d articles, %d tokens (%s)", DATASET, split, entry.num_docs, entry.num_tokens, entry.path)
            self.tokenized[split] = entry
        return self.tokenized[split]

    def prepare_data(self) -> None:
        for split in SPLITS:
            self.load_split(split)

    def setup(self, stage: str | None = None) -> None:
        for split in SPLITS:
            self.load_split(split)

    @property
    def source(self) -> dict[str, Any]:
        """What the run read, for results.json: the source, the split (origin, sizes, checksum) and the tokens."""
        splits = self.build_splits()
        return {
            "dataset": DATASET,
            "source": self._source_key(),
            "generated": self.generate or None,
            "split": {"origin": self.split_origin, "sha256": split_checksum(splits),
                      "sizes": {name: len(splits[name]) for name in SPLITS},
                      "positives": {name: sum(self._label(i) for i in splits[name]) for name in SPLITS}},
            "tokenizer": self.tokenizer_name,
            "tokens": {name: entry.num_tokens for name, entry in self.tokenized.items()},
        }

    def _label(self, article_id: str) -> int:
        if not hasattr(self, "_labels"):
            self._labels = {a.id: a.label for a in self.articles}
        return self._labels[article_id]

    def write_run_files(self, run_dir: str | Path) -> Path:
        """Write the split's id lists and checksum to <run_dir>/splits.json (what `split_file=` accepts)."""
        splits = self.build_splits()
        path = Path(run_dir) / "splits.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        body = {**{name: splits[name] for name in SPLITS}, "sha256": split_checksum(splits),
                "origin": self.split_origin}
        path.write_text(json.dumps(body, indent=1) + "\n")
        return path

    # -- loaders --------------------------------------------------------------------------------------------------
    def _loader(self, split: str, batch_size: int, shuffle: bool) -> DataLoader:
        trainer = getattr(self, "trainer", None)
        return DataLoader(DocumentDataset(self.load_split(split)), batch_size=batch_size, shuffle=shuffle,
                          collate_fn=PadCollate(self.pad_token_id), num_workers=self.num_workers,
                          generator=torch.Generator().manual_seed(self.seed) if shuffle else None,
                          pin_memory=pin_memory_for(trainer))

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("dev", self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.eval_batch_size, shuffle=False)
