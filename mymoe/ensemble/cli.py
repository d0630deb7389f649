"""The command line of ``python -m mymoe.ensemble``: one subcommand per step, parsed without torch so that
--help and a mistyped flag answer at once (the work is in commands.py)."""

from __future__ import annotations

import argparse
from typing import Optional

from mymoe.config import LORA_TARGETS, EnsembleConfig, PEFTConfig
from mymoe.data.indexed import strip_suffix

DEFAULTS = EnsembleConfig()


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m mymoe.ensemble",
        description="A sample-level gated ensemble of trained models: a small gate routes each whole sample to "
        "one or more members and mixes their next-token probabilities.",
    )
    steps = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    build = steps.add_parser("build", help="an ensemble folder from two or more checkpoints (one vocabulary)")
    build.add_argument("--members", nargs="+", required=True, metavar="PATH", help="checkpoints mymoe.load reads")
    build.add_argument("--out", required=True, metavar="DIR", help="the ensemble folder to write")
    build.add_argument("--tokenizer", default=None, help="the members' tokenizer (default: the one their config names)")
    build.add_argument("--threshold", type=float, default=DEFAULTS.threshold, help="skip members below this weight")
    build.add_argument("--gate-layers", type=int, default=DEFAULTS.gate_layers, help="blocks in the gate; 0: mean")
    build.add_argument("--gate-heads", type=int, default=DEFAULTS.gate_heads, help="attention heads of those blocks")
    build.add_argument(
        "--lm-loss-weight", type=float, default=DEFAULTS.lm_loss_weight, help="ensemble lm loss in the gate's loss"
    )
    build.add_argument("--lora-rank", type=int, default=0, help="LoRA adapters of this rank on every member")
    build.add_argument("--lora-alpha", type=float, default=PEFTConfig().lora_alpha)
    build.add_argument("--lora-targets", nargs="+", default=PEFTConfig().lora_targets, choices=LORA_TARGETS)
    build.add_argument("--prefix-length", type=int, default=0, help="prefix-tuning positions on every member")
    build.add_argument("--seed", type=int, default=0, help="seeds the gate's blocks")
    build.add_argument("--overwrite", action="store_true", help="replace --out if it exists")

    train = steps.add_parser("train-gate", help="train the gate (each sample's target: its best-fitting member)")
    train.add_argument("--ensemble", required=True, metavar="DIR")
    train.add_argument("--data", nargs="+", required=True, metavar="PREFIX", help=".bin/.idx prefixes, blended")
    train.add_argument("--steps", type=int, default=200)
    train.add_argument("--batch-size", type=int, default=8)
    train.add_argument("--seq-len", type=int, default=None, help="tokens per sample (default: the members')")
    train.add_argument("--lr", type=float, default=3e-3)
    train.add_argument("--weight-decay", type=float, default=0.0)
    train.add_argument("--seed", type=int, default=1234, help="seeds the order of the samples")

    evaluate = steps.add_parser("evaluate", help="per-member and ensemble loss, routing accuracy with --labels")
    evaluate.add_argument("--ensemble", required=True, metavar="DIR")
    evaluate.add_argument("--data", nargs="+", required=True, metavar="PREFIX", help="held-out prefixes, each apart")
    evaluate.add_argument("--labels", nargs="+", type=int, default=None, help="the member index of each --data")
    evaluate.add_argument("--seq-len", type=int, default=None, help="tokens per sample (default: the members')")
    evaluate.add_argument("--batch-size", type=int, default=8)
    evaluate.add_argument("--max-batches", type=int, default=None, help="at most this many batches of each")
    evaluate.add_argument(
        "--gate-tokens", type=int, default=None, help="route each sample from its first N tokens (default: all)"
    )

    generate = steps.add_parser("generate", help="continue prompts with the gated mix of the members")
    generate.add_argument("--ensemble", required=True, metavar="DIR")
    generate.add_argument("--prompt", action="append", required=True, help="text to continue (repeat for a batch)")
    generate.add_argument("--tokenizer", default=None, help="default: the one the ensemble's manifest names")
    generate.add_argument("--max-new-tokens", type=int, default=50)
    generate.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    generate.add_argument("--top-k", type=int, default=0, help="0: no top-k")
    generate.add_argument("--top-p", type=float, default=1.0, help="1: no top-p")
    generate.add_argument("--repetition-penalty", type=float, default=1.0)
    generate.add_argument("--seed", type=int, default=0)

    for step in (train, evaluate, generate):
        step.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when there is one)")
    for step in (build, train, evaluate):
        step.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    for name in ("steps", "batch_size", "seq_len", "max_batches", "gate_tokens", "max_new_tokens"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')}={value} must be >= 1")
    if hasattr(args, "data"):
        args.data = [strip_suffix(prefix) for prefix in args.data]
    return args


def ensemble_settings(args: argparse.Namespace) -> EnsembleConfig:
    """build's flags as the typed settings (validated by config.validate_ensemble once the members are known)."""
    return EnsembleConfig(
        threshold=args.threshold,
        gate_layers=args.gate_layers,
        gate_heads=args.gate_heads,
        lm_loss_weight=args.lm_loss_weight,
        peft=PEFTConfig(
            lora_rank=args.lora_rank,
            lora_alpha=args.lora_alpha,
            lora_targets=list(args.lora_targets),
            prefix_length=args.prefix_length,
        ),
    )
