"""Real text for the benchmarks: books of the shared corpus, tokenised by data_tools into .bin/.idx, cached.

A SentencePiece BPE tokenizer is trained on the training books only; the training books and the held-out
books are tokenised with it into two prefixes (one document per paragraph). Everything lands in a folder
under ``cache_dir`` named after the book lists and the vocabulary size, and is reused when it exists.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from data_tools.cli import main as data_tools

# the corpus sits next to the repository (/work/shared/data/corpus beside /work/<checkout>)
DEFAULT_CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "corpus"

# about 2.5 M tokens of six novels and histories, and 180 k tokens of two other authors' books
TRAIN_BOOKS = [
    "dickens__dombey_and_son.txt",
    "dickens__david_copperfield.txt",
    "collins__armadale.txt",
    "bronte__shirley.txt",
    "melville__moby_dick_or_the_whale.txt",
    "doyle__the_great_boer_war.txt",
]
VALID_BOOKS = ["austen__persuasion.txt", "twain__the_mysterious_stranger_a_romance.txt"]


@dataclass
class Books:
    tokenizer: str  # the .model file
    train_prefix: str
    valid_prefix: str


def prepare_books(
    corpus: Path, cache_dir: Path, train_books=TRAIN_BOOKS, valid_books=VALID_BOOKS, vocab_size: int = 8192
) -> Books:
    """Tokenise the books (once; later calls reuse the files) and name the tokenizer and the two prefixes."""
    missing = [book for book in list(train_books) + list(valid_books) if not (corpus / book).is_file()]
    if missing:
        raise SystemExit(f"error: {', '.join(missing)} not found in {corpus}: pass --corpus <folder with the books>")
    overlap = sorted(set(train_books) & set(valid_books))
    if overlap:
        raise SystemExit(f"error: {', '.join(overlap)} both trained on and held out: a held-out book must be unseen")
    key = hashlib.sha1(repr((sorted(train_books), sorted(valid_books), vocab_size)).encode()).hexdigest()[:10]
    folder = cache_dir / f"books-{key}"
    books = Books(str(folder / "tok.model"), str(folder / "train"), str(folder / "valid"))
    if Path(books.valid_prefix + ".idx").is_file():
        print(f"reusing the tokenised books in {folder}")
        return books
    folder.mkdir(parents=True, exist_ok=True)
    train_files = [str(corpus / book) for book in train_books]
    steps = (
        ["train-tokenizer", "--input", *train_files, "--vocab-size", str(vocab_size), "--output", str(folder / "tok")],
        ["preprocess", "--input", *train_files, "--tokenizer", books.tokenizer, "--output", books.train_prefix],
        ["preprocess", "--input", *[str(corpus / book) for book in valid_books], "--tokenizer", books.tokenizer]
        + ["--output", books.valid_prefix],
    )
    for argv in steps:
        # the held-out prefix is written last, so its presence says the folder is complete
        if data_tools([*argv, "--txt-unit", "paragraph", "--overwrite", "--quiet"]) != 0:
            raise SystemExit(f"error: python -m data_tools {' '.join(argv)} failed (its message is above)")
    return books
