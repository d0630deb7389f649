"""Dispatchers that send tokens to experts on other ranks of the expert-parallel group.

They have the interface of mymoe.model.moe.dispatch.LocalDispatcher, so the MoE layer does not know
which one it holds:

    batch, handle = dispatcher.dispatch(hidden, expert_indices, expert_weights, keep)   # ExpertBatch
    out = dispatcher.combine(experts(batch), handle)

Capacity is applied by the layer before dispatch, on each rank's own tokens, so these only move rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from mymoe.model.moe.dispatch import ExpertBatch, Permutation, permute, sort_by_expert, unpermute
from mymoe.parallel.collectives import AllGather, ReduceScatter, all_to_all, named_collective
from mymoe.parallel.groups import owned_experts


class GroupDispatcher:
    """What every expert-parallel dispatcher knows: its group, and which global experts this rank holds
    (``owned_experts``: a contiguous block of num_experts / group_size, in group-rank order)."""

    def __init__(self, group, num_experts: int, name: str = "moe", timeout_seconds: Optional[float] = None):
        self.group = group
        self.group_size = dist.get_world_size(group)
        self.num_experts = num_experts
        self.first_local_expert, self.num_local_experts = owned_experts(
            num_experts, self.group_size, dist.get_rank(group)
        )
        self.name = name
        self.timeout_seconds = timeout_seconds

    def owner_rank(self, expert_indices: torch.Tensor) -> torch.Tensor:
        """The group rank that holds each global expert index."""
        return torch.div(expert_indices, self.num_local_experts, rounding_mode="floor")


@dataclass
class AllToAllHandle:
    permutation: Permutation  # this rank's tokens -> rows sorted by global expert
    input_splits: list  # rows sent to each rank of the group
    output_splits: list  # rows received from each rank


class AllToAllDispatcher(GroupDispatcher):
    """Sort by expert, send each rank the rows for its experts, let the experts read them expert-major.

    Dispatch: permute (rows by global expert, hence by owner rank) -> exchange counts -> all-to-all rows
              (they arrive grouped by source rank, then expert) -> an ExpertBatch whose row_index reads
              them expert-major; the experts write each output back at the row it was read from.
    Combine:  reverse all-to-all (outputs are already in received order) -> weighted scatter back to
              token order.
    Every step is differentiable; the all-to-all's backward is the reverse all-to-all.
    """

    def _exchange_counts(self, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        """[num_experts] rows I send per global expert -> [group_size, local experts] rows I receive."""
        received = torch.empty_like(tokens_per_expert)
        with named_collective(f"all_to_all_single (token counts, MoE dispatch, {self.name})", self.timeout_seconds):
            dist.all_to_all_single(received, tokens_per_expert, group=self.group)
        return received.view(self.group_size, self.num_local_experts)

    def dispatch(self, hidden, expert_indices, expert_weights, keep):
        rows, tokens_per_expert, permutation = permute(hidden, expert_indices, expert_weights, keep, self.num_experts)
        received_counts = self._exchange_counts(tokens_per_expert)  # [source rank, local expert]
        input_splits = tokens_per_expert.view(self.group_size, self.num_local_experts).sum(1).tolist()
        output_splits = received_counts.sum(1).tolist()
        received = all_to_all(
            rows, output_splits, input_splits, self.group, f"MoE dispatch, {self.name}", self.timeout_seconds
        )
        # received rows are source-major; the experts need expert-major, so sort by local expert (stable
        # keeps each expert's rows in source-rank order)
        local_expert_of_row = torch.repeat_interleave(
            torch.arange(self.num_local_experts, device=received_counts.device).repeat(self.group_size),
            received_counts.reshape(-1),
        )
        expert_major_order = torch.argsort(local_expert_of_row, stable=True).to(received.device)
        handle = AllToAllHandle(permutation, input_splits, output_splits)
        # the experts read the received rows in expert-major order and write their outputs back in
        # received order, ready for the reverse all-to-all
        return ExpertBatch(received, received_counts.sum(0), row_index=expert_major_order), handle

    def combine(self, expert_output, handle: AllToAllHandle):
        returned = all_to_all(
            expert_output,
            handle.input_splits,
            handle.output_splits,
            self.group,
            f"MoE combine, {self.name}",
            self.timeout_seconds,
        )
        return unpermute(returned, handle.permutation)


@dataclass
class AllGatherHandle:
    padded_tokens: int  # every rank's tokens padded to this many for equal chunks
    num_tokens: int  # this rank's own tokens


class AllGatherDispatcher(GroupDispatcher):
    """Every rank sees every token of the group and computes only its own experts' share.

    Moves group_size times the tokens, but needs no count exchange before the data and no uneven splits:
    a fine choice for small expert-parallel groups on fast links. Combine reduce-scatters the partial
    outputs so each rank gets back the full mixture for its own tokens.
    """

    def _gather(self, tensor: torch.Tensor, padded_tokens: int, what: str) -> torch.Tensor:
        padding = tensor.new_zeros((padded_tokens - tensor.shape[0],) + tuple(tensor.shape[1:]))
        return AllGather.apply(
            torch.cat([tensor, padding]), self.group, f"{what}, MoE dispatch, {self.name}", self.timeout_seconds
        )

    def dispatch(self, hidden, expert_indices, expert_weights, keep):
        num_tokens = hidden.shape[0]
        counts = torch.tensor([num_tokens], device=expert_indices.device)
        with named_collective(f"all_reduce (token count, MoE dispatch, {self.name})", self.timeout_seconds):
            dist.all_reduce(counts, op=dist.ReduceOp.MAX, group=self.group)
        padded_tokens = int(counts)
        # dropped assignments and padding rows get expert -1, which no rank owns
        marked = torch.where(keep, expert_indices, torch.full_like(expert_indices, -1))
        padded_marked = torch.cat([marked, marked.new_full((padded_tokens - num_tokens, marked.shape[1]), -1)])
        all_indices = self._gather(padded_marked, padded_tokens, "expert indices")  # [group * padded, k]
        all_hidden = self._gather(hidden, padded_tokens, "hidden")  # [group * padded, hidden]
        all_weights = self._gather(expert_weights, padded_tokens, "expert weights")  # [group * padded, k]
        local_indices = all_indices - self.first_local_expert
        mine = (local_indices >= 0) & (local_indices < self.num_local_experts)
        source_token, row_weight, tokens_per_expert = sort_by_expert(
            local_indices, all_weights, mine, self.num_local_experts
        )
        # the experts add their weighted outputs into [group * padded, hidden]: my experts' share of
        # every gathered token
        batch = ExpertBatch(all_hidden, tokens_per_expert, row_index=source_token, row_weight=row_weight)
        return batch, AllGatherHandle(padded_tokens, num_tokens)

    def combine(self, expert_output, handle: AllGatherHandle):
        mixed = ReduceScatter.apply(expert_output, self.group, f"MoE combine, {self.name}", self.timeout_seconds)
        return mixed[: handle.num_tokens]
