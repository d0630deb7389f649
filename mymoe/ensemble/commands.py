"""The work of ``python -m mymoe.ensemble``: each subcommand on the arguments cli.parse_args returns, with
known errors reported in one line (they name the input and the fix)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

import torch

from mymoe.checkpoint import CheckpointError
from mymoe.config import ConfigError
from mymoe.ensemble.cli import ensemble_settings, parse_args
from mymoe.ensemble.evaluation import evaluate_ensemble
from mymoe.ensemble.folder import build_ensemble, load_ensemble
from mymoe.ensemble.training import train_gate
from mymoe.inference import end_of_document_id, left_padded_batch, load_tokenizer
from mymoe.tokenizer import TokenizerError

ONE_LINE_ERRORS = (CheckpointError, ConfigError, TokenizerError, FileNotFoundError, ValueError)


def main(argv: Optional[list[str]] = None) -> int:
    return run(parse_args(argv))


def run(args: argparse.Namespace) -> int:
    work = {"build": build, "train-gate": train, "evaluate": evaluate, "generate": generate}[args.command]
    try:
        return work(args)
    except ONE_LINE_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


def build(args: argparse.Namespace) -> int:
    build_ensemble(
        args.members, args.out, ensemble_settings(args), args.tokenizer, args.overwrite, args.seed, announce=report
    )
    return 0


def train(args: argparse.Namespace) -> int:
    options = chosen(args, "steps", "batch_size", "seq_len", "lr", "weight_decay", "seed", "device")
    print(json.dumps(train_gate(args.ensemble, args.data, **options, announce=report)), flush=True)
    return 0


def evaluate(args: argparse.Namespace) -> int:
    options = chosen(args, "labels", "seq_len", "batch_size", "max_batches", "gate_tokens", "device")
    print(json.dumps(evaluate_ensemble(args.ensemble, args.data, **options)), flush=True)
    return 0


def chosen(args: argparse.Namespace, *names: str) -> dict:
    """The flags of a command by their keyword names (the same in cli.py and the function), and the bar."""
    return {**{name: getattr(args, name) for name in names}, "progress": not args.no_progress}


def generate(args: argparse.Namespace) -> int:
    """Every --prompt as one left-padded batch; a line per prompt, then which members each was routed to."""
    ensemble, manifest = load_ensemble(args.ensemble)
    path = args.tokenizer or manifest["tokenizer"]
    if not path or not Path(path).exists():
        raise CheckpointError(
            f"the tokenizer {path} does not exist: pass --tokenizer, the sentencepiece .model or tokenizer.json "
            f"the members' data was made with"
        )
    tokenizer = load_tokenizer(path, manifest["vocab_size"])
    eod = end_of_document_id(tokenizer)
    prompts = [([eod] if eod is not None else []) + tokenizer.encode(prompt) for prompt in args.prompt]
    if not all(prompts):
        raise ValueError("a --prompt is empty and the tokenizer has no end-of-document id to start from: give text")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    ensemble.to(device)
    input_ids, attention_mask = (tensor.to(device) for tensor in left_padded_batch(prompts))
    weights = ensemble.routing(input_ids, attention_mask)
    tokens = ensemble.generate(
        input_ids,
        args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k or None,
        top_p=args.top_p if args.top_p < 1 else None,
        repetition_penalty=args.repetition_penalty,
        generator=torch.Generator(device=device).manual_seed(args.seed),
        attention_mask=attention_mask,
        eos_token_id=eod,
        vocab_limit=tokenizer.vocab_size(),
    )
    for prompt, row in zip(args.prompt, tokens[:, input_ids.shape[1] :].tolist()):
        if eod is not None and eod in row:
            row = row[: row.index(eod)]
        print(prompt + tokenizer.decode(row), flush=True)
    for prompt, row in zip(args.prompt, weights.tolist()):
        chosen = ", ".join(f"member {i} ({w:.2f})" for i, w in enumerate(row) if w > 0)
        report(f"{prompt[:40]!r} was routed to {chosen}")
    return 0


def report(line: str) -> None:
    """What a command is doing and what it produced: on stderr, so stdout holds only the results."""
    print(line, file=sys.stderr, flush=True)
