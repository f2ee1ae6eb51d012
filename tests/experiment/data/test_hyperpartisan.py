"""Hyperpartisan data: the SemEval XML loader on generated articles, HTML → text, disjoint stratified splits, user
split files, the token cache, locally built tokenizers and the offline errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from experiment.data import hyperpartisan as hp
from experiment.data.errors import DataUnavailableError
from experiment.data.hyperpartisan import (
    ARTICLES_FILE,
    LABELS_FILE,
    Article,
    HyperpartisanDataModule,
    build_tokenizer,
    check_splits,
    generate_articles,
    make_splits,
    read_semeval,
    split_checksum,
)

HANDWRITTEN = """<?xml version="1.0" encoding="UTF-8"?>
<articles>
<article id="0000007" published-at="2017-01-01" title="A">
<p>First   paragraph with <a href="http://x.org" type="external">a link</a>and&amp;more.</p>
<p>Second<br/>line &lt;not a tag&gt;</p><q>quoted</q>
</article>
<article id="0000003" title="B"><p>Only text.</p></article>
</articles>
"""
HANDWRITTEN_TRUTH = """<?xml version="1.0" encoding="UTF-8"?>
<articles>
<article id="0000007" hyperpartisan="true" labeled-by="article"/>
<article id="0000003" hyperpartisan="false" labeled-by="article"/>
</articles>
"""


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return generate_articles(tmp_path_factory.mktemp("hp") / "semeval", 60, seed=3)


@pytest.fixture(scope="module")
def tokenizers(corpus, tmp_path_factory) -> dict[str, Path]:
    texts = [a.text for a in read_semeval(corpus)]
    root = tmp_path_factory.mktemp("tok")
    for kind in ("wordpiece", "bpe"):
        build_tokenizer(kind, texts, root / kind)
    return {"wordpiece": root / "wordpiece", "bpe": root / "bpe"}


def module(corpus, tokenizer, tmp_path, **kwargs) -> HyperpartisanDataModule:
    options = {"path": str(corpus), "tokenizer": str(tokenizer), "dev_size": 8, "test_size": 9, "batch_size": 4,
               "eval_batch_size": 5, "cache_dir": str(tmp_path / "cache"), **kwargs}
    return HyperpartisanDataModule(**options)


def test_the_loader_strips_html_and_reads_labels(tmp_path):
    (tmp_path / ARTICLES_FILE).write_text(HANDWRITTEN)
    (tmp_path / LABELS_FILE).write_text(HANDWRITTEN_TRUTH)
    articles = read_semeval(tmp_path)
    assert [a.id for a in articles] == ["0000003", "0000007"]  # sorted by id
    assert [a.label for a in articles] == [0, 1]
    assert articles[1].text == "First paragraph with a link and&more. Second line <not a tag> quoted"
    assert articles[0].text == "Only text."


def test_generated_articles_go_through_the_real_loader(corpus):
    articles = read_semeval(corpus)
    assert len(articles) == 60 and sum(a.label for a in articles) == 30
    for article in articles:
        assert "<" not in article.text and "href" not in article.text and "  " not in article.text
        assert " link " in article.text  # the anchor's text is kept
        cue_words = article.text.split()[:6]
        vocabulary = hp.PARTISAN_WORDS if article.label else hp.NEUTRAL_WORDS
        assert all(word in vocabulary for word in cue_words)


def test_an_article_without_a_label_is_an_error(tmp_path):
    (tmp_path / ARTICLES_FILE).write_text(HANDWRITTEN)
    (tmp_path / LABELS_FILE).write_text(HANDWRITTEN_TRUTH.replace('<article id="0000003" hyperpartisan="false" '
                                                                  'labeled-by="article"/>', ""))
    with pytest.raises(ValueError, match="0000003 has no label"):
        read_semeval(tmp_path)


def articles_of(n: int, positives: int) -> list[Article]:
    return [Article(f"{i:07d}", "text", int(i < positives)) for i in range(n)]


def test_the_built_split_has_the_paper_sizes_and_is_disjoint_stratified_and_deterministic():
    articles = articles_of(645, 238)  # the by-article corpus: 645 articles, 238 hyperpartisan
    splits = make_splits(articles, dev_size=64, test_size=65, seed=0)
    assert {name: len(ids) for name, ids in splits.items()} == {"train": 516, "dev": 64, "test": 65}
    check_splits(splits, {a.id for a in articles}, "built")  # disjoint and known
    assert set().union(*map(set, splits.values())) == {a.id for a in articles}  # every article used
    assert all(ids == sorted(ids) for ids in splits.values())
    label = {a.id: a.label for a in articles}
    for name, size in (("dev", 64), ("test", 65)):
        positives = sum(label[i] for i in splits[name])
        assert abs(positives - size * 238 / 645) < 1  # stratified: the corpus's share of positives
    assert make_splits(articles, 64, 65, seed=0) == splits
    assert make_splits(articles, 64, 65, seed=1) != splits
    assert make_splits(list(reversed(articles)), 64, 65, seed=0) == splits  # input order does not matter


def test_overlapping_or_unknown_split_lists_are_refused():
    known = {f"{i:07d}" for i in range(10)}
    splits = {"train": ["0000000", "0000001"], "dev": ["0000001"], "test": ["0000002"]}
    with pytest.raises(ValueError, match="1 ids are in both train and dev"):
        check_splits(splits, known, "the file")
    with pytest.raises(ValueError, match="not in the corpus"):
        check_splits({"train": ["0000000"], "dev": ["0000001"], "test": ["9999999"]}, known, "the file")
    with pytest.raises(ValueError, match="test"):
        check_splits({"train": ["0000000"], "dev": ["0000001"], "test": []}, known, "the file")
    with pytest.raises(ValueError, match="dev_size"):
        make_splits(articles_of(10, 5), dev_size=5, test_size=5, seed=0)


def test_the_data_module_serves_padded_batches_and_records_the_split(corpus, tokenizers, tmp_path):
    dm = module(corpus, tokenizers["bpe"], tmp_path)
    assert dm.pad_token_id == 1 and dm.vocab_size == len(dm.tokenizer)
    dm.prepare_data()
    dm.setup("fit")
    sizes = {name: dm.load_split(name).num_docs for name in hp.SPLITS}
    assert sizes == {"train": 43, "dev": 8, "test": 9}
    batch = next(iter(dm.val_dataloader()))
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert ids.shape == mask.shape and ids.shape[0] == 5 and labels.shape == (5,)
    assert bool((ids[:, 0] == dm.tokenizer.bos_token_id).all())  # <s> starts every document
    assert bool((ids[mask == 0] == 1).all()) and bool((mask.sum(1) > 0).all())  # RoBERTa's pad id, not 0
    first = dm.load_split("dev")
    assert labels.tolist() == first.meta["labels"][:5]
    source = dm.source
    assert source["split"]["sha256"] == split_checksum(dm.splits)
    assert source["split"]["sizes"] == sizes
    written = json.loads(dm.write_run_files(tmp_path / "run").read_text())
    assert written["sha256"] == source["split"]["sha256"] and written["test"] == dm.splits["test"]
    # the written file is a valid split file: a second module reading it gets the same split
    again = module(corpus, tokenizers["bpe"], tmp_path, split_file=str(tmp_path / "run" / "splits.json"),
                   dev_size=20, test_size=20)
    assert again.build_splits() == dm.splits and "split_file" in again.source["split"]["origin"]


def test_wordpiece_tokenizer_and_the_training_order_follows_the_seed(corpus, tokenizers, tmp_path):
    dm = module(corpus, tokenizers["wordpiece"], tmp_path, seed=1)
    assert dm.pad_token_id == 0
    dm.setup("fit")
    first = next(iter(dm.train_dataloader()))
    assert bool((first["input_ids"][:, 0] == dm.tokenizer.cls_token_id).all())
    assert torch.equal(next(iter(dm.train_dataloader()))["labels"], first["labels"])  # same seed, same order
    other = module(corpus, tokenizers["wordpiece"], tmp_path, seed=2)
    other.setup("fit")
    orders = [next(iter(d.train_dataloader()))["input_ids"][:, 1:4].tolist() for d in (dm, other)]
    assert orders[0] != orders[1]


def test_tokens_are_cached_once(corpus, tokenizers, tmp_path, monkeypatch):
    builds = []
    original = hp.load_or_build

    def counting(cache_dir, key, dtype, build):
        def counted(writer):
            builds.append(key["split"])
            return build(writer)

        return original(cache_dir, key, dtype, counted)

    monkeypatch.setattr(hp, "load_or_build", counting)
    module(corpus, tokenizers["bpe"], tmp_path).setup("fit")
    assert sorted(builds) == ["dev", "test", "train"]
    second = module(corpus, tokenizers["bpe"], tmp_path)
    second.setup("fit")
    assert sorted(builds) == ["dev", "test", "train"]  # read from the cache
    module(corpus, tokenizers["wordpiece"], tmp_path).setup("fit")  # another tokenizer: new entries
    assert len(builds) == 6
    module(corpus, tokenizers["bpe"], tmp_path, split_seed=5).setup("fit")  # another split: new entries
    assert len(builds) == 9


def test_missing_data_names_task_data_path(tmp_path, tokenizers):
    dm = HyperpartisanDataModule(path=str(tmp_path / "nowhere"), tokenizer="no-such/tokenizer-anywhere",
                                 cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataUnavailableError, match="task.data.path") as error:
        dm.vocab_size  # noqa: B018
    assert "tokenizer" not in str(error.value).replace(ARTICLES_FILE, "")  # the data is what is missing


def test_the_hub_offline_names_task_data_path(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    dm = HyperpartisanDataModule(path=None, tokenizer="roberta-base", cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataUnavailableError, match="task.data.path"):
        dm.vocab_size  # noqa: B018


def test_a_missing_tokenizer_names_task_data_tokenizer(corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    dm = module(corpus, tmp_path / "no-tokenizer-here", tmp_path)
    with pytest.raises(DataUnavailableError, match="task.data.tokenizer"):
        dm.vocab_size  # noqa: B018


def test_generated_corpus_and_tokenizer_from_options_alone(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMORIA_CACHE_DIR", str(tmp_path / "root"))
    dm = HyperpartisanDataModule(generate=30, tokenizer="generated-wordpiece", dev_size=4, test_size=4)
    dm.setup("fit")
    assert len(dm.articles) == 30 and (dm.generated_dir / "generated-wordpiece" / "tokenizer.json").is_file()
    assert dm.source["generated"] == 30
    with pytest.raises(ValueError, match="task.data.generate"):
        HyperpartisanDataModule(tokenizer="generated-bpe")
    short = HyperpartisanDataModule(generate=30, generate_filler=10, tokenizer="generated-bpe", dev_size=4,
                                    test_size=4)
    words = [len(a.text.split()) for a in short.articles]
    assert min(words) >= 6 + 1 + 5 and max(words) <= 6 + 1 + 10  # cues, the link's text, 5 to 10 filler words


def test_the_hub_copy_is_read_like_the_files(tmp_path, monkeypatch):
    import datasets

    table = datasets.Dataset.from_dict({
        "text": ["<p>Second <a href='x'>one</a></p>", "<p>First</p>\n<p>one</p>"],
        "title": ["b", "a"], "hyperpartisan": [False, True], "url": ["u", "v"], "published_at": ["", ""],
    })
    seen = {}

    def fake_split(dataset, hub_id, hub_config, revision, split):
        seen.update(hub_id=hub_id, hub_config=hub_config, revision=revision, split=split)
        return table

    monkeypatch.setattr(hp, "load_hub_split", fake_split)
    dm = HyperpartisanDataModule(path=None, hub_id="org/copy", hub_config="byarticle", revision="abc123")
    articles = dm.articles
    assert seen == {"hub_id": "org/copy", "hub_config": "byarticle", "revision": "abc123", "split": "train"}
    assert [(a.id, a.text, a.label) for a in articles] == [("0000000", "Second one", 0), ("0000001", "First one", 1)]
    assert dm._source_key() == {"source": "hub", "hub_id": "org/copy", "hub_config": "byarticle",
                                "revision": "abc123"}
