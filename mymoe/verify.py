"""Check a parallel layout against one process: ``torchrun --nproc-per-node N -m mymoe.verify --config X``.

Every rank trains a few steps in the layout the config asks for (expert parallelism, FSDP, gradient
accumulation, activation checkpointing, adapters), through the trainer itself. The batches each rank
read are then gathered, and every rank replays the same steps as one process holding the whole model:
for each micro-batch it runs every rank's slice in turn, averages their losses as data parallelism
does, then clips with torch.nn.utils.clip_grad_norm_ and steps a plain AdamW. It prints the largest
difference in loss, gradient norm and parameters (each rank compares the shard it holds, the worst over
all ranks is reported) and exits 1 above the tolerance.

Router noise and dropout are switched off for the check: each rank draws its own, which one process cannot
replay.
The whole model must fit in one process (shrink it with overrides, e.g. --model.num_hidden_layers=2).
"""

from __future__ import annotations

import argparse


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mymoe.verify", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="YAML config (with data), e.g. configs/tiny.yaml")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps to compare (default 3)")
    parser.add_argument(
        "--tolerance",
        type=float,
        default=1e-4,
        help="largest allowed absolute difference in loss, grad norm and any parameter",
    )
    args, overrides = parser.parse_known_args(argv)
    # the check builds and trains models (torch, seconds): only once the arguments parse
    from mymoe.equivalence import run

    run(args, overrides)


if __name__ == "__main__":
    main()
