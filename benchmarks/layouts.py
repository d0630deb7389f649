"""FSDP against the replicated layout: tokens/s of a full training step on gloo ranks of this machine.

    python benchmarks/layouts.py [--world 2] [--repeats 5] [--layers 4]   (train.py runs it too)

The layouts train the same model (train.py's benchmark model) with data parallelism over `world`
processes of one thread each: zero the gradients, forward with the loss, backward, gradient reduction
(an all-reduce per step when replicated; FSDP's reduce-scatters in backward, after its all-gathers in
forward and, with the default parallel.fsdp_reshard_after_forward=true, again in backward), clipping on
the global norm, AdamW. "fsdp_no_reshard" keeps each block gathered from its forward to its backward
(fsdp_reshard_after_forward=false: one all-gather per block per step, more memory). Every repeat times
each layout once, after a barrier, as the slowest rank saw it; the median repeat counts. The last line
RESULT fsdp_tokens_per_s=<t> replicated_tokens_per_s=<t> fsdp_vs_replicated=<fsdp / replicated>
       fsdp_no_reshard_vs_replicated=<r>
"""

from __future__ import annotations

import argparse
import datetime
import multiprocessing
import os
import statistics
import sys
import time

import torch

MICRO_BATCH_SIZE = 4
SEQ_LEN = 256
LAYOUTS = ("replicated", "fsdp", "fsdp_no_reshard")


def _worker(rank: int, world_size: int, port: int, model_config, repeats: int, queue) -> None:
    os.environ.update(
        {"RANK": str(rank), "WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    )
    torch.set_num_threads(1)
    import torch.distributed as dist

    from mymoe.config import ParallelConfig, TrainConfig
    from mymoe.model.transformer import MoECausalLM
    from mymoe.parallel import build_context, clip_grad_norm_, parallelize, reduce_gradients
    from mymoe.parallel.fsdp import apply_fsdp
    from mymoe.optim import build_optimizer, parameter_groups

    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=600))
    try:
        ctx = build_context(1, device=torch.device("cpu"), timeout_seconds=600)
        train = TrainConfig()
        models, optimizers = {}, {}
        for name in LAYOUTS:
            torch.manual_seed(0)
            model = parallelize(MoECausalLM(model_config).train(), ctx)
            if name != "replicated":
                apply_fsdp(model, ctx, ParallelConfig(fsdp=True, fsdp_reshard_after_forward=name == "fsdp"))
            models[name] = model
            optimizers[name] = build_optimizer(parameter_groups(model, train.weight_decay), train)
        generator = torch.Generator().manual_seed(rank)
        batches = [
            torch.randint(0, model_config.vocab_size, (MICRO_BATCH_SIZE, SEQ_LEN + 1), generator=generator)
            for _ in range(repeats + 1)
        ]
        times = {name: [] for name in LAYOUTS}
        for repeat, batch in enumerate(batches):
            for name in LAYOUTS:
                model, optimizer = models[name], optimizers[name]
                dist.barrier()
                start = time.perf_counter()
                optimizer.zero_grad(set_to_none=True)
                model(batch[:, :-1], shift_labels=batch[:, 1:]).loss.backward()
                reduce_gradients(model, ctx)  # a no-op under FSDP, which reduced in backward
                clip_grad_norm_(model, train.grad_clip, ctx)
                optimizer.step()
                elapsed = torch.tensor(time.perf_counter() - start)
                dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
                if repeat > 0:  # the warm-up pays first-call allocations and AdamW's state creation
                    times[name].append(float(elapsed))
            if rank == 0:
                print(
                    f"  {'warm-up' if repeat == 0 else f'repeat {repeat}/{repeats}':12s} "
                    + "  ".join(f"{name} {times[name][-1]:.2f} s" if repeat else name for name in LAYOUTS),
                    flush=True,
                )
        if rank == 0:
            queue.put({name: statistics.median(values) for name, values in times.items()})
    finally:
        dist.destroy_process_group()


def compare(model_config, world_size: int = 2, repeats: int = 5) -> dict:
    """{fsdp_tokens_per_s, replicated_tokens_per_s, fsdp_vs_replicated} of `world_size` spawned gloo ranks."""
    from mymoe.parallel.env import free_port

    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    port = free_port()
    processes = [
        context.Process(target=_worker, args=(rank, world_size, port, model_config, repeats, queue))
        for rank in range(world_size)
    ]
    for process in processes:
        process.start()
    step_time = queue.get(timeout=1800)
    for process in processes:
        process.join()
    tokens = world_size * MICRO_BATCH_SIZE * SEQ_LEN
    for name, seconds in step_time.items():
        print(f"  {name:10s} {tokens / seconds:8.0f} tokens/s   {seconds:6.3f} s/step   (world {world_size})")
    return {
        "fsdp_tokens_per_s": tokens / step_time["fsdp"],
        "replicated_tokens_per_s": tokens / step_time["replicated"],
        "fsdp_vs_replicated": step_time["replicated"] / step_time["fsdp"],
        "fsdp_no_reshard_vs_replicated": step_time["replicated"] / step_time["fsdp_no_reshard"],
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args(argv)
    from train import model_config

    config = model_config(args.layers)
    print(
        f"training step, FSDP against replicated data parallelism over {args.world} gloo ranks of one thread: "
        f"{args.layers} layers, hidden {config.hidden_size}, {config.moe.n_routed_experts} experts; micro-batch "
        f"{MICRO_BATCH_SIZE} x {SEQ_LEN} per rank, fp32; 1 warm-up + {args.repeats} interleaved repeats, median"
    )
    result = compare(config, args.world, args.repeats)
    print(
        "RESULT "
        + " ".join(
            f"{key}={value:.0f}" if key.endswith("tokens_per_s") else f"{key}={value:.3f}"
            for key, value in result.items()
        )
    )


if __name__ == "__main__":
    sys.exit(main())
