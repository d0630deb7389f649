"""Expert replication under skewed routing: the busiest rank's rows and the step time, with and without copies.

    torchrun --nproc_per_node=2 benchmarks/replication.py            # EP=2 on 2 ranks
    torchrun --nproc_per_node=4 benchmarks/replication.py            # EP=4 on 4 ranks

A training run of a small MoE (2 layers, 8 experts of ffn 1024, top-2) whose routers get a logit bias on
expert 0, calibrated so that it takes about 40% of the assignments: the rank holding it computes more rows
than the others, and they wait for it in the all-to-all. The same run (same initial weights and data) is then
trained with parallel.redundant_experts copies per rank, re-placed every few steps from the measured
loads; the steps after the first re-placement are timed. Both runs are in this one job, alternating in
blocks so that machine noise falls on both. Ends with:
    RESULT ep=<n> busiest_over_mean_without=<r> busiest_over_mean_with=<r> step_time_with_over_without=<r>
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from mymoe.config import config_from_dict, validate
from mymoe.data import IndexedWriter
from mymoe.parallel import init_distributed, shutdown
from mymoe.train.loop import Trainer
from peers import require_launch

HOT_SHARE = 0.4  # of all assignments, on expert 0


def write_tokens(prefix: str, vocab_size: int, tokens: int) -> None:
    writer = IndexedWriter(prefix + ".bin", dtype=np.uint16)
    data = np.random.default_rng(0).integers(0, vocab_size, tokens)
    writer.add_documents(data, np.full(tokens // 1024, 1024))
    writer.finalize(prefix + ".idx")


def build_config(prefix: str, out_dir: str, world_size: int, redundant: int, steps: int):
    return validate(
        config_from_dict(
            {
                "model": {
                    "vocab_size": 512,
                    "hidden_size": 256,
                    "intermediate_size": 1024,
                    "num_hidden_layers": 2,
                    "num_attention_heads": 4,
                    "moe": {
                        "n_routed_experts": 8,
                        "num_experts_per_tok": 2,
                        "moe_intermediate_size": 1024,
                        "router_bias": True,
                    },
                },
                "parallel": {
                    "expert_parallel_size": world_size,
                    "backend": "gloo",
                    "redundant_experts": redundant,
                    "replication_interval": 4,
                },
                "train": {
                    "max_steps": steps,
                    "micro_batch_size": 8,
                    "precision": "fp32",
                    "eval_interval": 0,
                    "out_dir": out_dir,
                    "lr": 1e-4,
                },
                "data": {"train_prefixes": [prefix], "seq_len": 128},
            }
        ),
        world_size,
    )


def hot_share(trainer: Trainer) -> float:
    """Expert 0's share of the assignments of one forward, summed over all ranks (no training)."""
    input_ids, _ = trainer.train_reader.next_batch()
    with torch.no_grad():
        trainer.model(input_ids)
    loads, _ = trainer.update_expert_biases()  # bias_update_rate is 0: this only sums and resets the count
    return float((loads[:, 0] / loads.sum(dim=1)).mean())


def calibrate(trainer: Trainer) -> float:
    """The router logit bias on expert 0 that gives it about HOT_SHARE of the assignments (bisection)."""
    low, high = 0.0, 8.0
    for _ in range(8):
        bias = (low + high) / 2
        set_bias(trainer, bias)
        low, high = (bias, high) if hot_share(trainer) < HOT_SHARE else (low, bias)
    return (low + high) / 2


def set_bias(trainer: Trainer, bias: float) -> None:
    with torch.no_grad():
        for layer in trainer.model.iter_moe_layers():
            layer.gate.bias.zero_()
            layer.gate.bias[0] = bias


def timed_steps(trainer: Trainer, steps: int) -> tuple[list[float], list[float]]:
    """(step times, busiest rank's rows / mean, averaged over the layers) of the next `steps` steps."""
    times, ratios = [], []
    for _ in range(steps):
        dist.barrier()
        start = time.perf_counter()
        metrics = trainer.train_step()
        rows = np.asarray(metrics["expert_rows"])  # [layers, ranks]; reading it waits for the step
        times.append(time.perf_counter() - start)
        ratios.append(float((rows.max(axis=1) / rows.mean(axis=1)).mean()))
    return times, ratios


def main() -> None:
    require_launch("replication.py", torchrun=True)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--redundant", type=int, default=2, help="copy slots per rank")
    parser.add_argument("--blocks", type=int, default=3, help="alternating blocks of timed steps per run")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per block")
    args = parser.parse_args()
    torch.set_num_threads(1)
    # one folder for every rank of this job (each rank's own temporary folder would differ in the config)
    folder = str(Path(tempfile.gettempdir()) / f"mymoe_replication_{os.environ.get('TORCHELASTIC_RUN_ID', 'run')}")
    Path(folder).mkdir(exist_ok=True)
    try:
        prefix = str(Path(folder) / "tokens")
        world = int(os.environ["WORLD_SIZE"])
        steps = 100_000
        configs = {r: build_config(prefix, f"{folder}/run{r}", world, r, steps) for r in (0, args.redundant)}
        ctx = init_distributed(configs[0])
        try:
            if ctx.rank == 0:
                write_tokens(prefix, 512, 1024 * 1024)
            dist.barrier()
            trainers = {}
            for redundant, config in configs.items():
                torch.manual_seed(0)
                trainers[redundant] = Trainer(config, ctx)
            bias = calibrate(trainers[0])
            for trainer in trainers.values():
                set_bias(trainer, bias)
                timed_steps(trainer, 4)  # warm-up, and the first re-placement of the replicated run
            results = {r: ([], []) for r in trainers}
            for _ in range(args.blocks):
                for redundant, trainer in trainers.items():
                    times, ratios = timed_steps(trainer, args.steps)
                    results[redundant][0].extend(times)
                    results[redundant][1].extend(ratios)
            if ctx.rank == 0:
                without, with_copies = results[0], results[args.redundant]
                print(f"hot expert bias {bias:.2f} (about {HOT_SHARE:.0%} of the assignments on expert 0)")
                for name, (times, ratios) in (("without copies", without), ("with copies", with_copies)):
                    print(
                        f"{name:>15}: step {statistics.median(times) * 1e3:.1f} ms (median of {len(times)}), "
                        f"busiest rank's rows / mean {statistics.mean(ratios):.3f}"
                    )
                print(
                    f"RESULT ep={world} busiest_over_mean_without={statistics.mean(without[1]):.3f} "
                    f"busiest_over_mean_with={statistics.mean(with_copies[1]):.3f} "
                    f"step_time_with_over_without={statistics.median(with_copies[0]) / statistics.median(without[0]):.3f}"
                )
        finally:
            shutdown()
    finally:
        if os.environ.get("RANK", "0") == "0":
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
