"""Expert-parallel MoE layer against DeepSpeed's MoE, forward + backward, in one torchrun job.

    torchrun --nproc_per_node=2 benchmarks/moe_ep.py [--repeats 5] [--dispatcher alltoall] [--chunks 2]

Both layers get the same router and expert weights and the same input, so they route identically and do
the same expert work (DeepSpeed is given a SwiGLU nn.Module expert); the benchmark checks their outputs
agree before timing. Ours runs dropless; DeepSpeed runs with drop_tokens=False, which pads every expert
to the busiest expert's count. Repetitions interleave the two layers and both workloads so that noise
from other processes on the machine falls on all of them alike; the median of the repetitions counts.

Prints global tokens/s for each layer and workload, the share of our layer's time exposed to all-to-all
(blocked in a call or waiting on an async handle, waiting there for a slower peer included; transfer
time hidden behind compute is not counted), and ends with one line:
    RESULT coarse_vs_deepspeed=<r> fine_vs_deepspeed=<r> exposed_a2a_share=<fraction>
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from mymoe.config import MoEConfig, ParallelConfig
from mymoe.model.layers import SwiGLU
from mymoe.model.moe.layer import MoELayer
from mymoe.parallel import build_context, collectives
from mymoe.parallel.parallelize import DISPATCHERS
from peers import require_launch


@dataclass
class Workload:
    name: str
    tokens_per_rank: int
    hidden_size: int
    ffn_size: int
    num_experts: int
    top_k: int


WORKLOADS = [Workload("coarse", 2048, 512, 1024, 8, 2), Workload("fine", 2048, 512, 256, 64, 6)]


class ExposedClock:
    """Wall time our layer's thread spends blocked on all-to-all: inside all_to_all_single calls (the
    blocking count exchange; an async_op call only enqueues) and inside waits on async handles. Time a
    transfer spends in flight while we compute is not counted; waiting there for a slower peer is."""

    def __init__(self):
        self.seconds = 0.0

    def _timing(self, function):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        return timed

    def install(self):
        dist.all_to_all_single = self._timing(dist.all_to_all_single)
        collectives.wait = self._timing(collectives.wait)


def build_ours(workload: Workload, ctx, dispatcher_name: str, chunks: int) -> MoELayer:
    moe = MoEConfig(
        n_routed_experts=workload.num_experts,
        num_experts_per_tok=workload.top_k,
        moe_intermediate_size=workload.ffn_size,
        router_aux_loss_coef=0.01,
    )
    torch.manual_seed(0)  # same full-size init on every rank, then each keeps its slice
    layer = MoELayer(workload.hidden_size, moe)
    dispatcher = DISPATCHERS[dispatcher_name](
        ctx.expert_parallel_group, workload.num_experts, name=workload.name, timeout_seconds=ctx.timeout_seconds
    )
    if dispatcher_name != "allgather":
        dispatcher.chunks = chunks
    layer.experts.shard(dispatcher.first_local_expert, dispatcher.num_local_experts)
    layer.set_dispatcher(dispatcher)
    return layer


def build_deepspeed(workload: Workload, ours: MoELayer, expert_parallel_size: int):
    from deepspeed.moe.layer import MoE

    layer = MoE(
        workload.hidden_size,
        SwiGLU(workload.hidden_size, workload.ffn_size),
        workload.num_experts,
        ep_size=expert_parallel_size,
        k=workload.top_k,
        drop_tokens=False,
        use_rts=False,
        top2_2nd_expert_sampling=False,
    )
    layer.set_deepspeed_parallelism()  # deepspeed.initialize would do this; it makes the ep groups
    with torch.no_grad():  # our weights, so both route alike and do the same expert work
        layer.deepspeed_moe.gate.wg.weight.copy_(ours.gate.weight)
        local_experts = layer.deepspeed_moe.experts.deepspeed_experts
        for index, expert in enumerate(local_experts):
            expert.gate_proj.weight.copy_(ours.experts.w_gate[index].t())
            expert.up_proj.weight.copy_(ours.experts.w_up[index].t())
            expert.down_proj.weight.copy_(ours.experts.w_down[index].t())
    return layer


def expert_rows_ours(layer, hidden, world_size: int) -> int:
    """Rows the busiest rank's experts process: its share of the group's tokens_per_expert."""
    with torch.no_grad():
        load = layer(hidden)[1].tokens_per_expert.clone()
    dist.all_reduce(load)
    return int(load.view(world_size, -1).sum(1).max())


def expert_rows_deepspeed(layer, hidden, workload: Workload, world_size: int) -> int:
    """drop_tokens=False pads every expert to the largest count on any rank, on every rank."""
    with torch.no_grad():
        busiest = layer(hidden)[2].max().clone()
    dist.all_reduce(busiest, op=dist.ReduceOp.MAX)
    return int(busiest) * workload.num_experts


def step_ours(layer, hidden, upstream):
    output, aux = layer(hidden)
    ((output * upstream).sum() + aux.aux_loss).backward()
    return output


def step_deepspeed(layer, hidden, upstream):
    output, l_aux, _ = layer(hidden)
    ((output * upstream).sum() + 0.01 * l_aux).backward()
    return output


def timed(step, layer, hidden, upstream) -> float:
    layer.zero_grad(set_to_none=True)
    hidden.grad = None
    dist.barrier()
    start = time.perf_counter()
    step(layer, hidden, upstream)
    elapsed = torch.tensor([time.perf_counter() - start])
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the step is done when the slowest rank is
    return float(elapsed)


def main() -> None:
    require_launch("moe_ep.py", torchrun=True)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions of each layer and workload")
    parser.add_argument("--warmup", type=int, default=1, help="untimed repetitions first")
    parser.add_argument("--dispatcher", default="alltoall_dedup", choices=sorted(DISPATCHERS))
    parser.add_argument(
        "--chunks", type=int, default=ParallelConfig.a2a_chunks, help="parallel.a2a_chunks: the pipelined exchange"
    )
    args = parser.parse_args()

    torch.set_num_threads(1)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    from deepspeed.utils import logger as deepspeed_logger

    deepspeed_logger.setLevel(logging.WARNING)
    deepspeed.init_distributed(dist_backend="gloo")  # the default group both layers share
    rank, world_size = dist.get_rank(), dist.get_world_size()
    ctx = build_context(world_size, device=torch.device("cpu"), timeout_seconds=600)
    say = print if rank == 0 else (lambda *a, **k: None)
    say(
        f"MoE layer forward+backward, {world_size} ranks, EP={world_size}, 1 thread each, dispatcher "
        f"{args.dispatcher} ({args.chunks} chunks) vs DeepSpeed MoE (drop_tokens=False), {args.warmup} warm-up + {args.repeats} timed "
        f"repetitions, interleaved"
    )

    layers, inputs = {}, {}
    for workload in WORKLOADS:
        ours = build_ours(workload, ctx, args.dispatcher, args.chunks)
        theirs = build_deepspeed(workload, ours, world_size)
        generator = torch.Generator().manual_seed(10 + rank)
        # the input needs a gradient, as inside a model, so the backward runs the dispatch all-to-all too
        hidden = torch.randn(workload.tokens_per_rank, workload.hidden_size, generator=generator).requires_grad_()
        upstream = torch.randn(workload.tokens_per_rank, workload.hidden_size, generator=generator)
        difference = (step_ours(ours, hidden, upstream) - step_deepspeed(theirs, hidden, upstream)).detach().abs().max()
        dist.all_reduce(difference, op=dist.ReduceOp.MAX)
        say(
            f"  {workload.name}: outputs of the two layers differ by at most {float(difference):.2e}; "
            f"expert rows per rank: ours {expert_rows_ours(ours, hidden, world_size)}, DeepSpeed "
            f"{expert_rows_deepspeed(theirs, hidden, workload, world_size)} (every expert padded to the busiest)"
        )
        layers[workload.name], inputs[workload.name] = (ours, theirs), (hidden, upstream)

    clock = ExposedClock()
    clock.install()
    seconds = {(w.name, who): [] for w in WORKLOADS for who in ("ours", "deepspeed")}
    a2a_seconds = 0.0
    for repeat in range(args.warmup + args.repeats):
        for workload in WORKLOADS:
            ours, theirs = layers[workload.name]
            hidden, upstream = inputs[workload.name]
            clock.seconds = 0.0
            ours_seconds = timed(step_ours, ours, hidden, upstream)
            ours_a2a = torch.tensor([clock.seconds])
            theirs_seconds = timed(step_deepspeed, theirs, hidden, upstream)
            if repeat >= args.warmup:
                seconds[workload.name, "ours"].append(ours_seconds)
                seconds[workload.name, "deepspeed"].append(theirs_seconds)
                dist.all_reduce(ours_a2a)
                a2a_seconds += float(ours_a2a) / world_size
        say(
            f"  repetition {repeat + 1}/{args.warmup + args.repeats}{' (warm-up)' if repeat < args.warmup else ''} done"
        )

    ratios = {}
    for workload in WORKLOADS:
        global_tokens = workload.tokens_per_rank * world_size
        ours = statistics.median(seconds[workload.name, "ours"])
        theirs = statistics.median(seconds[workload.name, "deepspeed"])
        ratios[workload.name] = theirs / ours
        say(
            f"  {workload.name:6s} ours {global_tokens / ours:9.0f} tok/s   deepspeed {global_tokens / theirs:9.0f} "
            f"tok/s   ratio {ratios[workload.name]:.2f}"
        )
    ours_total = sum(sum(seconds[w.name, "ours"]) for w in WORKLOADS)
    a2a_share = a2a_seconds / ours_total
    say(f"  share of our layer's time blocked on all-to-all (waits for the peer included): {a2a_share:.3f}")
    say(
        f"RESULT coarse_vs_deepspeed={ratios['coarse']:.2f} fine_vs_deepspeed={ratios['fine']:.2f} "
        f"exposed_a2a_share={a2a_share:.3f}"
    )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
