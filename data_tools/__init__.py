"""Data tools: train a tokenizer, turn a text corpus into Megatron `.bin/.idx` files, inspect them.

    python -m data_tools train-tokenizer --input corpus/ --output tok --vocab-size 8000
    python -m data_tools preprocess --input corpus/ --tokenizer tok.model --output data/books
    python -m data_tools merge --output data/all data/part1 data/part2
    python -m data_tools inspect data/books --tokenizer tok.model
    mpiexec -n 4 python -m data_tools preprocess --mpi --input corpus/ --tokenizer tok.model ...

Offline, for the quickstart: `--input builtin:stdlib` reads about 4 MB of the local Python standard
library's source, so both commands run in seconds without a download.

Layout: cli.py (argument parsing, `main`), corpus.py (find inputs, read documents, count bad
input), builtin_corpus.py (the offline `builtin:stdlib` corpus), tokenizer.py (SentencePiece
training), encode.py (the worker side of preprocessing), indexed_io.py (dtype choice, staging and
publishing `.bin/.idx` pairs), split.py (train/valid split), preprocess.py (local and MPI),
merge.py, inspect_dataset.py (the commands).
The training-side reader of the files is `mymoe.data`.
"""


class DataError(Exception):
    """Bad input or settings; the message names the bad value and the fix."""


def count_of(number: int, noun: str) -> str:
    """'1 file', '2,000 files': counts in messages read as sentences."""
    return f"{number:,} {noun}" + ("" if number == 1 else "s")
