"""Generated language-modelling data in each dataset's original local format, and a tiny GPT-2-style tokenizer.

No downloads: the tokenizer is a byte-level BPE trained here on generated text and saved as a GPT2TokenizerFast
directory, which `AutoTokenizer.from_pretrained(path)` loads like the real one.
"""

from __future__ import annotations

import random
from pathlib import Path

WORDS = (
    "the", "of", "and", "to", "in", "a", "is", "was", "for", "on", "as", "with", "by", "he", "at", "from",
    "his", "that", "it", "an", "were", "are", "which", "this", "be", "river", "castle", "music", "album",
    "song", "team", "season", "war", "city", "ship", "game", "film", "army", "king", "church", "station",
    "road",
)


def sentence(rng: random.Random, n_words: int = 12) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words)).capitalize() + " ."


def make_tokenizer(directory: Path, vocab_size: int = 300) -> str:
    """Train a byte-level BPE (the GPT-2 scheme) on generated text, saved as a GPT-2 fast tokenizer.

    Returns its path."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2TokenizerFast

    directory = Path(directory)
    if (directory / "tokenizer.json").is_file():
        return str(directory)
    rng = random.Random(0)
    corpus = [sentence(rng) + " = Title = @-@ , ; 1 2 3" for _ in range(400)]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(corpus, vocab_size=vocab_size, min_frequency=1, special_tokens=["<|endoftext|>"])
    directory.mkdir(parents=True, exist_ok=True)
    bpe.save(str(directory / "tokenizer.json"))
    tokenizer = GPT2TokenizerFast(tokenizer_file=str(directory / "tokenizer.json"), eos_token="<|endoftext|>",
                                  bos_token="<|endoftext|>", unk_token="<|endoftext|>")
    tokenizer.save_pretrained(str(directory))
    return str(directory)


def wikitext_article(rng: random.Random, title: str, n_sections: int = 2) -> str:
    """One article in the raw wiki.*.raw layout: ' = Title = ' lines surrounded by ' ' lines."""
    lines = [" ", f" = {title} = ", " ", " " + " ".join(sentence(rng) for _ in range(3)) + " "]
    for s in range(n_sections):
        lines += [" ", f" = = Section {s} = = ", " ", " " + " ".join(sentence(rng) for _ in range(4)) + " "]
        lines += [" ", f" = = = Sub {s} = = = ", " ", " " + sentence(rng) + " "]
    return "\n".join(lines) + "\n"


def write_wikitext103(directory: Path, articles: dict[str, int], seed: int = 0) -> dict[str, list[str]]:
    """Write wiki.{train,valid,test}.raw with the given numbers of articles; returns the titles per split."""
    rng = random.Random(seed)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    titles: dict[str, list[str]] = {}
    for split, count in articles.items():
        titles[split] = [f"{split.capitalize()} article {i}" for i in range(count)]
        text = "".join(wikitext_article(rng, t, n_sections=1 + i % 3) for i, t in enumerate(titles[split]))
        (directory / f"wiki.{split}.raw").write_text(text, encoding="utf-8")
    return titles


def write_pg19(directory: Path, book_ids: dict[str, list[int]], seed: int = 0) -> None:
    """Folders train/ validation/ test/ of <book id>.txt books; each book starts with 'Book <id>.'."""
    rng = random.Random(seed)
    for split, ids in book_ids.items():
        folder = Path(directory) / split
        folder.mkdir(parents=True, exist_ok=True)
        for book_id in ids:
            body = "\n\n".join(sentence(rng, 8 + book_id % 7) for _ in range(5 + book_id % 4))
            (folder / f"{book_id}.txt").write_text(f"Book {book_id}.\n\n{body}\n", encoding="utf-8")


def enwik8_like_bytes(num_bytes: int, seed: int = 0) -> bytes:
    """Wiki-markup-ish bytes with newlines and a few non-ASCII (UTF-8) characters."""
    rng = random.Random(seed)
    pieces: list[bytes] = []
    size = 0
    while size < num_bytes:
        piece = (f"<page><title>{rng.choice(WORDS)}</title>\n" + sentence(rng) + " [[Zürich]] café\n").encode()
        pieces.append(piece)
        size += len(piece)
    return b"".join(pieces)[:num_bytes]
