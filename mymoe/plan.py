"""Which layout fits: ``python -m mymoe.plan --config X --gpus N --gpu-memory 80GB [--micro-batch 1 2 4]``.

Prints, for every candidate layout (expert-parallel size, FSDP on or off, activation checkpointing,
micro-batch), what one rank holds at the peak of a training step, which layouts fit the GPU and the one it
recommends. The prediction and how it is made are in planner.py.
"""

from __future__ import annotations

import argparse
import sys

from mymoe.config import ConfigError, load_config


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mymoe.plan", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--gpus", type=int, required=True, help="ranks in the job")
    parser.add_argument("--gpu-memory", default="80GB", help="memory of one GPU, e.g. 80GB (default)")
    parser.add_argument(
        "--micro-batch", type=int, nargs="+", default=None, help="micro-batch sizes to try (default: the config's)"
    )
    args, overrides = parser.parse_known_args(argv)
    # the planner builds the model on the meta device (torch, seconds): only once the arguments parse
    from mymoe.planner import GIB, RESERVE, format_table, parse_bytes, plan

    try:
        config = load_config(args.config, overrides)
        if args.gpus <= 0:
            raise ConfigError(f"--gpus {args.gpus} must be a positive number of ranks")
        gpu_memory = parse_bytes(args.gpu_memory)
    except ConfigError as error:
        sys.exit(f"mymoe.plan: {error}")
    micro_batches = args.micro_batch or [config.train.micro_batch_size]
    m = config.model
    print(
        f"plan: {args.config} ({m.num_hidden_layers} layers, hidden {m.hidden_size}, {m.moe.n_routed_experts} "
        f"experts, top-{m.moe.num_experts_per_tok}), seq {config.data.seq_len}, gradient accumulation "
        f"{config.train.gradient_accumulation_steps}, on {args.gpus} GPUs of {gpu_memory / 1e9:.0f} GB "
        f"({RESERVE:.0%} kept free); per-rank GiB at the peak of a step"
    )
    predictions, best = plan(config, args.gpus, gpu_memory, micro_batches)
    print(format_table(predictions, best))
    fitting = sum(p.fits for p in predictions)
    if best is None:
        print(
            f"none of {len(predictions)} layouts fits: add GPUs (FSDP's share of the model state shrinks with "
            f"each), shorten data.seq_len, or offload with --parallel.fsdp_cpu_offload=true"
        )
        sys.exit(1)
    layout = best.layout
    print(
        f"{fitting} of {len(predictions)} layouts fit; recommended: --parallel.expert_parallel_size="
        f"{layout.expert_parallel_size} --parallel.fsdp={str(layout.fsdp).lower()} "
        f"--model.gradient_checkpointing={str(layout.activation_checkpointing).lower()} "
        f"--train.micro_batch_size={layout.micro_batch_size} (peak {best.peak / GIB:.1f} GiB per rank)"
    )


if __name__ == "__main__":
    main()
