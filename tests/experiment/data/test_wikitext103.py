import numpy as np
import pytest

from experiment.data import DataUnavailableError, tokenized_cache
from experiment.data.wikitext103 import WikiText103DataModule, split_articles

from .lm_fixtures import make_tokenizer, write_wikitext103


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture()
def wt_dir(tmp_path):
    titles = write_wikitext103(tmp_path / "wikitext-103-raw", {"train": 7, "valid": 3, "test": 2})
    return tmp_path / "wikitext-103-raw", titles


def test_articles_split_at_top_level_headings_only(wt_dir):
    directory, titles = wt_dir
    articles = split_articles((directory / "wiki.train.raw").read_text())
    assert len(articles) == len(titles["train"])
    for article, title in zip(articles, titles["train"]):
        assert article.startswith(f"= {title} =")
        assert article.count("= = Section") >= 1  # sections stay inside their article


def test_split_rule_on_a_handwritten_text():
    text = (" \n = A = \n \n Alpha text . \n \n = = S = = \n \n more . \n \n = B = \n Beta . \n=C=\n \n"
            " = D =\n Delta \n")
    articles = split_articles(text)
    # "=C=" lacks the spaces of a heading; " = D =\n" has no space before the newline (optional) and counts.
    assert articles == ["= A = \n \n Alpha text . \n \n = = S = = \n \n more .", "= B = \n Beta . \n=C=",
                        "= D =\n Delta"]


def test_split_point_is_one_character_before_the_heading_match():
    # §a.1: the cut falls one character before the heading's newline. In the real files that character is the
    # space of a blank " " line; here it is the "." of a text line, which moves to the next article.
    assert split_articles("Alpha .\n = B = \n Beta") == ["Alpha", ".\n = B = \n Beta"]


def test_hub_rows_give_the_same_articles_as_the_raw_file(wt_dir):
    # The Parquet copy holds one row per line (newline kept), blank lines as empty rows.
    directory, _ = wt_dir
    raw = (directory / "wiki.valid.raw").read_text()
    rows = [line if line.strip() else "" for line in raw.split("\n")]
    rows = [row + "\n" if row else row for row in rows[:-1]] + [rows[-1]]
    dm = WikiText103DataModule(path=str(directory))
    from_file, _ = dm._split_text("valid")
    assert from_file == "".join(rows)
    assert len(split_articles(from_file)) == 3


def make_dm(directory, tokenizer_dir, cache_dir, **kwargs):
    return WikiText103DataModule(path=str(directory), tokenizer=tokenizer_dir, cache_dir=str(cache_dir),
                                 segment_length=kwargs.pop("segment_length", 16), lanes=kwargs.pop("lanes", 2),
                                 **kwargs)


def test_local_raw_files_tokenise_each_article(wt_dir, tokenizer_dir, tmp_path):
    directory, titles = wt_dir
    dm = make_dm(directory, tokenizer_dir, tmp_path / "cache")
    dm.setup("fit")
    train = dm.splits["train"]
    assert train.num_docs == len(titles["train"])
    articles = split_articles(dm._split_text("train")[0])
    assert len(articles) == len(titles["train"])
    for d, article in enumerate(articles):
        expected = dm.tokenizer(article, add_special_tokens=False)["input_ids"]
        assert train.tokens[train.offsets[d]:train.offsets[d + 1]].tolist() == expected
    assert dm.vocab_size == len(dm.tokenizer)
    assert train.meta["num_articles"] == len(titles["train"])
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (2, 16)
    assert "test" not in dm.splits  # fit tokenises train and valid only


def test_cache_is_reused_and_keyed_by_tokenizer(wt_dir, tokenizer_dir, tmp_path, monkeypatch):
    directory, _ = wt_dir
    first = make_dm(directory, tokenizer_dir, tmp_path / "cache")
    first.setup("validate")
    path = first.splits["valid"].path

    def must_not_tokenise(*args, **kwargs):
        raise AssertionError("the cached split was tokenised again")

    monkeypatch.setattr(WikiText103DataModule, "_documents", must_not_tokenise)
    second = make_dm(directory, tokenizer_dir, tmp_path / "cache", segment_length=8)  # layout settings: same tokens
    second.setup("validate")
    assert second.splits["valid"].path == path
    assert np.array_equal(second.splits["valid"].tokens, first.splits["valid"].tokens)

    other_tok = make_tokenizer(tmp_path / "other_tok", vocab_size=280)
    third = make_dm(directory, other_tok, tmp_path / "cache")
    with pytest.raises(AssertionError, match="tokenised again"):
        third.setup("validate")


def test_an_interrupted_build_leaves_nothing_behind(wt_dir, tokenizer_dir, tmp_path, monkeypatch):
    directory, _ = wt_dir
    dm = make_dm(directory, tokenizer_dir, tmp_path / "cache")
    original = tokenized_cache.TokenWriter.add_document
    calls = {"n": 0}

    def crash_after_two(self, ids):
        calls["n"] += 1
        if calls["n"] > 2:
            raise KeyboardInterrupt
        original(self, ids)

    monkeypatch.setattr(tokenized_cache.TokenWriter, "add_document", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        dm.setup("validate")
    assert list((tmp_path / "cache").iterdir()) == []
    monkeypatch.setattr(tokenized_cache.TokenWriter, "add_document", original)
    dm.setup("validate")
    assert dm.splits["valid"].num_docs == 3


def test_missing_local_files_raise_data_unavailable(tmp_path, tokenizer_dir):
    dm = make_dm(tmp_path / "nowhere", tokenizer_dir, tmp_path / "cache")
    with pytest.raises(DataUnavailableError, match=r"wikitext103.*task.data.path"):
        dm.setup("fit")


def test_offline_hub_raises_data_unavailable(tmp_path, tokenizer_dir, monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'Salesforce/wikitext' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    dm = WikiText103DataModule(path=None, tokenizer=tokenizer_dir, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataUnavailableError) as error:
        dm.setup("fit")
    message = str(error.value)
    assert "wikitext103" in message and "task.data.path" in message and "cache_dir" in message
    assert not (tmp_path / "cache").exists() or list((tmp_path / "cache").iterdir()) == []


def test_missing_tokenizer_raises_data_unavailable(wt_dir, tmp_path):
    directory, _ = wt_dir
    dm = make_dm(directory, str(tmp_path / "no_tokenizer_here"), tmp_path / "cache")
    with pytest.raises(DataUnavailableError, match="task.data.tokenizer"):
        dm.setup("fit")
