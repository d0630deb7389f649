"""Score a checkpoint on datasets: load it whole through mymoe.load, read each prefix once in file order
(mymoe.data.reader.FileOrderBatches) and sum its lm loss with the trainer's evaluation (sum_lm_loss)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from itertools import islice
from typing import Optional

import torch
from tqdm import tqdm

from mymoe.checkpoint import CheckpointError
from mymoe.config import ConfigError
from mymoe.data.reader import FileOrderBatches
from mymoe.load import load_model
from mymoe.tokenizer import TokenizerError, load_tokenizer
from mymoe.train.evaluation import LossSum, perplexity, sum_lm_loss
from mymoe.train.preflight import check_prefix as check_prefix_as_training

ONE_LINE_ERRORS = (CheckpointError, ConfigError, TokenizerError)


def evaluate(
    checkpoint: str,
    prefixes: list[str],
    step: Optional[int] = None,
    seq_len: Optional[int] = None,
    batch_size: Optional[int] = None,
    max_batches: Optional[int] = None,
    tokenizer: Optional[str] = None,
    device: Optional[str] = None,
    progress: bool = True,
    announce: Callable[[str], None] = print,
) -> dict:
    """{"checkpoint", "step", "seq_len", "batch_size", "datasets": [one result per prefix], "overall"}, each
    result {"tokens", "batches", "loss", "perplexity"} (and "bits_per_byte" with a tokenizer); `announce`
    gets what is about to be done and a line per dataset."""
    model, config, manifest = load_model(checkpoint, step)
    seq_len = seq_len or config.data.seq_len
    batch_size = batch_size or config.train.micro_batch_size
    check_positions(config.model, seq_len)
    for prefix in prefixes:
        check_prefix(prefix, seq_len, config.model.vocab_size)
    text = load_checked_tokenizer(tokenizer, config.model.vocab_size) if tokenizer else None
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(device)
    limit = f"at most {max_batches} batches each" if max_batches else "every sample once"
    announce(
        f"evaluating {checkpoint} (step {manifest['step']}, {model.num_parameters() / 1e6:.2f}M parameters) "
        f"on {len(prefixes)} dataset{'s' if len(prefixes) > 1 else ''}: seq_len {seq_len}, batch {batch_size}, "
        f"{limit}, on {device}"
    )

    results, overall, overall_bytes = [], LossSum(), 0
    for prefix in prefixes:
        batches = FileOrderBatches(prefix, seq_len, batch_size)
        count = min(len(batches), max_batches or len(batches))
        summed = score(model, islice(batches, count), config, device, count, prefix, progress)
        overall.add(summed)
        text_bytes = None
        if text is not None:  # the text whose tokens were scored, decoded in one piece
            scored = batches.label_tokens(summed.tokens // seq_len).tolist()
            text_bytes = len(text.decode(scored).encode("utf-8"))
            overall_bytes += text_bytes
        result = summary(summed, text_bytes)
        results.append({"data": prefix, **result})
        bits = f", {result['bits_per_byte']:.4f} bits per byte" if text is not None else ""
        announce(
            f"{prefix}: loss {result['loss']:.4f}, perplexity {result['perplexity']:.2f}{bits} over "
            f"{summed.tokens:,} tokens ({summed.batches} of {len(batches)} batches)"
        )
    return {
        "checkpoint": str(checkpoint),
        "step": manifest["step"],
        "seq_len": seq_len,
        "batch_size": batch_size,
        "datasets": results,
        "overall": summary(overall, overall_bytes if text is not None else None),
    }


def score(model, batches: Iterable, config, device: torch.device, count: int, prefix: str, progress: bool) -> LossSum:
    """sum_lm_loss over the batches, with a progress bar of `count` batches when asked."""
    if not progress:
        return sum_lm_loss(model, batches, config, device)
    with tqdm(total=count, desc=prefix, unit="batch", dynamic_ncols=True, leave=False) as bar:

        def advance(total: LossSum) -> None:
            bar.set_postfix(loss=f"{total.loss:.4f}", refresh=False)
            bar.update()

        return sum_lm_loss(model, batches, config, device, after_batch=advance)


def summary(summed: LossSum, text_bytes: Optional[int]) -> dict:
    result = {
        "tokens": summed.tokens,
        "batches": summed.batches,
        "loss": summed.loss,
        "perplexity": perplexity(summed.loss),
    }
    if text_bytes is not None:
        result["bits_per_byte"] = summed.nats / math.log(2) / max(text_bytes, 1)
    return result


def check_positions(model_config, seq_len: int) -> None:
    positions = int(model_config.max_position_embeddings * ((model_config.rope_scaling or {}).get("factor") or 1))
    if seq_len > positions:
        raise ConfigError(
            f"--seq-len={seq_len} is longer than the model's positions (max_position_embeddings="
            f"{model_config.max_position_embeddings}): pass --seq-len {positions} or less"
        )


def check_prefix(prefix: str, seq_len: int, vocab_size: int) -> None:
    """The checks training makes of a prefix: a sample's worth of tokens, every id inside the vocabulary."""
    check_prefix_as_training(
        prefix,
        seq_len,
        vocab_size,
        f"--data {prefix}",
        "seq_len",
        "pass a smaller --seq-len",
        "the data was tokenized with another tokenizer than this model's",
    )


def load_checked_tokenizer(path: str, vocab_size: int):
    tokenizer = load_tokenizer(path)
    if tokenizer.vocab_size() > vocab_size:
        raise ConfigError(
            f"--tokenizer {path} has {tokenizer.vocab_size()} pieces but the model's vocabulary has "
            f"{vocab_size}: it is not the tokenizer of this model's data"
        )
    return tokenizer
