"""Shared helpers for the data_tools tests (no tests here): small corpora made on the spot, one
small tokenizer per test session, and a quiet preprocess call.

Tokenizers are tiny (vocab 400, a few hundred lines) so that training one takes about a second.
"""

import json
import os
import random
from pathlib import Path

import numpy as np
import pytest

from data_tools.preprocess import PreprocessOptions, preprocess
from data_tools.tokenizer import TokenizerOptions, check_tokenizer_options, train_tokenizer
from data_tools.corpus import resolve_inputs

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_CORPUS = REPO_ROOT.parent / "shared" / "data" / "corpus"
WORDS = (
    "the a river stone light house garden winter morning letter window quiet old young she he "
    "walked said found looked under over through and but because while when never always small "
    "bright dark table story friend mother father road city field evening before after"
).split()
SPECIAL_TOKENS = ["<|user|>", "<|assistant|>"]


def sentences(seed: int, count: int) -> list[str]:
    rng = random.Random(seed)
    return [
        " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14))).capitalize() + "."
        for _ in range(count)
    ]


def documents(seed: int, count: int) -> list[str]:
    """`count` documents of 1-5 lines, some with indentation and non-ASCII text."""
    rng = random.Random(seed)
    lines = sentences(seed, count * 5)
    docs = []
    for i in range(count):
        body = "\n".join(lines[i * 5 : i * 5 + rng.randint(1, 5)])
        if i % 7 == 3:
            body += "\n    indented(x) -> café, naïve, 日本"
        docs.append(body)
    return docs


def write_jsonl(path: Path, texts: list[str], key: str = "text") -> Path:
    path.write_text("".join(json.dumps({key: t, "id": i}) + "\n" for i, t in enumerate(texts)))
    return path


def write_txt_files(folder: Path, texts: list[str]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, text in enumerate(texts):
        path = folder / f"doc{i:04d}.txt"
        path.write_text(text, encoding="utf-8")
        paths.append(path)
    return paths


def train_small_tokenizer(folder: Path, normalization: str = "identity") -> str:
    corpus = write_jsonl(folder / "tokenizer_corpus.jsonl", documents(seed=99, count=300))
    options = TokenizerOptions(
        inputs=[str(corpus)], output=str(folder / f"tok_{normalization}"), vocab_size=400,
        special_tokens=SPECIAL_TOKENS, normalization=normalization, num_threads=1,
        progress=False,
    )
    check_tokenizer_options(options)
    return train_tokenizer(options, resolve_inputs(options.inputs)).model_path


@pytest.fixture(scope="session")
def tokenizer_model(tmp_path_factory) -> str:
    return train_small_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def nfkc_tokenizer_model(tmp_path_factory) -> str:
    """A tokenizer that drops control characters, so some documents tokenize to nothing."""
    return train_small_tokenizer(tmp_path_factory.mktemp("tokenizer_nfkc"), "nmt_nfkc")


def run_preprocess(inputs, output, tokenizer, **settings):
    options = PreprocessOptions(
        inputs=[str(p) for p in inputs], output=str(output), tokenizer=tokenizer,
        progress=False, **settings,
    )
    return preprocess(options, announce=lambda line: None)


def pair_bytes(prefix) -> tuple[bytes, bytes]:
    return Path(f"{prefix}.bin").read_bytes(), Path(f"{prefix}.idx").read_bytes()


def megatron_documents(prefix) -> list[list[int]]:
    """Every document of a pair, read by megatron-core's own IndexedDataset."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(str(prefix), mmap=True)
    indices = dataset.document_indices
    docs = []
    for d in range(len(indices) - 1):
        pieces = [dataset[s] for s in range(indices[d], indices[d + 1])]
        docs.append(np.concatenate(pieces).tolist() if pieces else [])
    return docs


def leftover_staging(folder) -> list[str]:
    return [name for name in os.listdir(folder) if ".partial-" in name]
