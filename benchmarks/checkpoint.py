"""Sharded checkpoint save and load (2 ranks, EP=2) against torch.save / torch.load of the same full state
by one process, with the disk's own write speed (one large numpy write + fsync) as the floor.

    python benchmarks/checkpoint.py [--dir /tmp/ckpt_bench] [--hidden 1024] [--experts 16] [--layers 4] [--repeats 3]

The state is a training checkpoint: weights plus AdamW's two moments (3 x 4 bytes per parameter), of a
model of >= 200M parameters by default. Both sides are timed until the checkpoint is durable: ours until it
is fsynced and committed (atomic rename), the peer's torch.save until its file is flushed and fsynced, so
the peer is torch.save + fsync; torch.save alone (no fsync: a crash can lose it) is timed too and printed
beside it, with its own ratio. Loads read from the page cache if the files are still in it
(nothing here drops caches: other work shares the machine), so load figures are upper bounds. Each side
runs `--repeats` times and the fastest run of each is compared, so a burst of other work on a shared
machine does not decide a ratio; every run's time is printed. Prints each figure, the ratios, and a
last line `RESULT key=value ...`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.multiprocessing as mp

from mymoe.config import config_from_dict, validate
from peers import require_launch

WORLD_SIZE = 2


def bench_config(args, expert_parallel_size: int):
    return validate(
        config_from_dict(
            {
                "model": {
                    "vocab_size": 32000,
                    "hidden_size": args.hidden,
                    "intermediate_size": 4 * args.hidden,
                    "num_hidden_layers": args.layers,
                    "num_attention_heads": 16,
                    "moe": {
                        "n_routed_experts": args.experts,
                        "num_experts_per_tok": 2,
                        "moe_intermediate_size": args.moe_intermediate,
                    },
                },
                "parallel": {"expert_parallel_size": expert_parallel_size, "backend": "gloo"},
                "train": {"keep_last": 0},  # each repeat's step is removed outside the timed part
            }
        )
    )


class BenchState:
    """The Trainer's checkpoint seam over a model and an AdamW whose moments exist (one zero-gradient step)."""

    def __init__(self, config, ctx):
        from mymoe.model import MoECausalLM
        from mymoe.parallel import parallelize
        from mymoe.optim import build_optimizer, parameter_groups

        torch.manual_seed(0)
        self.model = parallelize(MoECausalLM(config.model), ctx)
        self.optimizer = build_optimizer(parameter_groups(self.model, config.train.weight_decay), config.train)
        for param in self.model.parameters():
            param.grad = torch.zeros_like(param)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step, self.tokens_seen = 1, 0

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "train_reader": {"next_sample": 0},
            "rng": {"cpu": torch.get_rng_state(), "cuda": None},
        }

    def load_state_dict(self, state: dict) -> None:
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"]["cpu"])


def state_bytes(state: BenchState) -> int:
    tensors = list(state.model.state_dict().values())
    tensors += [v for s in state.optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    return sum(t.numel() * t.element_size() for t in tensors)


def sharded_rank(rank: int, args, port: int, out_dir: str) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(WORLD_SIZE), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    import torch.distributed as dist

    from mymoe.checkpoint import CheckpointManager
    from mymoe.parallel import init_distributed, shutdown

    config = bench_config(args, expert_parallel_size=WORLD_SIZE)
    ctx = init_distributed(config)
    try:
        state = BenchState(config, ctx)
        manager = CheckpointManager(Path(out_dir) / "sharded", config, ctx, thread_count=args.threads, verbose=False)
        save_seconds, load_seconds = [], []
        for repeat in range(args.repeats):
            state.step = repeat + 1
            dist.barrier()
            start = time.perf_counter()
            manager.save(state)
            save_seconds.append(time.perf_counter() - start)
            dist.barrier()
            start = time.perf_counter()
            manager.load_latest(state)
            dist.barrier()
            load_seconds.append(time.perf_counter() - start)
            step_dir = manager.latest()  # collective
            if rank == 0:
                disk_bytes = sum(p.stat().st_size for p in step_dir.iterdir())
                shutil.rmtree(step_dir)
            dist.barrier()
        if rank == 0:
            (Path(out_dir) / "sharded.json").write_text(
                json.dumps({"save": save_seconds, "load": load_seconds, "disk_bytes": disk_bytes})
            )
    finally:
        shutdown()


def disk_floor(directory: Path, size: int) -> float:
    """Seconds to write `size` bytes of one numpy array and fsync them."""
    data = np.random.default_rng(0).integers(0, 255, size, dtype=np.uint8)
    path = directory / "floor.bin"
    start = time.perf_counter()
    with open(path, "wb") as f:
        data.tofile(f)
        f.flush()
        os.fsync(f.fileno())
    seconds = time.perf_counter() - start
    path.unlink()
    return seconds


def seconds_list(seconds: list[float]) -> str:
    return " ".join(f"{value:.2f}" for value in seconds) + " s"


def main() -> None:
    require_launch("checkpoint.py", torchrun=False)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary folder, removed after)")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--moe_intermediate", type=int, default=768)
    parser.add_argument("--threads", type=int, default=1, help="DCP writer threads per rank")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each side; the fastest counts")
    args = parser.parse_args()
    root = Path(args.dir or tempfile.mkdtemp(prefix="ckpt_bench_"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        run(args, root)
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)


def run(args, root: Path) -> None:
    from mymoe.parallel import ParallelContext

    config = bench_config(args, expert_parallel_size=1)
    full = BenchState(config, ParallelContext())
    parameters = full.model.num_parameters()
    total_bytes = state_bytes(full)
    print(
        f"model {parameters / 1e6:.0f}M parameters; checkpoint state (weights + AdamW moments) "
        f"{total_bytes / 2**30:.2f} GiB; writing under {root}",
        flush=True,
    )

    floor_seconds = disk_floor(root, total_bytes)
    print(
        f"disk floor: numpy write + fsync {total_bytes / floor_seconds / 2**20:.0f} MiB/s ({floor_seconds:.2f} s)",
        flush=True,
    )

    path = root / "full.pt"
    torch_saves, torch_saves_unsynced, torch_loads = [], [], []
    for _ in range(args.repeats):
        start = time.perf_counter()
        with open(path, "wb") as f:
            torch.save({"model": full.model.state_dict(), "optimizer": full.optimizer.state_dict()}, f)
            f.flush()
            torch_saves_unsynced.append(time.perf_counter() - start)
            os.fsync(f.fileno())
        torch_saves.append(time.perf_counter() - start)
        start = time.perf_counter()
        torch.load(path, weights_only=True)
        torch_loads.append(time.perf_counter() - start)
        path.unlink()
    del full
    torch_save_seconds, torch_load_seconds = min(torch_saves), min(torch_loads)
    unsynced_seconds = min(torch_saves_unsynced)
    print(
        f"torch.save + fsync, one process: {total_bytes / torch_save_seconds / 2**20:.0f} MiB/s "
        f"({torch_save_seconds:.2f} s; without the fsync {unsynced_seconds:.2f} s); torch.load "
        f"{torch_load_seconds:.2f} s (runs: save {seconds_list(torch_saves)}, without the fsync "
        f"{seconds_list(torch_saves_unsynced)}, load {seconds_list(torch_loads)})",
        flush=True,
    )

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.start_processes(sharded_rank, args=(args, port, str(root)), nprocs=WORLD_SIZE, start_method="spawn")
    runs = json.loads((root / "sharded.json").read_text())
    sharded = {"save": min(runs["save"]), "load": min(runs["load"]), "disk_bytes": runs["disk_bytes"]}
    save_throughput = sharded["disk_bytes"] / sharded["save"] / 2**20
    floor_throughput = total_bytes / floor_seconds / 2**20
    print(
        f"sharded DCP save, {WORLD_SIZE} ranks EP={WORLD_SIZE} (crc32 + atomic commit included): "
        f"{save_throughput:.0f} MiB/s ({sharded['save']:.2f} s, {sharded['disk_bytes'] / 2**30:.2f} GiB on disk); "
        f"load {sharded['load']:.2f} s (checksums verified) (runs: save {seconds_list(runs['save'])}, "
        f"load {seconds_list(runs['load'])})",
        flush=True,
    )
    ratios = {
        "save_vs_floor": save_throughput / floor_throughput,
        "save_vs_torch_save": torch_save_seconds / sharded["save"],
        "save_vs_torch_save_unsynced": unsynced_seconds / sharded["save"],
        "load_vs_torch_load": torch_load_seconds / sharded["load"],
    }
    print(
        f"sharded save throughput / disk floor = {ratios['save_vs_floor']:.2f} (target >= 0.7); "
        f"speed-up over torch.save + fsync {ratios['save_vs_torch_save']:.2f}x (over torch.save alone "
        f"{ratios['save_vs_torch_save_unsynced']:.2f}x), over torch.load {ratios['load_vs_torch_load']:.2f}x",
        flush=True,
    )
    # the keys first; the rest for whoever wants the whole picture
    print(
        f"RESULT save_gb_per_s={sharded['disk_bytes'] / sharded['save'] / 1e9:.3f} "
        f"load_gb_per_s={sharded['disk_bytes'] / sharded['load'] / 1e9:.3f} save_vs_disk={ratios['save_vs_floor']:.2f} "
        f"params_m={parameters / 1e6:.0f} state_gib={total_bytes / 2**30:.2f} floor_mib_s={floor_throughput:.0f} "
        f"torch_save_s={torch_save_seconds:.2f} torch_load_s={torch_load_seconds:.2f} repeats={args.repeats} "
        f"save_vs_torch_save={ratios['save_vs_torch_save']:.2f} load_vs_torch_load={ratios['load_vs_torch_load']:.2f} "
        f"torch_save_unsynced_s={unsynced_seconds:.2f} "
        f"save_vs_torch_save_unsynced={ratios['save_vs_torch_save_unsynced']:.2f}",
        flush=True,
    )


if __name__ == "__main__":
    main()
