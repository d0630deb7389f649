"""The start-up pass over every input a run will read, before any process group or model exists: each data
prefix opened and its token ids checked against the vocabulary, the tokenizer loaded, and a memory
estimate held against the machine. A problem found here is one ConfigError naming the input and the fix;
found later, it would cost the run (a truncated validation prefix fails at the first evaluation, an id
beyond the vocabulary is an IndexError in the embedding, a device-side assert on a GPU).

Pure and rank-independent (every rank reaches the same verdict); what was scanned once is remembered by
path, size and modification time, so calling it again is free.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from mymoe.config import Config, ConfigError
from mymoe.data.indexed import IndexedTokens
from mymoe.model import MoECausalLM

_scanned: dict = {}  # (path, size, mtime) -> (min id, max id, tokens)
BYTES_PER_TRAINED_PARAMETER = 16  # fp32 weight, gradient and two AdamW moments


def check_inputs(config: Config) -> None:
    check_positions(config)
    check_memory(config)
    check_prefixes(config)
    check_tokenizer(config)


def check_positions(config: Config) -> None:
    """A training sequence must fit the model's positions (rope scaling stretches max_position_embeddings)."""
    m = config.model
    positions = int(m.max_position_embeddings * ((m.rope_scaling or {}).get("factor") or 1))
    if config.data.seq_len > positions:
        raise ConfigError(
            f"data.seq_len={config.data.seq_len} is longer than the model's positions "
            f"(model.max_position_embeddings={m.max_position_embeddings}): lower --data.seq_len or "
            f"raise --model.max_position_embeddings"
        )


def token_range(prefix: str) -> tuple[int, int, int]:
    """(smallest id, largest id, token count) of one .bin/.idx pair; ConfigError naming the file if it is bad."""
    bin_file = Path(f"{prefix}.bin")
    stat = bin_file.stat() if bin_file.is_file() else None
    key = (str(bin_file), stat and stat.st_size, stat and stat.st_mtime_ns)
    if key not in _scanned:
        try:
            dataset = IndexedTokens(prefix)
        except (ValueError, OSError) as error:
            raise ConfigError(f"{error}") from None
        tokens = dataset.tokens
        chunk = 1 << 26
        low = min((int(tokens[i : i + chunk].min()) for i in range(0, len(tokens), chunk)), default=0)
        high = max((int(tokens[i : i + chunk].max()) for i in range(0, len(tokens), chunk)), default=0)
        _scanned[key] = (low, high, dataset.num_tokens)
    return _scanned[key]


def check_prefixes(config: Config) -> None:
    vocab_size, seq_len = config.model.vocab_size, config.data.seq_len
    for field_name in ("train_prefixes", "valid_prefixes"):
        for prefix in getattr(config.data, field_name):
            check_prefix(
                prefix,
                seq_len,
                vocab_size,
                f"data.{field_name}",
                "data.seq_len",
                "lower --data.seq_len or add data",
                "the data was tokenized with another vocabulary; re-tokenize it or set "
                "--model.vocab_size={needed} or more",
            )


def check_prefix(
    prefix: str, seq_len: int, vocab_size: int, where: str, seq_len_name: str, seq_len_fix: str, vocab_fix: str
) -> None:
    """A prefix yields at least one sample and every id is inside the vocabulary (training's and evaluation's
    check); `vocab_fix` may name {needed}, the vocabulary size the data asks for."""
    low, high, count = token_range(prefix)
    if count - 1 < seq_len:
        raise ConfigError(
            f"{where}: {prefix}.bin holds {count} tokens, fewer than {seq_len_name} + 1 = {seq_len + 1}, so it "
            f"yields no sample: {seq_len_fix}"
        )
    if high >= vocab_size or low < 0:
        bad = high if high >= vocab_size else low
        raise ConfigError(
            f"{where}: {prefix}.bin holds token id {bad}, outside model.vocab_size={vocab_size} (ids "
            f"0..{vocab_size - 1}): " + vocab_fix.format(needed=high + 1)
        )


def check_tokenizer(config: Config) -> None:
    path = config.data.tokenizer
    if not path:
        return
    if not Path(path).is_file():
        raise ConfigError(
            f"data.tokenizer={path} does not exist: give the sentencepiece .model the data was "
            f"tokenized with (python -m data_tools train-tokenizer makes one), or leave it unset"
        )
    import sentencepiece

    try:
        pieces = sentencepiece.SentencePieceProcessor(model_file=str(path)).vocab_size()
    except (RuntimeError, OSError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(
            f"data.tokenizer={path} is not a sentencepiece model ({first}): give the .model file "
            f"written by the tokenizer trainer"
        ) from None
    if pieces > config.model.vocab_size:
        raise ConfigError(
            f"data.tokenizer={path} has {pieces} pieces but model.vocab_size={config.model.vocab_size}: "
            f"set --model.vocab_size={pieces} or more"
        )


def parameters_per_rank(config: Config) -> int:
    """Parameters one rank holds: the dense ones and its share of the experts (the model built on meta)."""

    class Shapes(MoECausalLM):
        def reset_parameters(self) -> None:  # only the shapes are wanted (and meta tensors cannot be drawn)
            pass

    with torch.device("meta"):
        model = Shapes(config.model)
    dense = sum(p.numel() for p in model.parameters() if not getattr(p, "is_expert", False))
    experts = sum(p.numel() for p in model.parameters() if getattr(p, "is_expert", False))
    return dense + experts // config.parallel.expert_parallel_size


def estimate_bytes(config: Config) -> int:
    """A rough upper estimate of one rank's training memory: weights, gradients, AdamW state, the activations
    kept for backward (fp32; attention through SDPA's fused kernels, so no seq x seq scores) and the logits."""
    m, moe = config.model, config.model.moe
    tokens = config.train.micro_batch_size * config.data.seq_len
    routed = moe.num_experts_per_tok * (2 * m.hidden_size + 3 * moe.moe_intermediate_size)
    shared = 3 * (moe.shared_expert_intermediate_size or moe.n_shared_experts * moe.moe_intermediate_size)
    per_layer = 16 * m.hidden_size + routed + shared  # values kept per token for backward
    layers = 1 + (m.num_hidden_layers if not m.gradient_checkpointing else 1)
    activations = 4 * tokens * (per_layer * layers + m.num_hidden_layers * m.hidden_size)
    logits = 4 * tokens * m.vocab_size * 3  # logits, their softmax and gradient
    return BYTES_PER_TRAINED_PARAMETER * parameters_per_rank(config) + activations + logits


def memory_per_rank() -> tuple[int, str]:
    """(bytes one rank may use, what they are) on this machine."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory, "GPU memory"
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return total // max(local, 1), f"RAM ({local} process{'es' if local > 1 else ''} on this machine)"


def check_memory(config: Config) -> None:
    needed = estimate_bytes(config)
    available, what = memory_per_rank()
    if needed > available:
        raise ConfigError(
            f"this run needs about {needed / 2**30:.1f} GiB per process but has {available / 2**30:.1f} GiB of "
            f"{what}: lower --data.seq_len={config.data.seq_len} or --train.micro_batch_size="
            f"{config.train.micro_batch_size} (raising train.gradient_accumulation_steps keeps the batch), or "
            f"turn on --model.gradient_checkpointing=true"
        )
