"""Shared helpers of the training and launcher tests (no tests here): a tiny learnable token dataset
written as Megatron `.bin/.idx` files, and a shortened configs/tiny.yaml pointing at it.

The documents follow a fixed random bigram chain over the first ACTIVE_TOKENS ids (each has one
successor, chosen once), so a model that learns the chain drives its loss from ln(vocab) ~ 6.9 towards
0 within a few dozen steps: "the loss fell" is a property of the trainer, not of luck.
"""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "configs" / "tiny.yaml"
ACTIVE_TOKENS = 48  # of configs/tiny.yaml's 1024


def write_indexed(prefix: Path, documents: list[np.ndarray]) -> str:
    """Write documents (1-D int arrays) as prefix.bin/.idx with megatron-core's builder."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # megatron.core warns that Transformer Engine and Apex are missing
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    prefix.parent.mkdir(parents=True, exist_ok=True)
    builder = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=np.uint16)
    for document in documents:
        builder.add_document(np.asarray(document, dtype=np.uint16), [len(document)])
    builder.finalize(str(prefix) + ".idx")
    return str(prefix)


def bigram_documents(count: int, length: int, seed: int) -> list[np.ndarray]:
    """Documents walking one fixed successor table (the same for every seed) from random starts."""
    successor = np.random.default_rng(0).permutation(ACTIVE_TOKENS)
    rng = np.random.default_rng(seed)
    documents = []
    for _ in range(count):
        tokens = np.empty(length, dtype=np.int64)
        tokens[0] = rng.integers(ACTIVE_TOKENS)
        for i in range(1, length):
            tokens[i] = successor[tokens[i - 1]]
        documents.append(tokens)
    return documents


def make_dataset(folder: Path) -> tuple[str, str]:
    """(train prefix, valid prefix) of a small bigram corpus under folder."""
    train = write_indexed(folder / "bigram_train", bigram_documents(64, 257, seed=1))
    valid = write_indexed(folder / "bigram_valid", bigram_documents(8, 257, seed=2))
    return train, valid


def tiny_overrides(train_prefix: str, valid_prefix: str, out_dir: Path, steps: int = 20,
                   extra: dict | None = None) -> list[str]:
    """Command-line overrides that shorten configs/tiny.yaml to a test-sized run; extra adds or replaces
    dotted keys ({"parallel.expert_parallel_size": 2})."""
    values = {"data.train_prefixes": f"[{train_prefix}]", "data.valid_prefixes": f"[{valid_prefix}]",
              "train.max_steps": steps, "train.warmup_steps": 2, "train.micro_batch_size": 4,
              "train.eval_interval": steps, "train.eval_steps": 1, "train.out_dir": str(out_dir)}
    values.update(extra or {})
    return [f"--{key}={value}" for key, value in values.items()]


def python() -> str:
    return sys.executable
