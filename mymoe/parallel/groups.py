"""The 2-D layout of ranks: expert parallel (ep) x expert data parallel (edp).

With world size 4 and expert_parallel_size 2:

    ep groups  (split the experts, exchange tokens):  [0, 1] [2, 3]   contiguous, so on one node
    edp groups (hold the same experts, average them): [0, 2] [1, 3]   strided
    dense parameters are replicated on all 4 ranks and averaged over the world.

Rank r holds global experts [ep_rank * E / ep, (ep_rank + 1) * E / ep) where ep_rank = r % ep.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.distributed as dist


def owned_experts(num_experts: int, expert_parallel_size: int, expert_parallel_rank: int) -> tuple[int, int]:
    """(first global expert index, number of experts) an expert-parallel rank holds: contiguous blocks of
    num_experts / expert_parallel_size in rank order. The one statement of who owns which expert."""
    if num_experts % expert_parallel_size:
        raise ValueError(
            f"num_experts={num_experts} must be divisible by the expert-parallel size {expert_parallel_size}"
        )
    per_rank = num_experts // expert_parallel_size
    return expert_parallel_rank * per_rank, per_rank


def expert_parallel_ranks(world_size: int, expert_parallel_size: int) -> list[list[int]]:
    """Contiguous blocks of ranks that together hold every expert once."""
    return [list(range(start, start + expert_parallel_size)) for start in range(0, world_size, expert_parallel_size)]


def expert_data_parallel_ranks(world_size: int, expert_parallel_size: int) -> list[list[int]]:
    """Ranks holding the same experts: one from each expert-parallel block."""
    return [list(range(ep_rank, world_size, expert_parallel_size)) for ep_rank in range(expert_parallel_size)]


@dataclass
class ParallelContext:
    """Where this process sits in the layout, and the groups it talks over.

    Groups are None in a single process (no process group needed); with world size > 1 they are always
    process groups, possibly of one rank.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: Optional[str] = None  # None: single process, no process group
    timeout_seconds: float = 600.0
    launcher: str = "single"
    expert_parallel_size: int = 1
    expert_parallel_rank: int = 0
    expert_parallel_group: Any = None
    expert_data_parallel_size: int = 1
    expert_data_parallel_rank: int = 0
    expert_data_parallel_group: Any = None
    dispatcher: str = "alltoall"  # how MoE layers move tokens between ep ranks: "alltoall" or "allgather"
    a2a_chunks: int = 1  # parallel.a2a_chunks: the all-to-all dispatchers' pipelined exchange

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    def local_experts(self, num_experts: int) -> tuple[int, int]:
        """(first global expert index, number of experts) this rank holds."""
        return owned_experts(num_experts, self.expert_parallel_size, self.expert_parallel_rank)


def build_context(
    expert_parallel_size: int,
    *,
    device: torch.device,
    timeout_seconds: float,
    launcher: str = "torchrun",
    local_rank: int = 0,
    dispatcher: str = "alltoall",
    a2a_chunks: int = 1,
) -> ParallelContext:
    """Make the ep and edp groups over an initialised default process group (collective: every rank calls).

    expert_parallel_size must divide the world size; config.validate has checked it before any collective.
    """
    rank, world_size = dist.get_rank(), dist.get_world_size()
    if world_size % expert_parallel_size:
        raise ValueError(f"expert_parallel_size={expert_parallel_size} must divide the world size {world_size}")
    timeout = datetime.timedelta(seconds=timeout_seconds)
    ep_group, _ = dist.new_subgroups_by_enumeration(
        expert_parallel_ranks(world_size, expert_parallel_size), timeout=timeout
    )
    edp_group, _ = dist.new_subgroups_by_enumeration(
        expert_data_parallel_ranks(world_size, expert_parallel_size), timeout=timeout
    )
    return ParallelContext(
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        device=device,
        backend=dist.get_backend(),
        timeout_seconds=timeout_seconds,
        launcher=launcher,
        expert_parallel_size=expert_parallel_size,
        expert_parallel_rank=rank % expert_parallel_size,
        expert_parallel_group=ep_group,
        expert_data_parallel_size=world_size // expert_parallel_size,
        expert_data_parallel_rank=rank // expert_parallel_size,
        expert_data_parallel_group=edp_group,
        dispatcher=dispatcher,
        a2a_chunks=a2a_chunks,
    )
