"""Expert-parallel MoE layer against DeepSpeed's MoE, forward + backward, in one torchrun job.

    torchrun --nproc_per_node=2 benchmarks/moe_ep.py [--repeats 5] [--dispatcher alltoall] [--chunks 0 1 2]

Both layers get the same router and expert weights and the same input, so they route identically and do
the same expert work (DeepSpeed is given a SwiGLU nn.Module expert); the benchmark checks their outputs
agree before timing. Ours runs dropless; DeepSpeed runs with drop_tokens=False, which pads every expert
to the busiest expert's count. Repetitions interleave the two layers and both workloads so that noise
from other processes on the machine falls on all of them alike; the median of the repetitions counts.

Our layer is timed once per value of --chunks (parallel.a2a_chunks; 0: without overlap, blocking
all-to-alls one step after another), each its own layer with the same weights, interleaved with the
others and DeepSpeed's. Prints global tokens/s for each layer and
workload, the share of our layer's time exposed to all-to-all (blocked in a call or waiting on an async
handle, waiting there for a slower peer included; transfer time hidden behind compute is not counted),
each rank's split of it, and ends with one line, for each chunk count c:
    RESULT coarse_vs_deepspeed_chunks<c>=<r> fine_vs_deepspeed_chunks<c>=<r> exposed_a2a_share_chunks<c>=<f> ...
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

from mymoe.config import MoEConfig
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
    transfer spends in flight while we compute is not counted; waiting there for a slower peer is.
    ``by_kind`` splits it: the count exchange, and the waits for dispatch / combine, forward / backward."""

    def __init__(self):
        self.seconds = 0.0
        self.by_kind: dict = {}
        self.counting = False  # only while our layer runs (DeepSpeed's layer calls all_to_all_single too)

    @staticmethod
    def install_all(clocks: list) -> None:
        """Time all_to_all_single and collectives.wait into whichever of ``clocks`` is counting."""

        def wait_kind(work, name, *rest):
            return ("dispatch" if "dispatch" in name else "combine") + (" backward" if "backward" in name else "")

        def timing(function, kind_of):
            def timed(*args, **kwargs):
                start = time.perf_counter()
                try:
                    return function(*args, **kwargs)
                finally:
                    for clock in clocks:
                        if clock.counting:
                            elapsed = time.perf_counter() - start
                            clock.seconds += elapsed
                            kind = kind_of(*args)
                            clock.by_kind[kind] = clock.by_kind.get(kind, 0.0) + elapsed

            return timed

        dist.all_to_all_single = timing(dist.all_to_all_single, lambda *args: "blocking calls")
        collectives.wait = timing(collectives.wait, wait_kind)


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
        "--chunks",
        type=int,
        nargs="+",
        default=[0, 1, 2],
        help="values of parallel.a2a_chunks (the pipelined exchange) to time, each as its own layer; 0 times "
        "the layer without overlap (blocking dispatch, experts, blocking combine)",
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
        f"{args.dispatcher} with a2a_chunks {args.chunks} vs DeepSpeed MoE (drop_tokens=False), {args.warmup} "
        f"warm-up + {args.repeats} timed repetitions, interleaved"
    )

    layers, inputs = {}, {}
    for workload in WORKLOADS:
        ours = {chunks: build_ours(workload, ctx, args.dispatcher, chunks) for chunks in args.chunks}
        theirs = build_deepspeed(workload, ours[args.chunks[0]], world_size)
        generator = torch.Generator().manual_seed(10 + rank)
        # the input needs a gradient, as inside a model, so the backward runs the dispatch all-to-all too
        hidden = torch.randn(workload.tokens_per_rank, workload.hidden_size, generator=generator).requires_grad_()
        upstream = torch.randn(workload.tokens_per_rank, workload.hidden_size, generator=generator)
        reference = step_deepspeed(theirs, hidden, upstream).detach()
        difference = max(
            (step_ours(layer, hidden, upstream).detach() - reference).abs().max() for layer in ours.values()
        )
        dist.all_reduce(difference, op=dist.ReduceOp.MAX)
        say(
            f"  {workload.name}: outputs of the layers differ by at most {float(difference):.2e}; "
            f"expert rows per rank: ours {expert_rows_ours(ours[args.chunks[0]], hidden, world_size)}, DeepSpeed "
            f"{expert_rows_deepspeed(theirs, hidden, workload, world_size)} (every expert padded to the busiest)"
        )
        layers[workload.name], inputs[workload.name] = (ours, theirs), (hidden, upstream)

    clocks = {chunks: ExposedClock() for chunks in args.chunks}
    ExposedClock.install_all(list(clocks.values()))
    seconds = {(w.name, who): [] for w in WORKLOADS for who in args.chunks + ["deepspeed"]}
    for repeat in range(args.warmup + args.repeats):
        for workload in WORKLOADS:
            ours, theirs = layers[workload.name]
            hidden, upstream = inputs[workload.name]
            for chunks, layer in ours.items():
                clocks[chunks].counting = repeat >= args.warmup
                elapsed = timed(step_ours, layer, hidden, upstream)
                clocks[chunks].counting = False
                if repeat >= args.warmup:
                    seconds[workload.name, chunks].append(elapsed)
            elapsed = timed(step_deepspeed, theirs, hidden, upstream)
            if repeat >= args.warmup:
                seconds[workload.name, "deepspeed"].append(elapsed)
        say(
            f"  repetition {repeat + 1}/{args.warmup + args.repeats}{' (warm-up)' if repeat < args.warmup else ''} done"
        )

    results = []
    for chunks in args.chunks:
        ratios = {}
        for workload in WORKLOADS:
            global_tokens = workload.tokens_per_rank * world_size
            ours = statistics.median(seconds[workload.name, chunks])
            theirs = statistics.median(seconds[workload.name, "deepspeed"])
            ratios[workload.name] = theirs / ours
            say(
                f"  a2a_chunks={chunks} {workload.name:6s} ours {global_tokens / ours:9.0f} tok/s   deepspeed "
                f"{global_tokens / theirs:9.0f} tok/s   ratio {ratios[workload.name]:.2f}"
            )
        ours_total = sum(sum(seconds[w.name, chunks]) for w in WORKLOADS)
        # every rank's exposed time over its own share of the timed steps, averaged over the ranks
        exposed = torch.tensor([clocks[chunks].seconds / ours_total])
        dist.all_reduce(exposed)
        exposed_share = float(exposed) / world_size
        split = ", ".join(f"{kind} {spent / ours_total:.3f}" for kind, spent in sorted(clocks[chunks].by_kind.items()))
        print(f"  a2a_chunks={chunks} rank {rank}: exposed all-to-all as a share of our layer's time: {split}")
        dist.barrier()
        say(
            f"  a2a_chunks={chunks}: share of our layer's time blocked on all-to-all (mean of the ranks): {exposed_share:.3f}"
        )
        results.append(
            f"coarse_vs_deepspeed_chunks{chunks}={ratios['coarse']:.2f} fine_vs_deepspeed_chunks{chunks}="
            f"{ratios['fine']:.2f} exposed_a2a_share_chunks{chunks}={exposed_share:.3f}"
        )
    say("RESULT " + " ".join(results))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
