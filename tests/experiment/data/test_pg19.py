import pytest

from experiment.data import DataUnavailableError
from experiment.data.pg19 import PG19DataModule, book_id_from_url, percent_slice_count

from .lm_fixtures import make_tokenizer, write_pg19

TRAIN_IDS = [2, 30, 1001, 10006, 555, 7, 88, 123, 9999, 41, 12, 3, 400, 5006, 61, 17, 70, 81, 90, 100,
             200, 300, 301, 302, 303, 304, 305, 306, 307, 308]  # 30 books


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


def test_percent_slice_rounds_like_datasets():
    assert percent_slice_count(28602, 7) == 2002  # the paper's "first ~2,002 books"
    assert percent_slice_count(30, 7) == 2
    assert percent_slice_count(50, 100) == 50


def test_book_id_from_gutenberg_url():
    assert book_id_from_url("http://www.gutenberg.org/ebooks/10146") == "10146"
    with pytest.raises(ValueError, match="book id"):
        book_id_from_url("http://example.org/ebooks/")


def test_local_books_first_percent_in_book_id_order(tmp_path, tokenizer_dir):
    write_pg19(tmp_path / "pg19", {"train": TRAIN_IDS, "validation": [5, 6, 7], "test": [8, 9]})
    dm = PG19DataModule(path=str(tmp_path / "pg19"), tokenizer=tokenizer_dir, cache_dir=str(tmp_path / "cache"),
                        train_percent=20, segment_length=8, lanes=2)
    dm.setup("fit")
    train = dm.splits["train"]
    expected_ids = sorted(str(i) for i in TRAIN_IDS)[:6]  # 20% of 30; ids compared as strings: "10006" < "1001"
    assert train.meta["book_ids"] == expected_ids
    assert train.meta["books_in_source"] == 30 and train.meta["books_used"] == 6
    assert train.num_docs == 6
    first = dm.tokenizer.decode(train.tokens[train.offsets[0]:train.offsets[1]].tolist())
    assert first.startswith(f"Book {expected_ids[0]}.")
    assert dm.splits["valid"].num_docs == 3  # validation and test are complete


def test_hub_mirror_rows_are_ordered_by_book_id(tmp_path, tokenizer_dir, monkeypatch):
    import datasets

    ids = [300, 12, 1001, 5]
    rows = datasets.Dataset.from_dict({
        "short_book_title": [f"t{i}" for i in ids],
        "publication_date": [1900] * 4,
        "url": [f"http://www.gutenberg.org/ebooks/{i}" for i in ids],
        "text": [f"Book {i}. The river and the castle." for i in ids],
    })
    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kwargs: rows)
    monkeypatch.setattr("experiment.data.pg19.resolve_hub_commit", lambda *args: "abc123")
    dm = PG19DataModule(path=None, tokenizer=tokenizer_dir, cache_dir=str(tmp_path / "cache"), train_percent=50,
                        segment_length=4, lanes=1)
    train = dm.load_split("train")
    assert train.meta["book_ids"] == ["1001", "12"]  # string order of ["300", "12", "1001", "5"], first 50%
    assert train.meta["commit"] == "abc123"
    source_order = PG19DataModule(path=None, tokenizer=tokenizer_dir, cache_dir=str(tmp_path / "cache"),
                                  train_percent=50, book_order="source")
    assert source_order.load_split("train").meta["book_ids"] == ["300", "12"]


def test_missing_books_raise_data_unavailable(tmp_path, tokenizer_dir):
    dm = PG19DataModule(path=str(tmp_path / "empty"), tokenizer=tokenizer_dir, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataUnavailableError, match=r"pg19.*task.data.path"):
        dm.setup("fit")


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="book_order"):
        PG19DataModule(book_order="random")
    with pytest.raises(ValueError, match="train_percent"):
        PG19DataModule(train_percent=0)
