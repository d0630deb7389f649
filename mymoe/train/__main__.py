"""Command line of the training job (also installed as ``mymoe-train``)."""

from __future__ import annotations

import argparse
import sys

from mymoe.config import ConfigError, load_config


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="mymoe-train",
        description="Train an MoE language model with expert and data parallelism. Any --section.key=value "
        "after the options overrides the YAML config (e.g. --parallel.expert_parallel_size=2).",
    )
    parser.add_argument("--config", required=True, help="YAML config, e.g. configs/tiny.yaml")
    parser.add_argument(
        "--deepspeed",
        default=None,
        metavar="JSON",
        help="train through DeepSpeed with this config (e.g. configs/ds_zero1.json)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (logs still written)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args, overrides = parser.parse_known_args(argv)
    # the loop imports torch and the whole package: only once the arguments are known, so --help is instant
    from mymoe.train.loop import check_data, check_engine, run

    try:
        config = load_config(args.config, overrides)
        check_data(config)  # every rank alike, before any collective
        check_engine(config, args.deepspeed)
    except ConfigError as error:
        sys.exit(f"mymoe-train: {error}")

    from mymoe.train.errors import ONE_LINE_ERRORS  # like the loop, these error types need torch

    try:
        run(config, deepspeed_config=args.deepspeed, progress=not args.no_progress)
    except ONE_LINE_ERRORS as error:  # the message names the input and the fix; a traceback adds nothing
        sys.exit(f"mymoe-train: {error}")


if __name__ == "__main__":
    main()
