"""Generate text from a sharded checkpoint, a consolidated file or a Hugging Face export, in one process.

    python -m mymoe.generate --checkpoint runs/x/checkpoints --vocab-path tok.model \\
        --prompt "Once upon a time" --max-new-tokens 50 --temperature 0.8 --top-k 50 --top-p 0.9 --seed 0

Every expert is loaded into one model (the checkpoint addresses experts by global index), the prompt is
encoded with the tokenizer (SentencePiece or Hugging Face, mymoe.tokenizer) and, like every training
document, follows an end-of-document token; tokens are printed as they are sampled, with a KV cache, until max_new_tokens or end of document.

    --model-path PATH       instead of --checkpoint: a checkpoints folder, a consolidated .safetensors file
                            (mymoe-convert consolidate) or a Hugging Face folder (any family import-hf reads)
    --input-file FILE       one prompt per line, generated as one left-padded batch, one output line each
    --rope-scaling SPEC     context extension at inference: yarn:4, dynamic:2, linear:2 or a JSON mapping
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from typing import Iterator, Optional

import torch

from mymoe.checkpoint import CheckpointError
from mymoe.checkpoint.retention import first_nonfinite
from mymoe.config import ConfigError, validate_rope_scaling
from mymoe.load import load_model
from mymoe.model.layers import RotaryEmbedding
from mymoe.model.mtp import speculative_greedy
from mymoe.tokenizer import TokenizerError
from mymoe.tokenizer import load_tokenizer as load_any_tokenizer


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="mymoe-generate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=None,
                        help="checkpoints folder of a run (its `latest` is used) or one step_* folder")
    parser.add_argument("--model-path", "--model_path", default=None,
                        help="a checkpoints folder, consolidated .safetensors file or Hugging Face folder (instead "
                             "of --checkpoint)")
    parser.add_argument("--input-file", "--input_file", default=None,
                        help="one prompt per line, generated as one batch")
    parser.add_argument("--rope-scaling", "--rope_scaling", default=None,
                        help="yarn:FACTOR, dynamic:FACTOR, linear:FACTOR or JSON")
    parser.add_argument("--step", type=int, default=None, help="load this step instead of the latest")
    parser.add_argument("--vocab-path", "--vocab_path", default=None,
                        help="sentencepiece .model, tokenizer.json or Hugging Face model folder (default: "
                             "data.tokenizer from the checkpoint's config)")
    parser.add_argument("--prompt", default="", help="text to continue (empty: start a new document)")
    parser.add_argument("--max-new-tokens", "--max_new_tokens", type=int, default=50)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 is greedy")
    parser.add_argument("--top-k", "--top_k", type=int, default=50, help="0 disables")
    parser.add_argument("--top-p", "--top_p", type=float, default=0.9, help="1 disables")
    parser.add_argument("--repetition-penalty", "--repetition_penalty", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-stream", "--no_stream", action="store_true", help="print the text once, at the end")
    parser.add_argument("--speculative", action="store_true",
                        help="greedy decoding drafted by the model's multi-token prediction head and verified by "
                             "its main head: the plain greedy output, in fewer main-model steps")
    args = parser.parse_args(argv)
    if (args.checkpoint is None) == (args.model_path is None):
        parser.error("give one of --checkpoint or --model-path")
    if args.rope_scaling is not None:
        try:
            args.rope_scaling = parse_rope_scaling(args.rope_scaling)
        except ValueError as error:
            parser.error(str(error))
    if args.max_new_tokens < 1:
        parser.error(f"--max-new-tokens={args.max_new_tokens} must be >= 1")
    if args.temperature < 0 or args.top_k < 0 or not 0 < args.top_p <= 1:
        parser.error(f"--temperature={args.temperature} and --top-k={args.top_k} must be >= 0, "
                     f"--top-p={args.top_p} in (0, 1]")
    return args


def parse_rope_scaling(spec: str) -> dict:
    """`yarn:4` or `{"type": "yarn", "factor": 4, ...}` -> a rope_scaling mapping, checked like the config's."""
    try:
        scaling = json.loads(spec) if spec.strip().startswith("{") else {
            "type": spec.split(":")[0], "factor": float(spec.split(":")[1])}
        validate_rope_scaling(scaling)
    except (ValueError, IndexError, ConfigError) as error:
        raise ValueError(f"--rope-scaling={spec!r}: {error} (write e.g. yarn:4 or "
                         f'\'{{"type": "yarn", "factor": 4}}\')') from None
    return scaling


def apply_rope_scaling(model, scaling: dict) -> None:
    """Extend the context at inference: the rotary tables are rebuilt with `scaling`; weights are untouched."""
    config = model.config
    config.rope_scaling = scaling
    model.model.rotary_emb = RotaryEmbedding(config.head_dim, config.max_position_embeddings, config.rope_theta,
                                             scaling)


def left_padded_batch(prompts: list[list[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of different lengths -> (input_ids [B, S], attention_mask [B, S]) padded on the left."""
    length = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, length - len(prompt):] = torch.tensor(prompt)
        attention_mask[row, length - len(prompt):] = 1
    return input_ids, attention_mask


def load_tokenizer(path: str, vocab_size: int):
    """A SentencePiece .model, a tokenizer.json or a Hugging Face model folder (mymoe.tokenizer)."""
    try:
        tokenizer = load_any_tokenizer(path)
    except TokenizerError as error:
        raise CheckpointError(str(error)) from None
    if tokenizer.vocab_size() > vocab_size:
        raise CheckpointError(f"{path} has {tokenizer.vocab_size()} pieces but the model was trained with "
                              f"vocab_size={vocab_size}: use the tokenizer the training data was made with")
    return tokenizer


def end_of_document_id(tokenizer) -> Optional[int]:
    """The id that ends every training document: </s> when the tokenizer has one."""
    eos = tokenizer.eos_id()
    return eos if eos >= 0 else None


@torch.no_grad()
def sample_tokens(model, input_ids: torch.Tensor, max_new_tokens: int, temperature: float, top_k: Optional[int],
                  top_p: Optional[float], repetition_penalty: float, generator: torch.Generator,
                  eos_token_id: Optional[int], tokenizer_size: Optional[int] = None) -> Iterator[int]:
    """Yield sampled token ids one at a time for a single prompt [1, S]: model.stream, the decode loop of
    model.generate. Ids from tokenizer_size up (a vocabulary padded past the tokenizer's pieces) are never
    sampled."""
    for next_token in model.stream(input_ids, max_new_tokens, temperature, top_k, top_p, repetition_penalty,
                                   generator, eos_token_id=eos_token_id, vocab_limit=tokenizer_size):
        yield int(next_token)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    source = args.checkpoint or args.model_path
    print(f"loading {source}{f' step {args.step}' if args.step is not None else ''} ...", file=sys.stderr)
    start = time.perf_counter()
    try:
        model, config, manifest = load_model(source, args.step)
        nonfinite = first_nonfinite(model.state_dict())
        if nonfinite:
            raise CheckpointError(f"{source}: {nonfinite} holds nan or inf (saved by a run that diverged): "
                                  f"generate from an earlier, finite step with --step")
        if args.rope_scaling is not None:
            apply_rope_scaling(model, args.rope_scaling)
        vocab_path = args.vocab_path or config.data.tokenizer
        if not vocab_path:
            raise CheckpointError("the checkpoint's config names no tokenizer: pass --vocab-path tok.model")
        tokenizer = load_tokenizer(vocab_path, config.model.vocab_size)
    except (CheckpointError, OSError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    model.to(device)
    print(f"step {manifest['step']}, {model.num_parameters() / 1e6:.2f}M parameters, "
          f"{config.model.moe.n_routed_experts} experts (saved at EP {manifest['expert_parallel_size']}), "
          f"loaded in {time.perf_counter() - start:.1f} s; sampling with temperature {args.temperature}, "
          f"top_k {args.top_k}, top_p {args.top_p}, seed {args.seed}", file=sys.stderr)

    eod = end_of_document_id(tokenizer)
    if args.input_file is not None:
        return generate_batch(model, tokenizer, args, eod, device)
    prompt_ids = ([eod] if eod is not None else []) + tokenizer.encode(args.prompt)
    if not prompt_ids:
        print("error: the prompt is empty and the tokenizer has no end-of-document id to start from; "
              "give --prompt", file=sys.stderr)
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
    for token in sample_tokens(model, input_ids, args.max_new_tokens, args.temperature, args.top_k or None,
                               args.top_p if args.top_p < 1 else None, args.repetition_penalty, generator, eod,
                               tokenizer.vocab_size()):
        new_ids.append(token)
        text = args.prompt + tokenizer.decode([t for t in new_ids if t != eod])
        if not args.no_stream and text.startswith(printed):
            print(text[len(printed):], end="", flush=True)
            printed = text
    text = args.prompt + tokenizer.decode([t for t in new_ids if t != eod])
    print(text if args.no_stream else text[len(printed):] if text.startswith(printed) else "\n" + text, flush=True)
    elapsed = time.perf_counter() - start
    print(f"generated {len(new_ids)} tokens in {elapsed:.2f} s ({len(new_ids) / max(elapsed, 1e-9):.1f} tokens/s)"
          f"{', stopped at end of document' if new_ids and new_ids[-1] == eod else ''}", file=sys.stderr)
    return 0


@contextlib.contextmanager
def tokenizer_ids_only(model, size: int):
    """Ids past the tokenizer's pieces (a padded vocabulary) are never chosen by speculative decoding, which
    has its own loop (draft, then verify); model.stream masks them itself."""
    hook = model.lm_head.register_forward_hook(
        lambda module, inputs, logits: logits.index_fill(-1, torch.arange(size, logits.shape[-1], device=logits.device),
                                                         float("-inf")))
    try:
        yield
    finally:
        hook.remove()


def generate_speculative(model, tokenizer, args, input_ids: torch.Tensor) -> int:
    """Self-speculative greedy decoding of one prompt; reports how often the drafts were accepted."""
    if model.mtp is None:
        print("error: --speculative needs a model trained with a multi-token prediction head "
              "(model.num_nextn_predict_layers=1)", file=sys.stderr)
        return 1
    start = time.perf_counter()
    with tokenizer_ids_only(model, tokenizer.vocab_size()):
        result = speculative_greedy(model.eval(), input_ids, args.max_new_tokens)
    new_ids = result.tokens[0, input_ids.shape[1]:].tolist()
    print(args.prompt + tokenizer.decode(new_ids), flush=True)
    elapsed = time.perf_counter() - start
    print(f"generated {len(new_ids)} tokens greedily in {elapsed:.2f} s with {result.drafts} main-model steps; "
          f"draft acceptance rate {result.acceptance_rate:.2f}", file=sys.stderr)
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
    tokens = model.generate(input_ids.to(device), args.max_new_tokens, temperature=args.temperature,
                            top_k=args.top_k or None, top_p=args.top_p if args.top_p < 1 else None,
                            repetition_penalty=args.repetition_penalty, generator=generator,
                            attention_mask=attention_mask.to(device), eos_token_id=eod,
                            vocab_limit=tokenizer.vocab_size())
    new_tokens = 0
    for line, row in zip(lines, tokens[:, input_ids.shape[1]:].tolist()):
        if eod is not None and eod in row:
            row = row[:row.index(eod)]
        new_tokens += len(row)
        print(line + tokenizer.decode(row), flush=True)
    print(f"generated {new_tokens} tokens for {len(lines)} prompts in {time.perf_counter() - start:.2f} s",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
