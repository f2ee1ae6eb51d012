import zipfile

import numpy as np
import pytest

from experiment.data import DataUnavailableError
from experiment.data.enwik8 import Enwik8DataModule, byte_vocabulary, encode_bytes, split_bytes

from .lm_fixtures import enwik8_like_bytes

SIZE, VALID, TEST = 20_000, 2_000, 3_000


@pytest.fixture()
def raw(tmp_path):
    data = enwik8_like_bytes(SIZE)
    (tmp_path / "enwik8").write_bytes(data)
    return data


def make_dm(path, cache, **kwargs):
    return Enwik8DataModule(path=str(path), cache_dir=str(cache), valid_bytes=VALID, test_bytes=TEST,
                            segment_length=32, lanes=2, **kwargs)


def test_byte_split_takes_the_last_bytes_for_dev_and_test():
    data = np.arange(100, dtype=np.uint8)
    parts = split_bytes(data, 5, 7)
    assert parts["train"].tolist() == list(range(88))
    assert parts["valid"].tolist() == list(range(88, 93))
    assert parts["test"].tolist() == list(range(93, 100))
    with pytest.raises(ValueError, match="valid_bytes"):
        split_bytes(data, 50, 50)


def test_reference_vocabulary_drops_newline_and_standard_keeps_it():
    data = np.frombuffer(b"ab\ncd\n\xc3\xbc", dtype=np.uint8)
    assert byte_vocabulary(data, "reference").tolist() == sorted(b"abcd\xc3\xbc")
    assert byte_vocabulary(data, "standard").tolist() == sorted(b"\nabcd\xc3\xbc")
    with pytest.raises(ValueError, match="unseen|not in"):
        encode_bytes(np.frombuffer(b"abz", dtype=np.uint8), byte_vocabulary(data, "reference"), "reference")


@pytest.mark.parametrize("protocol", ["reference", "standard"])
def test_splits_decode_back_to_the_source_bytes(tmp_path, raw, protocol):
    dm = make_dm(tmp_path / "enwik8", tmp_path / "cache", protocol=protocol)
    dm.setup("fit")
    dm.setup("test")
    vocab = dm.vocabulary
    expected_vocab = sorted(set(raw) - ({10} if protocol == "reference" else set()))
    assert vocab.tolist() == expected_vocab and dm.vocab_size == len(expected_vocab)
    bounds = {"train": raw[: SIZE - VALID - TEST], "valid": raw[SIZE - VALID - TEST : SIZE - TEST], "test": raw[-TEST:]}
    for split, part in bounds.items():
        entry = dm.splits[split]
        assert entry.num_docs == 1  # each split is one document
        decoded = bytes(vocab[np.asarray(entry.tokens)].tolist())
        assert decoded == (part.replace(b"\n", b"") if protocol == "reference" else part)
    assert dm.splits["train"].meta["protocol"] == protocol


def test_zip_and_directory_sources_give_the_same_tokens(tmp_path, raw):
    with zipfile.ZipFile(tmp_path / "enwik8.zip", "w") as archive:
        archive.writestr("enwik8", raw)
    from_file = make_dm(tmp_path / "enwik8", tmp_path / "cache")
    from_zip = make_dm(tmp_path / "enwik8.zip", tmp_path / "cache")
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "enwik8.zip").write_bytes((tmp_path / "enwik8.zip").read_bytes())
    from_dir = make_dm(tmp_path / "dir", tmp_path / "cache")
    tokens = [np.asarray(dm.load_split("valid").tokens) for dm in (from_file, from_zip, from_dir)]
    assert np.array_equal(tokens[0], tokens[1]) and np.array_equal(tokens[0], tokens[2])


def test_lanes_of_bytes(tmp_path, raw):
    dm = make_dm(tmp_path / "enwik8", tmp_path / "cache")
    dm.setup("fit")
    stream = dm.streams["train"]
    n_bytes = dm.splits["train"].num_tokens
    assert len(stream) == (n_bytes // 32) // 2
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (2, 32) and int(batch["input_ids"].max()) < dm.vocab_size


def test_missing_file_raises_data_unavailable(tmp_path):
    dm = make_dm(tmp_path / "absent", tmp_path / "cache")
    with pytest.raises(DataUnavailableError, match=r"enwik8.*task.data.path"):
        dm.setup("fit")


def test_offline_download_raises_data_unavailable(tmp_path, monkeypatch):
    import datasets

    def offline(self, url):
        raise ConnectionError(f"Couldn't reach {url}")

    monkeypatch.setattr(datasets.DownloadManager, "download", offline)
    dm = Enwik8DataModule(path=None, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataUnavailableError, match=r"enwik8.*task.data.path"):
        dm.setup("fit")


def test_an_unknown_option_is_named():
    with pytest.raises(ValueError, match=r"segment_lenght.*task.data"):
        Enwik8DataModule(segment_lenght=8)
