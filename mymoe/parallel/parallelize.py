"""Apply expert parallelism to a model built whole on every rank: shard experts, install dispatchers,
and make replicated state identical.

The model is plain PyTorch that runs in one process; this is the only place that changes it for a
layout. Each MoE layer keeps experts [first, first + E / ep) of the rank's expert-parallel slice and
gets a dispatcher over the expert-parallel group. Dense parameters and buffers are then broadcast from
rank 0, and expert parameters from the first rank of each expert-data-parallel group, so replicas agree
even when ranks were seeded differently.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from mymoe.config import DispatcherName
from mymoe.model.moe.experts import is_expert
from mymoe.parallel.collectives import apply_flat, named_collective
from mymoe.parallel.dedup_dispatch import DedupAllToAllDispatcher
from mymoe.parallel.dispatch import AllGatherDispatcher, AllToAllDispatcher, ExchangeDispatcher, GroupDispatcher
from mymoe.parallel.groups import ParallelContext

# one per value of parallel.dispatcher (config.DispatcherName); each satisfies model.moe.dispatch.Dispatcher
DISPATCHERS: dict[DispatcherName, type[GroupDispatcher]] = {
    "alltoall": AllToAllDispatcher,
    "alltoall_dedup": DedupAllToAllDispatcher,
    "allgather": AllGatherDispatcher,
}


def parallelize(model: torch.nn.Module, ctx: ParallelContext) -> torch.nn.Module:
    """Shard and wire `model` in place for ctx's layout (collective: every rank calls); returns it."""
    if ctx.expert_parallel_size > 1:
        dispatcher_class = DISPATCHERS[ctx.dispatcher]
        pipelined = {"chunks": ctx.a2a_chunks} if issubclass(dispatcher_class, ExchangeDispatcher) else {}
        module_names = {id(module): name for name, module in model.named_modules()}
        for layer in model.iter_moe_layers():
            dispatcher = dispatcher_class(
                ctx.expert_parallel_group,
                layer.experts.num_global_experts,
                name=module_names.get(id(layer), "moe"),
                timeout_seconds=ctx.timeout_seconds,
                **pipelined,
            )
            layer.experts.shard(dispatcher.first_local_expert, dispatcher.num_local_experts)
            layer.set_dispatcher(dispatcher)
    if ctx.is_distributed:
        synchronize_replicas(model, ctx)
    return model


def synchronize_replicas(model: torch.nn.Module, ctx: ParallelContext) -> None:
    """Copy rank 0's dense parameters and buffers to every rank, and each expert slice across its edp group."""
    dense = [p for p in model.parameters() if not is_expert(p)] + list(model.buffers())
    expert = [p for p in model.parameters() if is_expert(p)]

    def from_rank0(flat):
        with named_collective("broadcast (dense parameters from rank 0)", ctx.timeout_seconds):
            dist.broadcast(flat, src=0)

    def from_first_replica(flat):
        # edp groups are [ep_rank, ep_rank + ep, ...]: their first member's global rank is ep_rank
        with named_collective("broadcast (expert parameters, expert-data-parallel group)", ctx.timeout_seconds):
            dist.broadcast(flat, src=ctx.expert_parallel_rank, group=ctx.expert_data_parallel_group)

    apply_flat(dense, from_rank0, ctx.device)
    if ctx.expert_data_parallel_size > 1:
        apply_flat(expert, from_first_replica, ctx.device)
