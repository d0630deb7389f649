"""The work behind ``python -m mymoe.generate`` (whose parser, in generate.py, imports nothing heavy):
load the model, extend its context, load the tokenizer, sample; or map vectors through the vector model.

    run(args)                          the command, on the arguments generate.parse_args returns
    apply_rope_scaling(model, scaling) context extension at inference: the rotary tables are rebuilt
    left_padded_batch(prompts)         prompts of different lengths as one batch
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

from mymoe.checkpoint import CheckpointError
from mymoe.checkpoint.retention import first_nonfinite
from mymoe.load import load_model, load_vector_model
from mymoe.model.layers import RotaryEmbedding
from mymoe.model.mla import MultiHeadLatentAttention
from mymoe.model.mtp import speculative_greedy
from mymoe.tokenizer import TokenizerError
from mymoe.tokenizer import load_tokenizer as load_any_tokenizer

KNOWN_ERRORS = (CheckpointError, OSError, RuntimeError, ValueError)  # reported in one line, not a traceback


def run(args: argparse.Namespace) -> int:
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    try:
        if args.model_type == "simple_moe":
            return map_vectors(args, device)
        return generate_text(args, device)
    except KNOWN_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


def apply_rope_scaling(model, scaling: dict) -> None:
    """Extend the context at inference: the rotary table is rebuilt as the model builds it (over the
    rotary head dim, qk_rope_head_dim for MLA) and MLA's softmax scale follows; weights are untouched."""
    config = model.config
    config.rope_scaling = scaling
    model.model.rotary_emb = RotaryEmbedding.from_config(config)
    for module in model.modules():
        if isinstance(module, MultiHeadLatentAttention):
            module.set_rope_scaling(scaling)


def context_length(config) -> str:
    """What the context now reaches, in words: `4096 positions (trained on 512, yarn x8)`."""
    scaling = config.rope_scaling or {}
    kind, factor = scaling.get("type", scaling.get("rope_type", "default")), float(scaling.get("factor", 1.0))
    trained = scaling.get("original_max_position_embeddings", config.max_position_embeddings)
    return f"{int(trained * factor)} positions (trained on {trained}, {kind} x{factor:g})"


def left_padded_batch(prompts: list[list[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of different lengths -> (input_ids [B, S], attention_mask [B, S]) padded on the left."""
    length = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, length - len(prompt) :] = torch.tensor(prompt)
        attention_mask[row, length - len(prompt) :] = 1
    return input_ids, attention_mask


def load_tokenizer(path: str, vocab_size: int):
    """A SentencePiece .model, a tokenizer.json or a Hugging Face model folder (mymoe.tokenizer)."""
    try:
        tokenizer = load_any_tokenizer(path)
    except TokenizerError as error:
        raise CheckpointError(str(error)) from None
    if tokenizer.vocab_size() > vocab_size:
        raise CheckpointError(
            f"{path} has {tokenizer.vocab_size()} pieces but the model was trained with "
            f"vocab_size={vocab_size}: use the tokenizer the training data was made with"
        )
    return tokenizer


def end_of_document_id(tokenizer) -> Optional[int]:
    """The id that ends every training document: </s> when the tokenizer has one."""
    eos = tokenizer.eos_id()
    return eos if eos >= 0 else None


@torch.no_grad()
def sample_tokens(
    model,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float,
    top_k: Optional[int],
    top_p: Optional[float],
    repetition_penalty: float,
    generator: torch.Generator,
    eos_token_id: Optional[int],
    tokenizer_size: Optional[int] = None,
    strategy: str = "sample",
    confidence_threshold: float = 0.5,
) -> Iterator[int]:
    """Yield sampled token ids one at a time for a single prompt [1, S]: model.stream, the decode loop of
    model.generate. Ids from tokenizer_size up (a vocabulary padded past the tokenizer's pieces) are never
    sampled."""
    for next_token in model.stream(
        input_ids,
        max_new_tokens,
        temperature,
        top_k,
        top_p,
        repetition_penalty,
        generator,
        eos_token_id=eos_token_id,
        vocab_limit=tokenizer_size,
        strategy=strategy,
        confidence_threshold=confidence_threshold,
    ):
        yield int(next_token)


def decoding_in_words(args: argparse.Namespace) -> str:
    if args.strategy == "dual_head":
        return (
            f"dual-head greedy decoding: the main head where its probability is >= {args.confidence_threshold}, "
            f"else the candidate head, repetition penalty {args.repetition_penalty} (temperature, top_k and "
            f"top_p unused)"
        )
    return (
        f"sampling with temperature {args.temperature}, top_k {args.top_k}, top_p {args.top_p}, "
        f"repetition penalty {args.repetition_penalty}, seed {args.seed}"
    )


def generate_text(args: argparse.Namespace, device: torch.device) -> int:
    source = args.checkpoint or args.model_path
    print(f"loading {source}{f' step {args.step}' if args.step is not None else ''} ...", file=sys.stderr)
    start = time.perf_counter()
    model, config, manifest = load_model(source, args.step)
    model.check_can_generate(args.strategy)  # an encoder, or dual_head without a candidate head: before any work
    nonfinite = first_nonfinite(model.state_dict())
    if nonfinite:
        raise CheckpointError(
            f"{source}: {nonfinite} holds nan or inf (saved by a run that diverged): "
            f"generate from an earlier, finite step with --step"
        )
    scaling = args.rope_scaling
    if scaling is None and not config.model.rope_scaling:
        scaling = args.long_context_preset  # long_transformer_moe: a model trained with a scaling keeps it
    if scaling is not None:
        apply_rope_scaling(model, scaling)
    vocab_path = args.vocab_path or config.data.tokenizer or args.fallback_vocab_path
    if not Path(vocab_path).exists():
        raise CheckpointError(
            f"--vocab-path {vocab_path} does not exist: pass a sentencepiece .model, a "
            f"tokenizer.json or a Hugging Face model folder"
        )
    tokenizer = load_tokenizer(vocab_path, config.model.vocab_size)
    model.to(device)
    print(
        f"step {manifest['step']}, {model.num_parameters() / 1e6:.2f}M parameters, "
        f"{config.model.moe.n_routed_experts} experts (saved at EP {manifest['expert_parallel_size']}), "
        f"loaded in {time.perf_counter() - start:.1f} s; {decoding_in_words(args)}",
        file=sys.stderr,
    )
    if scaling is not None or args.model_type == "long_transformer_moe":
        print(f"context length: {context_length(config.model)}", file=sys.stderr)

    eod = end_of_document_id(tokenizer)
    if args.input_file:
        return generate_batch(model, tokenizer, args, eod, device)
    prompt_ids = ([eod] if eod is not None else []) + tokenizer.encode(args.prompt)
    if not prompt_ids:
        print(
            "error: the prompt is empty and the tokenizer has no end-of-document id to start from; give --prompt",
            file=sys.stderr,
        )
        return 1
    generator = torch.Generator(device=device).manual_seed(args.seed)
    input_ids = torch.tensor([prompt_ids], device=device)
    if args.speculative:
        return generate_speculative(model, tokenizer, args, input_ids)
    new_ids: list[int] = []
    printed = args.prompt
    if not args.no_stream:
        print(args.prompt, end="", flush=True)
    start = time.perf_counter()
    for token in sample_tokens(
        model,
        input_ids,
        args.max_new_tokens,
        args.temperature,
        args.top_k or None,
        args.top_p if args.top_p < 1 else None,
        args.repetition_penalty,
        generator,
        eod,
        tokenizer.vocab_size(),
        args.strategy,
        args.confidence_threshold,
    ):
        new_ids.append(token)
        text = args.prompt + tokenizer.decode([t for t in new_ids if t != eod])
        if not args.no_stream and text.startswith(printed):
            print(text[len(printed) :], end="", flush=True)
            printed = text
    text = args.prompt + tokenizer.decode([t for t in new_ids if t != eod])
    print(text if args.no_stream else text[len(printed) :] if text.startswith(printed) else "\n" + text, flush=True)
    elapsed = time.perf_counter() - start
    print(
        f"generated {len(new_ids)} tokens in {elapsed:.2f} s ({len(new_ids) / max(elapsed, 1e-9):.1f} tokens/s)"
        f"{', stopped at end of document' if new_ids and new_ids[-1] == eod else ''}",
        file=sys.stderr,
    )
    return 0


@contextlib.contextmanager
def tokenizer_ids_only(model, size: int):
    """Ids past the tokenizer's pieces (a padded vocabulary) are never chosen by speculative decoding, which
    has its own loop (draft, then verify); model.stream masks them itself."""
    hook = model.lm_head.register_forward_hook(
        lambda module, inputs, logits: logits.index_fill(
            -1, torch.arange(size, logits.shape[-1], device=logits.device), float("-inf")
        )
    )
    try:
        yield
    finally:
        hook.remove()


def generate_speculative(model, tokenizer, args, input_ids: torch.Tensor) -> int:
    """Self-speculative greedy decoding of one prompt; reports how often the drafts were accepted."""
    if model.mtp is None:
        print(
            "error: --speculative needs a model trained with a multi-token prediction head "
            "(model.num_nextn_predict_layers=1)",
            file=sys.stderr,
        )
        return 1
    start = time.perf_counter()
    with tokenizer_ids_only(model, tokenizer.vocab_size()):
        result = speculative_greedy(model.eval(), input_ids, args.max_new_tokens)
    new_ids = result.tokens[0, input_ids.shape[1] :].tolist()
    print(args.prompt + tokenizer.decode(new_ids), flush=True)
    elapsed = time.perf_counter() - start
    print(
        f"generated {len(new_ids)} tokens greedily in {elapsed:.2f} s with {result.drafts} main-model steps; "
        f"draft acceptance rate {result.acceptance_rate:.2f}",
        file=sys.stderr,
    )
    return 0


def generate_batch(model, tokenizer, args, eod: Optional[int], device) -> int:
    """Every line of --input-file as one left-padded batch; one output line per prompt."""
    with open(args.input_file) as f:
        lines = [line.rstrip("\n") for line in f if line.strip()]
    if not lines:
        print(f"error: {args.input_file} has no prompts (one per line)", file=sys.stderr)
        return 1
    prompts = [([eod] if eod is not None else []) + tokenizer.encode(line) for line in lines]
    input_ids, attention_mask = left_padded_batch(prompts)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    start = time.perf_counter()
    tokens = model.generate(
        input_ids.to(device),
        args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k or None,
        top_p=args.top_p if args.top_p < 1 else None,
        repetition_penalty=args.repetition_penalty,
        generator=generator,
        attention_mask=attention_mask.to(device),
        eos_token_id=eod,
        vocab_limit=tokenizer.vocab_size(),
        strategy=args.strategy,
        confidence_threshold=args.confidence_threshold,
    )
    new_tokens = 0
    for line, row in zip(lines, tokens[:, input_ids.shape[1] :].tolist()):
        if eod is not None and eod in row:
            row = row[: row.index(eod)]
        new_tokens += len(row)
        print(line + tokenizer.decode(row), flush=True)
    print(
        f"generated {new_tokens} tokens for {len(lines)} prompts in {time.perf_counter() - start:.2f} s",
        file=sys.stderr,
    )
    return 0


def read_vectors(path: str) -> np.ndarray:
    """Rows [N, features] from a .npy file, a .csv file, or CSV rows on stdin when path is ""."""
    if not path:
        if sys.stdin.isatty():
            raise ValueError(
                "--model-type simple_moe needs vectors: --input-file rows.npy or rows.csv, or CSV rows piped on stdin"
            )
        return np.loadtxt(sys.stdin, delimiter=",", dtype=np.float32, ndmin=2)
    if path.endswith(".npy"):
        vectors = np.load(path, allow_pickle=False)
    elif path.endswith(".csv"):
        vectors = np.loadtxt(path, delimiter=",", dtype=np.float32, ndmin=2)
    else:
        raise ValueError(f"--input-file {path}: simple_moe reads .npy or .csv (or stdin with --input-file '')")
    return vectors.reshape(1, -1) if vectors.ndim == 1 else vectors


def write_vectors(path: str, vectors: np.ndarray) -> str:
    """To a .npy or .csv file, or CSV on stdout when path is ""; returns where they went, in words."""
    if path.endswith(".npy"):
        np.save(path, vectors)
    elif path.endswith(".csv") or not path:
        np.savetxt(path or sys.stdout, vectors, delimiter=",", fmt="%.9g")
    else:
        raise ValueError(f"--output-file {path}: simple_moe writes .npy or .csv (or stdout with --output-file '')")
    return path or "stdout"


@torch.no_grad()
def map_vectors(args: argparse.Namespace, device: torch.device) -> int:
    """simple_moe: every input row through the vector model, the output rows written out."""
    torch.manual_seed(args.seed)
    model = load_vector_model(args.model_path).to(device)
    vectors = read_vectors(args.input_file)
    if vectors.ndim != 2 or vectors.shape[1] != model.in_features:
        raise ValueError(
            f"{args.input_file or 'stdin'} holds rows of shape {tuple(vectors.shape)}: the model at "
            f"{args.model_path} reads rows of {model.in_features} features"
        )
    print(
        f"simple_moe: {model.num_parameters() / 1e6:.2f}M parameters, {model.in_features} -> "
        f"{model.out_features} features, {len(vectors)} rows",
        file=sys.stderr,
    )
    output = model(torch.as_tensor(vectors, dtype=torch.float32, device=device)).output.cpu().numpy()
    where = write_vectors(args.output_file, output)
    print(f"wrote {len(output)} vectors of {model.out_features} features to {where}", file=sys.stderr)
    return 0
