"""What imbalance costs: training under the router's own choices against the same run with balanced routing.

    torchrun --nproc_per_node=2 benchmarks/routing.py [--steps 30] [--capacity-factor F] [--out runs/routing]

Both runs train the same MoE model (8 experts, top-2, EP=2 on the 2 ranks, one thread each) with the
project's Trainer on real text (benchmarks/books.py: books of the shared corpus, tokenised once), from the
same seed and data, one with natural routing and one with moe.force_balanced_routing, which gives every
expert the same number of assignments; the two take steps in turn, so that load from other processes on
the machine falls on both alike. Dropless by default (--capacity-factor drops instead of waiting).
Logged per step, for each run: tokens/s, the dropped fraction, the busiest rank's expert rows against
the mean over ranks (summed over layers, each layer waiting on its busiest rank), and each layer's max
expert load / mean. The curves go to <out>/routing.png; the last line reads
    RESULT natural_tokens_per_s=<t> balanced_tokens_per_s=<t> natural_vs_balanced=<natural / balanced>
           natural_busiest_rank=<rows ratio> natural_max_load=<mean over layers and steps>
The first --warmup steps of each run are left out of the tokens/s.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from books import DEFAULT_CORPUS, prepare_books
from mymoe.config import config_from_dict
from mymoe.parallel import init_distributed
from mymoe.train.loop import Trainer
from peers import require_launch

SEQ_LEN = 256
MICRO_BATCH_SIZE = 4  # per rank
RUNS = (("natural", False), ("balanced", True))  # moe.force_balanced_routing off, on


def run_config(books, args, forced: bool) -> dict:
    return {
        "model": {
            "vocab_size": 8192,
            "hidden_size": 256,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": SEQ_LEN,
            "moe": {
                "n_routed_experts": 8,
                "num_experts_per_tok": 2,
                "moe_intermediate_size": 256,
                "capacity_factor": args.capacity_factor,
                "force_balanced_routing": forced,
            },
        },
        "parallel": {"expert_parallel_size": 2},
        "train": {"micro_batch_size": MICRO_BATCH_SIZE, "max_steps": args.steps, "lr": 2e-3, "warmup_steps": 5},
        "data": {"seq_len": SEQ_LEN, "train_prefixes": [books.train_prefix], "tokenizer": books.tokenizer},
    }


def step_figures(loads: torch.Tensor, ranks: int) -> tuple[float, list]:
    """loads [layers, experts] over all ranks -> (busiest rank's rows / mean rows, per-layer max / mean load)."""
    rows = loads.view(loads.shape[0], ranks, -1).sum(-1)  # [layers, ranks]: rows each rank's experts process
    busiest = float(rows.max(-1).values.sum() / rows.mean(-1).sum())
    return busiest, (loads.max(-1).values / loads.mean(-1).clamp(min=1e-9)).tolist()


def build_trainer(config: dict) -> Trainer:
    config = config_from_dict(config)
    return Trainer(config, init_distributed(config))


def timed_step(trainer: Trainer, log: dict) -> str:
    """One training step, its figures appended to log; returns them as a line."""
    start = time.perf_counter()
    metrics = trainer.train_step()
    loads = torch.tensor(metrics["expert_loads"])  # reading it waits for the step to finish
    seconds = time.perf_counter() - start
    busiest, max_load = step_figures(loads, trainer.ctx.expert_parallel_size)
    dropped = sum(metrics["dropped"]) / len(metrics["dropped"])
    for key, value in zip(log, (trainer.tokens_per_step / seconds, dropped, busiest, max_load)):
        log[key].append(value)
    return (
        f"{log['tokens_per_s'][-1]:6.0f} tokens/s  dropped {dropped:.3f}  busiest rank {busiest:.2f}x  "
        f"max/mean load per layer " + " ".join(f"{ratio:.2f}" for ratio in max_load)
    )


def mean_tokens_per_second(log: dict, warmup: int) -> float:
    """Tokens over time of the steps after the warm-up (every step has the same tokens: a harmonic mean)."""
    timed = log["tokens_per_s"][warmup:]
    return len(timed) / sum(1 / rate for rate in timed)


def plot(logs: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True)
    panels = [
        ("tokens_per_s", "tokens/s"),
        ("dropped", "dropped fraction"),
        ("busiest_rank", "busiest rank's expert rows / mean"),
        ("max_load", "max expert load / mean, per layer"),
    ]
    for axis, (key, title) in zip(axes.flat, panels):
        for (name, log), colour in zip(logs.items(), ("tab:red", "tab:blue")):
            values = torch.tensor(log[key], dtype=torch.float64)
            steps = range(1, len(values) + 1)
            if values.dim() == 1:
                axis.plot(steps, values, color=colour, label=name)
            else:
                for layer, column in enumerate(values.t()):
                    axis.plot(steps, column, color=colour, alpha=1 - 0.3 * layer, label=f"{name} layer {layer}")
        axis.set_title(title)
        axis.set_xlabel("step")
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def main() -> None:
    require_launch("routing.py", torchrun=True)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="training steps of each run")
    parser.add_argument("--warmup", type=int, default=3, help="first steps of each run left out of tokens/s")
    parser.add_argument("--capacity-factor", type=float, default=None, help="default: dropless")
    parser.add_argument("--out", type=Path, default=Path("runs/routing"))
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    parser.add_argument("--data-dir", type=Path, default=Path(tempfile.gettempdir()) / "mymoe-bench-data")
    args = parser.parse_args()
    if args.steps <= args.warmup:
        parser.error(f"--steps {args.steps} must exceed --warmup {args.warmup}: no step would be timed")
    torch.set_num_threads(1)

    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    if world_size != 2:
        raise SystemExit(f"error: {world_size} processes; run with torchrun --nproc_per_node=2 (EP=2)")
    say = print if rank == 0 else (lambda *a, **k: None)
    if rank == 0:  # one rank tokenises, the other reuses its files
        prepare_books(args.corpus, args.data_dir)
    dist.barrier()
    books = prepare_books(args.corpus, args.data_dir)
    say(
        f"{args.steps} training steps per run, EP={world_size} on {world_size} ranks, 1 thread each, "
        f"{MICRO_BATCH_SIZE * SEQ_LEN * world_size:,} tokens/step, "
        + ("dropless" if args.capacity_factor is None else f"capacity factor {args.capacity_factor}")
    )

    # both runs built first and stepped in turn, so that the machine's load falls on both alike
    runs = {name: build_trainer(run_config(books, args, forced)) for name, forced in RUNS}
    logs = {name: {"tokens_per_s": [], "dropped": [], "busiest_rank": [], "max_load": []} for name in runs}
    for step in range(1, args.steps + 1):
        for name, trainer in runs.items():
            say(f"  step {step:3d} {name:8s} {timed_step(trainer, logs[name])}")
    speed = {name: mean_tokens_per_second(log, args.warmup) for name, log in logs.items()}

    natural = logs["natural"]
    if rank == 0:
        args.out.mkdir(parents=True, exist_ok=True)
        plot(logs, args.out / "routing.png")
    busiest = sum(natural["busiest_rank"]) / len(natural["busiest_rank"])
    max_load = torch.tensor(natural["max_load"]).mean()
    say(
        f"natural {speed['natural']:.0f} tokens/s, balanced {speed['balanced']:.0f} "
        f"tokens/s; natural routing: busiest rank {busiest:.2f}x the mean rows, max/mean expert load "
        f"{float(max_load):.2f}; curves in {args.out / 'routing.png'}"
    )
    say(
        f"RESULT natural_tokens_per_s={speed['natural']:.0f} "
        f"balanced_tokens_per_s={speed['balanced']:.0f} "
        f"natural_vs_balanced={speed['natural'] / speed['balanced']:.3f} "
        f"natural_busiest_rank={busiest:.3f} natural_max_load={float(max_load):.3f}"
    )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
