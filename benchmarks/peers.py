"""What the benchmarks share: how each must be launched, and DeepSpeed's MoE, their peer, in one process."""

from __future__ import annotations

import os
import sys


def require_launch(script: str, torchrun: bool) -> None:
    """Stop at once, saying the right command, when a benchmark is started the other way: a script that
    starts its own processes under torchrun would start a pair per torchrun process and hang, and a
    torchrun script under plain python has no peers to talk to."""
    under_torchrun = "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_WORLD_SIZE" in os.environ
    if torchrun and not under_torchrun:
        sys.exit(f"error: run this benchmark under torchrun: torchrun --nproc_per_node=2 benchmarks/{script}")
    if not torchrun and under_torchrun:
        sys.exit(f"error: benchmarks/{script} starts its own processes; run it as: python benchmarks/{script}")


def init_deepspeed() -> bool:
    try:
        import deepspeed
    except ImportError:
        print("deepspeed is not installed: its candidates are skipped (pip install deepspeed)")
        return False
    import torch.distributed as dist

    if not dist.is_initialized():
        os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"})
        from mymoe.parallel.env import free_port

        os.environ.setdefault("MASTER_PORT", str(free_port()))
        deepspeed.init_distributed(dist_backend="gloo")
    return True
