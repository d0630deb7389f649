"""Split one `.bin/.idx` pair into a training and a validation pair, by document.

V of the T documents go to validation, evenly spread over the corpus rather than taken from its
end (where one source file would fill it): document j (0-based) is a validation document when
floor((j + 1) V / T) > floor(j V / T). The rule depends only on j, V and T, so the split is the
same however the documents were tokenized.
"""

import numpy as np
from tqdm import tqdm

from data_tools import DataError
from data_tools.indexed_io import pair_paths
from mymoe.data.indexed import IndexedWriter


def validation_count(total: int, split: float | None, valid_docs: int | None) -> int:
    """How many of `total` documents go to validation; raise when a side would be empty."""
    if valid_docs is not None:
        count = valid_docs
        fix = "lower --valid-docs"
    else:
        count = max(1, round(total * (1 - split)))
        fix = "raise --split or add documents"
    if count >= total:
        raise DataError(f"{count:,} validation documents out of {total:,} written leaves none for training; {fix}")
    return count


def validation_mask(total: int, valid_count: int) -> np.ndarray:
    """[total] bool, True for the `valid_count` validation documents, evenly spread."""
    j = np.arange(total, dtype=np.int64)
    return (j + 1) * valid_count // total > j * valid_count // total


def split_pair(
    data, valid_count: int, train_prefix: str, valid_prefix: str, dtype, progress: bool
) -> tuple[list[int], list[int]]:
    """Write `data` (an IndexedTokens) as two pairs; ([train, valid] documents, [.., ..] tokens)."""
    total = data.num_documents
    lengths = data.document_lengths()
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    is_valid = validation_mask(total, valid_count)
    builders = [IndexedWriter(pair_paths(p)[0], dtype=dtype) for p in (train_prefix, valid_prefix)]
    rows = zip(starts.tolist(), lengths.tolist(), is_valid.tolist())
    for start, length, valid in tqdm(rows, total=total, desc="splitting", unit="doc", disable=not progress):
        builders[valid].add_document(data.tokens[start : start + length], [length])
    for builder, prefix in zip(builders, (train_prefix, valid_prefix)):
        builder.finalize(pair_paths(prefix)[1])
    documents = [total - valid_count, valid_count]
    tokens = [int(lengths[~is_valid].sum()), int(lengths[is_valid].sum())]
    return documents, tokens
