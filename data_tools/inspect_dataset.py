"""`inspect`: what a `.bin/.idx` pair holds: counts, a histogram of document lengths, and samples.

    python -m data_tools inspect data/quickstart_train --tokenizer data/quickstart_tok.model

Works on any Megatron indexed dataset, ours or Megatron-LM's. With the tokenizer it also decodes a
few documents and checks that every token id is inside the vocabulary and that documents end with
EOD, the two things a mismatched tokenizer gets wrong.
"""

import numpy as np
from tqdm import tqdm

from data_tools import DataError
from data_tools.tokenizer import load_tokenizer
from mymoe.data.indexed import IndexedTokens

SCAN_TOKENS = 1 << 26  # tokens per step of the id range scan (128 MB of uint16)
BAR_WIDTH = 40


def inspect_dataset(
    prefix: str, tokenizer_path: str | None = None, samples: int = 2, max_chars: int = 400, progress: bool = True
) -> list[str]:
    """The report, as lines."""
    try:
        data = IndexedTokens(prefix)
    except (FileNotFoundError, ValueError) as error:
        raise DataError(str(error)) from None
    lengths = data.document_lengths()
    lines = [
        f"{data.prefix}.{{bin,idx}}: {data.num_documents:,} documents, "
        f"{data.num_sequences:,} sequences, {data.num_tokens:,} tokens of {data.dtype.name}"
    ]
    if data.num_documents == 0:
        return lines
    lines.append(
        f"document length in tokens: min {lengths.min():,}, median {int(np.median(lengths)):,}, "
        f"mean {lengths.mean():,.1f}, max {lengths.max():,}"
    )
    lines += length_histogram(lengths)
    low, high = token_id_range(data.tokens, progress)
    lines.append(f"token ids: {low:,} to {high:,}")
    if tokenizer_path is not None:
        lines += _check_and_decode(data, tokenizer_path, high, samples, max_chars)
    return lines


def length_histogram(lengths: np.ndarray) -> list[str]:
    """Documents per power-of-two length bucket, as text bars."""
    buckets = np.floor(np.log2(np.maximum(lengths, 1))).astype(int)
    counts = np.bincount(buckets)
    widest = counts.max()
    lines = []
    for bucket, count in enumerate(counts.tolist()):
        if count == 0:
            continue
        low, high = 2**bucket, 2 ** (bucket + 1) - 1
        bar = "#" * max(1, round(BAR_WIDTH * count / widest))
        lines.append(f"  {low:>9,} - {high:<9,} {count:>10,}  {bar}")
    return lines


def token_id_range(tokens: np.ndarray, progress: bool) -> tuple[int, int]:
    low, high = None, None
    steps = range(0, len(tokens), SCAN_TOKENS)
    quiet = not progress or len(steps) < 2
    for start in tqdm(steps, desc="scanning ids", unit="step", disable=quiet):
        chunk = tokens[start : start + SCAN_TOKENS]
        low = int(chunk.min()) if low is None else min(low, int(chunk.min()))
        high = int(chunk.max()) if high is None else max(high, int(chunk.max()))
    return low, high


def _check_and_decode(data, tokenizer_path, high, samples, max_chars) -> list[str]:
    tokenizer = load_tokenizer(tokenizer_path)
    vocab_size, eod = tokenizer.vocab_size(), tokenizer.eos_id()
    lines = []
    if high >= vocab_size:
        lines.append(
            f"WARNING: token id {high:,} is outside the vocabulary of {tokenizer_path} "
            f"({vocab_size:,} pieces); these files were made with another tokenizer"
        )
    ends = np.cumsum(data.document_lengths()) - 1
    ending_with_eod = int(np.count_nonzero(data.tokens[ends] == eod))
    lines.append(f"documents ending with EOD (id {eod}): {ending_with_eod:,} of {data.num_documents:,}")
    # Evenly spaced documents: the first and the last, and some between.
    picks = np.linspace(0, data.num_documents - 1, min(samples, data.num_documents))
    for index in picks.round().astype(int).tolist():
        ids = data.document(index).tolist()
        text = tokenizer.decode([i for i in ids if i < vocab_size])
        shown = text[:max_chars] + (" ..." if len(text) > max_chars else "")
        lines.append(f"--- document {index:,} ({len(ids):,} tokens) ---")
        lines.append(shown)
    return lines
