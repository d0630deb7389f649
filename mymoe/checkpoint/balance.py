"""Which rank writes each replicated tensor, so that every rank has about as many bytes to write.

Ranks write their files in parallel and a save ends when the last one is done. A tensor every rank holds
(embeddings, attention, norms, and their optimizer moments) is written by one rank only. DCP's own dedup
gives each such tensor, in key order, to the rank with the fewest bytes counted so far, counting each rank's
own tensors (its experts) only when it reaches them: at EP=2 on 2 ranks that left one rank 1.25 GB to write
and the other 1.55 GB. Here each rank first counts everything only it holds, then the shared tensors go,
largest first, each to the holder with the fewest bytes so far.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict

from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.planner import SavePlan


def balance_shared_items(plans: list[SavePlan]) -> list[SavePlan]:
    """The plans with each item that several of them hold kept by one only, balancing the bytes each writes."""
    holders: dict = defaultdict(list)  # item index -> ranks holding it
    items = {}
    for rank, plan in enumerate(plans):
        for item in plan.items:
            holders[item.index].append(rank)
            items[item.index] = item
    planned = [0] * len(plans)
    for index, ranks in holders.items():
        if len(ranks) == 1:
            planned[ranks[0]] += item_bytes(items[index])
    shared = [index for index, ranks in holders.items() if len(ranks) > 1]
    writer = {}
    for index in sorted(shared, key=lambda index: (-item_bytes(items[index]), index.fqn, tuple(index.offset or ()))):
        rank = min(holders[index], key=lambda rank: (planned[rank], rank))
        writer[index] = rank
        planned[rank] += item_bytes(items[index])
    return [
        dataclasses.replace(plan, items=[item for item in plan.items if writer.get(item.index, rank) == rank])
        for rank, plan in enumerate(plans)
    ]


def item_bytes(item) -> int:
    return item.tensor_storage_size() or 1  # (a non-tensor item has no size DCP knows)


class BalancedSavePlanner(DefaultSavePlanner):
    """DCP's save planner with the shared tensors spread by balance_shared_items; DCP's dedup then finds
    nothing left to remove."""

    def create_global_plan(self, all_plans: list[SavePlan]) -> tuple[list[SavePlan], Metadata]:
        return super().create_global_plan(balance_shared_items(all_plans))
