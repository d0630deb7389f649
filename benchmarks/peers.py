"""What the benchmarks share to run DeepSpeed's MoE, their peer, in the same single process."""
from __future__ import annotations

import os


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
