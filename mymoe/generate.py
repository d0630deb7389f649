"""Generate text from a sharded checkpoint, in one process, whatever expert-parallel layout saved it.

    python -m mymoe.generate --checkpoint runs/x/checkpoints --vocab_path tok.model \\
        --prompt "Once upon a time" --max_new_tokens 50 --temperature 0.8 --top_k 50 --top_p 0.9 --seed 0

Every expert is loaded into one model (the checkpoint addresses experts by global index), the prompt is
encoded with the sentencepiece model and, like every training document, follows an end-of-document
token; tokens are printed as they are sampled, with a KV cache, until max_new_tokens or end of document.
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Iterator, Optional

import torch

from mymoe.checkpoint import CheckpointError, load_model
from mymoe.model.attention import KVCache
from mymoe.model.transformer import sample_next_token


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="mymoe-generate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True,
                        help="checkpoints folder of a run (its `latest` is used) or one step_* folder")
    parser.add_argument("--step", type=int, default=None, help="load this step instead of the latest")
    parser.add_argument("--vocab_path", default=None,
                        help="sentencepiece .model (default: data.tokenizer from the checkpoint's config)")
    parser.add_argument("--prompt", default="", help="text to continue (empty: start a new document)")
    parser.add_argument("--max_new_tokens", type=int, default=50)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 is greedy")
    parser.add_argument("--top_k", type=int, default=50, help="0 disables")
    parser.add_argument("--top_p", type=float, default=0.9, help="1 disables")
    parser.add_argument("--repetition_penalty", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no_stream", action="store_true", help="print the text once, at the end")
    args = parser.parse_args(argv)
    if args.max_new_tokens < 1:
        parser.error(f"--max_new_tokens={args.max_new_tokens} must be >= 1")
    if args.temperature < 0 or args.top_k < 0 or not 0 < args.top_p <= 1:
        parser.error(f"--temperature={args.temperature} and --top_k={args.top_k} must be >= 0, "
                     f"--top_p={args.top_p} in (0, 1]")
    return args


def load_tokenizer(path: str, vocab_size: int):
    import sentencepiece as spm

    tokenizer = spm.SentencePieceProcessor(model_file=path)
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
    """Yield sampled token ids one at a time for a single prompt [1, S]: the same sampling, cache and random
    draws as model.generate. Ids from tokenizer_size up (a vocabulary padded past the tokenizer's pieces)
    are never sampled."""
    model.eval()
    cache = [KVCache(max_length=input_ids.shape[1] + max_new_tokens) for _ in range(model.config.num_hidden_layers)]
    tokens, step_input = input_ids, input_ids
    for _ in range(max_new_tokens):
        logits = model(step_input, past_key_values=cache).logits[:, -1].float()  # [1, V]
        if tokenizer_size is not None:
            logits[:, tokenizer_size:] = float("-inf")
        next_token = sample_next_token(logits, tokens, None, temperature, top_k, top_p, repetition_penalty,
                                       generator)  # [1]
        tokens = torch.cat((tokens, next_token[:, None]), dim=1)
        step_input = next_token[:, None]
        yield int(next_token)
        if eos_token_id is not None and int(next_token) == eos_token_id:
            return


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    print(f"loading {args.checkpoint}{f' step {args.step}' if args.step is not None else ''} ...", file=sys.stderr)
    start = time.perf_counter()
    try:
        model, config, manifest = load_model(args.checkpoint, args.step)
        vocab_path = args.vocab_path or config.data.tokenizer
        if not vocab_path:
            raise CheckpointError("the checkpoint's config names no tokenizer: pass --vocab_path tok.model")
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
    prompt_ids = ([eod] if eod is not None else []) + tokenizer.encode(args.prompt)
    if not prompt_ids:
        print("error: the prompt is empty and the tokenizer has no end-of-document id to start from; "
              "give --prompt", file=sys.stderr)
        return 1
    generator = torch.Generator(device=device).manual_seed(args.seed)
    input_ids = torch.tensor([prompt_ids], device=device)
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


if __name__ == "__main__":
    sys.exit(main())
