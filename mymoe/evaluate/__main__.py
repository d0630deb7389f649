"""Loss and perplexity of a checkpoint on one or more datasets (also installed as ``mymoe-evaluate``).

    python -m mymoe.evaluate --checkpoint runs/x/checkpoints --data data/valid [data/other ...] \\
        [--seq-len 128] [--batch-size 8] [--max-batches 50] [--tokenizer data/tok.model]

The checkpoint is anything mymoe.load reads: a run's checkpoints folder (its latest step, or --step) or one
step_* folder, a consolidated .safetensors file (mymoe-convert consolidate) or a Hugging Face folder. Each
data prefix (a .bin/.idx pair) is cut into samples as training cuts it and read once in file order, the
order of the trainer's validation; with the run's seq_len and micro_batch_size (the defaults) and
--max-batches train.eval_steps, the result is the evaluation the trainer logged for that validation prefix.
A line per dataset, then one JSON line: each dataset and all of them together (token-weighted).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mymoe.data.indexed import strip_suffix


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="mymoe-evaluate",
        description=__doc__.split("\n\n")[0],
        epilog='The last line printed is JSON: {"datasets": [...], "overall": {...}}.',
    )
    parser.add_argument(
        "--checkpoint",
        required=True,
        metavar="PATH",
        help="a run's checkpoints folder, a step_* folder, a consolidated .safetensors file or a Hugging Face folder",
    )
    parser.add_argument(
        "--step", type=int, default=None, metavar="N", help="this step of a checkpoints folder instead of the latest"
    )
    parser.add_argument(
        "--data",
        nargs="+",
        required=True,
        metavar="PREFIX",
        help=".bin/.idx prefixes (data/valid for data/valid.bin + data/valid.idx), each scored apart",
    )
    parser.add_argument(
        "--seq-len",
        "--seq_len",
        type=int,
        default=None,
        metavar="N",
        help="tokens per sample (default: the checkpoint's data.seq_len)",
    )
    parser.add_argument(
        "--batch-size",
        "--batch_size",
        type=int,
        default=None,
        metavar="B",
        help="samples per batch (default: the checkpoint's train.micro_batch_size)",
    )
    parser.add_argument(
        "--max-batches",
        "--max_batches",
        type=int,
        default=None,
        metavar="K",
        help="score at most this many batches of each dataset (default: all of it)",
    )
    parser.add_argument(
        "--tokenizer",
        default=None,
        metavar="PATH",
        help="the tokenizer the data was made with (SentencePiece .model, tokenizer.json or Hugging "
        "Face folder): checked against the model's vocabulary, and adds bits per byte",
    )
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when there is one)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    for name in ("seq_len", "batch_size", "max_batches"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')}={value} must be >= 1")
    args.data = [strip_suffix(prefix) for prefix in args.data]
    return args


def missing_input(args: argparse.Namespace) -> str | None:
    """The first input that does not exist, said with the fix; None when all do."""
    if not Path(args.checkpoint).exists():
        return (
            f"--checkpoint {args.checkpoint} does not exist: give a run's checkpoints folder, a step_* folder, "
            f"a consolidated .safetensors file or a Hugging Face folder"
        )
    for prefix in args.data:
        missing = [f"{prefix}{suffix}" for suffix in (".bin", ".idx") if not Path(f"{prefix}{suffix}").is_file()]
        if missing:
            return (
                f"--data {prefix}: {' and '.join(missing)} not found (a prefix names a .bin/.idx pair "
                f"without the suffix; make one with `python -m data_tools preprocess --output {prefix} ...`)"
            )
    return None


def main(argv=None) -> None:
    args = parse_args(argv)
    problem = missing_input(args)
    if problem is not None:
        sys.exit(f"mymoe-evaluate: {problem}")
    # run.py imports torch and loads the model: only once the arguments are known, so --help is instant
    from mymoe.evaluate.run import ONE_LINE_ERRORS, evaluate

    try:
        results = evaluate(
            args.checkpoint,
            args.data,
            step=args.step,
            seq_len=args.seq_len,
            batch_size=args.batch_size,
            max_batches=args.max_batches,
            tokenizer=args.tokenizer,
            device=args.device,
            progress=not args.no_progress,
        )
    except ONE_LINE_ERRORS as error:  # the message names the input and the fix; a traceback adds nothing
        sys.exit(f"mymoe-evaluate: {error}")
    print(json.dumps(results), flush=True)


if __name__ == "__main__":
    main()
