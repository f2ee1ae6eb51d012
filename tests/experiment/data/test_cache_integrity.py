"""Token caches find their own damage (issue 24, item 3): every damaged form of an entry is reported by its path and
built again; where the source is gone, the error names the entry and the fix."""

from __future__ import annotations

import json
import logging
import zipfile

import numpy as np
import pytest

from experiment.data import DataUnavailableError
from experiment.data.enwik8 import Enwik8DataModule
from experiment.data.tokenized_cache import CorruptEntryError, find_entry, load_or_build, open_entry

from .lm_fixtures import enwik8_like_bytes

KEY = {"dataset": "toy", "split": "train", "source": "generated"}
DOCUMENTS = [np.arange(5) % 7, np.array([6, 1, 2]), np.arange(300) % 7]


def build(writer):
    build.calls += 1
    for document in DOCUMENTS:
        writer.add_document(document)
    return {"source": "generated"}


def entry(tmp_path):
    build.calls = 0
    return load_or_build(tmp_path, KEY, np.dtype(np.uint16), build)


def flip_one_token(path):
    tokens = path / "tokens.bin"
    data = bytearray(tokens.read_bytes())
    data[20] ^= 0x01  # token 10: same size, another id
    tokens.write_bytes(bytes(data))


def truncate(name, keep):
    def damage(path):
        data = (path / name).read_bytes()
        (path / name).write_bytes(data[: keep if keep >= 0 else len(data) + keep])
    return damage


def rewrite_offsets(path):
    offsets = np.load(path / "offsets.npy")
    offsets[1] += 1  # a document boundary moved: the counts still add up
    np.save(path / "offsets.npy", offsets)


def edit_meta(path):
    meta = json.loads((path / "meta.json").read_text())
    meta["num_docs"] = 3
    meta["source"] = "elsewhere"  # any edit breaks its checksum
    (path / "meta.json").write_text(json.dumps(meta))


DAMAGE = {
    "meta.json truncated": (truncate("meta.json", 40), "meta.json cannot be read"),
    "meta.json edited": (edit_meta, "does not match its checksum"),
    "tokens.bin truncated": (truncate("tokens.bin", -10), "tokens.bin has .* bytes, not the"),
    "tokens.bin missing": (lambda path: (path / "tokens.bin").unlink(), "tokens.bin has 0 bytes"),
    "a token changed": (flip_one_token, "the tokens sum to .* not the recorded"),
    "offsets.npy changed": (rewrite_offsets, "offsets.npy does not match its checksum"),
    "offsets.npy truncated": (truncate("offsets.npy", 30), "offsets.npy cannot be read"),
}


def test_a_fresh_entry_carries_its_integrity_record(tmp_path):
    split = entry(tmp_path)
    meta = split.meta
    assert meta["token_sum"] == sum(int(d.sum()) for d in DOCUMENTS) and meta["token_max"] == 6
    assert meta["tokens_bytes"] == (tmp_path / split.path.name / "tokens.bin").stat().st_size
    assert {"offsets_sha256", "meta_sha256"} <= set(meta)
    assert open_entry(split.path).num_tokens == split.num_tokens
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


@pytest.mark.parametrize("form", sorted(DAMAGE))
def test_each_damaged_form_is_named_and_rebuilt(form, tmp_path, caplog):
    damage, reason = DAMAGE[form]
    original = entry(tmp_path)
    tokens = np.asarray(original.tokens).copy()
    damage(original.path)
    with pytest.raises(CorruptEntryError, match=reason):
        find_entry(tmp_path, KEY)
    with caplog.at_level(logging.WARNING):
        rebuilt = load_or_build(tmp_path, KEY, np.dtype(np.uint16), build)
    assert build.calls == 2  # built again, not read
    assert str(original.path) in caplog.text and "building it again" in caplog.text
    assert np.array_equal(np.asarray(rebuilt.tokens), tokens)
    assert open_entry(rebuilt.path).meta["token_sum"] == original.meta["token_sum"]


def test_a_damaged_entry_whose_source_is_gone_names_the_entry_and_the_fix(tmp_path):
    original = entry(tmp_path)
    truncate("tokens.bin", -4)(original.path)

    def offline(writer):
        raise DataUnavailableError("toy: cannot download the source; point task.data.path at a local copy.")

    with pytest.raises(DataUnavailableError) as error:
        load_or_build(tmp_path, KEY, np.dtype(np.uint16), offline)
    message = str(error.value)
    assert str(original.path) in message and "tokens.bin has" in message and "task.data.path" in message


def test_an_entry_from_before_the_integrity_record_is_checked_and_recorded(tmp_path):
    original = entry(tmp_path)
    meta = json.loads((original.path / "meta.json").read_text())
    for key in ("token_sum", "token_max", "offsets_sha256", "tokens_bytes", "meta_sha256"):
        del meta[key]
    (original.path / "meta.json").write_text(json.dumps(meta))
    assert open_entry(original.path).meta["token_sum"] == original.meta["token_sum"]
    assert json.loads((original.path / "meta.json").read_text())["meta_sha256"]  # recorded for the next open
    truncate("tokens.bin", -2)(original.path)
    with pytest.raises(CorruptEntryError, match="tokens.bin has"):  # sizes are checked even without the record
        open_entry(original.path)


def enwik8_dm(path, cache):
    return Enwik8DataModule(path=str(path), cache_dir=str(cache), valid_bytes=1000, test_bytes=1000,
                            segment_length=16, lanes=2)


def test_a_data_module_rebuilds_a_damaged_cache_and_trains_on_the_same_tokens(tmp_path, caplog):
    (tmp_path / "enwik8").write_bytes(enwik8_like_bytes(6000, seed=1))
    dm = enwik8_dm(tmp_path / "enwik8", tmp_path / "cache")
    dm.setup("fit")
    expected = np.asarray(dm.splits["train"].tokens).copy()
    flip_one_token(dm.splits["train"].path)
    again = enwik8_dm(tmp_path / "enwik8", tmp_path / "cache")
    with caplog.at_level(logging.WARNING):
        again.setup("fit")
    assert "is damaged" in caplog.text
    assert np.array_equal(np.asarray(again.splits["train"].tokens), expected)


def test_an_id_beyond_the_vocabulary_is_caught_before_training(tmp_path, caplog):
    (tmp_path / "enwik8").write_bytes(enwik8_like_bytes(6000, seed=1))
    dm = enwik8_dm(tmp_path / "enwik8", tmp_path / "cache")
    dm.setup("fit")
    path = dm.splits["valid"].path
    meta = json.loads((path / "meta.json").read_text())  # a consistent entry, but with an id no embedding has
    tokens = np.fromfile(path / "tokens.bin", dtype=np.uint8)
    tokens[3] = 250
    tokens.tofile(path / "tokens.bin")
    from experiment.data.tokenized_cache import _meta_checksum, scan_tokens

    meta["token_sum"], meta["token_max"] = scan_tokens(tokens)
    meta["meta_sha256"] = _meta_checksum(meta)
    (path / "meta.json").write_text(json.dumps(meta))
    again = enwik8_dm(tmp_path / "enwik8", tmp_path / "cache")
    with caplog.at_level(logging.WARNING):
        again.setup("fit")
    assert "outside the" in caplog.text and str(path) in caplog.text
    assert int(np.asarray(again.splits["valid"].tokens).max()) < again.vocab_size


def test_enwik8_refuses_a_damaged_zip_and_random_bytes(tmp_path):
    text = enwik8_like_bytes(20_000)
    with zipfile.ZipFile(tmp_path / "enwik8.zip", "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("enwik8", text)
    whole = (tmp_path / "enwik8.zip").read_bytes()
    (tmp_path / "truncated.zip").write_bytes(whole[:-100])
    corrupted = bytearray(whole)
    corrupted[len(whole) // 2] ^= 0xFF  # the compressed data: a CRC error on reading
    (tmp_path / "crc.zip").write_bytes(bytes(corrupted))
    (tmp_path / "random").write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    for name, message in (("truncated.zip", "damaged zip"), ("crc.zip", "damaged zip"),
                          ("random", "is not enwik8")):
        dm = enwik8_dm(tmp_path / name, tmp_path / "cache")
        with pytest.raises(DataUnavailableError, match=message):
            dm.setup("fit")
    good = enwik8_dm(tmp_path / "enwik8.zip", tmp_path / "cache")
    good.setup("fit")
    assert good.splits["train"].num_tokens > 0
