"""Dispatchers that send tokens to experts on other ranks of the expert-parallel group.

They have the interface of mymoe.model.moe.dispatch.LocalDispatcher, so the MoE layer does not know
which one it holds:

    batch, handle = dispatcher.dispatch(hidden, expert_indices, expert_weights, keep)   # ExpertBatch
    out = dispatcher.combine(experts(batch), handle)
    out, side = dispatcher.run(experts, hidden, expert_indices, expert_weights, keep, alongside)  # all of it

``run`` is what the layer calls: the all-to-all dispatchers overlap the exchange with ``alongside()``
(the shared experts) and, in chunks, with the experts themselves (ExchangeDispatcher).

Capacity is applied by the layer before dispatch, on each rank's own tokens, so these only move rows.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from mymoe.model.moe.dispatch import ExpertBatch, Permutation, SequentialRun, sort_by_expert, unpermute
from mymoe.parallel import collectives
from mymoe.parallel.collectives import AllGather, ReduceScatter, all_to_all, named_collective, start_all_to_all
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
class Exchange:
    """The rows one rank sends in an all-to-all dispatch, how they split over the group, and (in
    subclasses) what its dispatcher needs to read the received rows and to undo the sort on the way back."""

    rows: torch.Tensor  # [sent, width] grouped by destination rank
    input_splits: list  # rows sent to each rank of the group
    output_splits: list  # rows received from each rank


def chunk_rows(splits: list, chunks: int, device: torch.device) -> list[tuple[list, Optional[torch.Tensor]]]:
    """Cut each rank's block of an exchange (``splits`` rows each, blocks back to back) into ``chunks``
    consecutive near-equal parts: for each chunk, its per-rank splits and its rows' positions [rows]
    (None for a single chunk: all rows, in place)."""
    if chunks == 1:
        return [(splits, None)]
    offsets = [0]
    for count in splits:
        offsets.append(offsets[-1] + count)
    plan = []
    for chunk in range(chunks):
        bounds = [
            (offset + count * chunk // chunks, offset + count * (chunk + 1) // chunks)
            for offset, count in zip(offsets, splits)
        ]
        positions = torch.cat([torch.arange(first, end, device=device) for first, end in bounds])
        plan.append(([end - first for first, end in bounds], positions))
    return plan


class ExchangeDispatcher(GroupDispatcher, SequentialRun, ABC):
    """An all-to-all dispatcher: a subclass packs what it sends (``_send``), reads what arrived as the
    experts' work (``_expert_batch``) and adds what came back into token order (``_finish``).

    ``run`` overlaps communication with compute. The exchange is started asynchronously and the
    layer's side work (the shared experts) runs while the rows travel (``chunks`` 0 turns all overlap off:
    blocking all-to-alls, one step after another); with ``chunks`` > 1 each rank's
    rows for each destination are cut into that many parts: the experts compute chunk i while chunk i+1
    is still arriving, and chunk i's outputs travel home while chunk i+1 computes (Megatron-Core's
    shared-expert and a2a overlap, without streams: gloo and NCCL both progress async_op work in the
    background). The backward overlaps the same way, see collectives.start_all_to_all. Every row meets
    the same expert and weight as in dispatch + combine; only the order of floating-point sums moves.
    """

    def __init__(
        self, group, num_experts: int, name: str = "moe", timeout_seconds: Optional[float] = None, chunks: int = 1
    ):
        super().__init__(group, num_experts, name, timeout_seconds)
        if chunks < 0:
            raise ValueError(
                f"chunks={chunks} must be >= 0 (0: blocking all-to-alls, no overlap; 1: one exchange overlapped "
                f"with the shared experts; more: pipelined with the experts)"
            )
        self.chunks = chunks

    def _exchange_counts(self, counts: torch.Tensor) -> torch.Tensor:
        """Rows I send to each rank (or per global expert) -> rows I receive from each (per local expert)."""
        return self._start_count_exchange(counts)()

    def _start_count_exchange(self, counts: torch.Tensor):
        """_exchange_counts without waiting: returns a function that waits for the received counts."""
        name = f"token counts, MoE dispatch, {self.name}"
        splits = [counts.shape[0] // self.group_size] * self.group_size
        received, work = collectives.launch_all_to_all(counts, splits, splits, self.group, name, self.timeout_seconds)

        def counted() -> torch.Tensor:
            collectives.wait(work, name, self.timeout_seconds)  # through the module: benchmarks time it there
            return received

        return counted

    def dispatch(self, hidden, expert_indices, expert_weights, keep):
        exchange = self._send(hidden, expert_indices, expert_weights, keep)
        received = all_to_all(
            exchange.rows,
            exchange.output_splits,
            exchange.input_splits,
            self.group,
            f"MoE dispatch, {self.name}",
            self.timeout_seconds,
        )
        return self._expert_batch(received, exchange, None), exchange

    def combine(self, expert_output, exchange: Exchange):
        returned = all_to_all(
            expert_output,
            exchange.input_splits,
            exchange.output_splits,
            self.group,
            f"MoE combine, {self.name}",
            self.timeout_seconds,
        )
        return self._finish(returned, exchange)

    def run(self, experts, hidden, expert_indices, expert_weights, keep, alongside=None):
        if self.chunks == 0:  # no overlap: blocking dispatch, experts, blocking combine
            return super().run(experts, hidden, expert_indices, expert_weights, keep, alongside)
        exchange = self._send(hidden, expert_indices, expert_weights, keep)
        device = exchange.rows.device
        sends = chunk_rows(exchange.input_splits, self.chunks, device)
        receives = chunk_rows(exchange.output_splits, self.chunks, device)
        dispatching = [
            start_all_to_all(
                exchange.rows if sent_positions is None else exchange.rows.index_select(0, sent_positions),
                received_splits,
                sent_splits,
                self.group,
                f"MoE dispatch, chunk {chunk}, {self.name}",
                self.timeout_seconds,
            )
            for chunk, ((sent_splits, sent_positions), (received_splits, _)) in enumerate(zip(sends, receives))
        ]
        side = alongside() if alongside is not None else None  # while the rows travel
        returning = []
        for chunk, ((sent_splits, _), (received_splits, received_positions), in_flight) in enumerate(
            zip(sends, receives, dispatching)
        ):
            expert_output = experts(self._expert_batch(in_flight.wait(), exchange, received_positions))
            returning.append(
                start_all_to_all(
                    expert_output,
                    sent_splits,
                    received_splits,
                    self.group,
                    f"MoE combine, chunk {chunk}, {self.name}",
                    self.timeout_seconds,
                )
            )
        if self.chunks == 1:
            return self._finish(returning[0].wait(), exchange), side
        returned = torch.cat([in_flight.wait() for in_flight in returning])  # chunk-major
        sent_order = torch.cat([positions for _, positions in sends])
        in_sent_order = torch.empty_like(sent_order)
        in_sent_order[sent_order] = torch.arange(sent_order.numel(), device=device)
        return self._finish(returned.index_select(0, in_sent_order), exchange), side

    @abstractmethod
    def _send(self, hidden, expert_indices, expert_weights, keep) -> Exchange:
        """Pack this rank's kept assignments for the group and exchange the counts."""

    @abstractmethod
    def _expert_batch(self, received, exchange: Exchange, positions: Optional[torch.Tensor]) -> ExpertBatch:
        """The experts' work on ``received``: the rows at ``positions`` of everything the exchange brings
        (None: all of it)."""

    @abstractmethod
    def _finish(self, returned, exchange: Exchange) -> torch.Tensor:
        """The experts' outputs for the rows this rank sent, in sent order -> [tokens, hidden]."""


@dataclass
class AllToAllHandle(Exchange):
    permutation: Permutation  # this rank's tokens -> rows sorted by global expert
    local_expert_of_row: torch.Tensor  # [received] the local expert of each received row


class AllToAllDispatcher(ExchangeDispatcher):
    """Sort by expert, send each rank the rows for its experts, let the experts read them expert-major.

    Dispatch: permute (rows by global expert, hence by owner rank) -> exchange counts -> all-to-all rows
              (they arrive grouped by source rank, then expert) -> an ExpertBatch whose row_index reads
              them expert-major; the experts write each output back at the row it was read from.
    Combine:  reverse all-to-all (outputs are already in received order) -> weighted scatter back to
              token order.
    Every step is differentiable; the all-to-all's backward is the reverse all-to-all.
    """

    def _send(self, hidden, expert_indices, expert_weights, keep) -> AllToAllHandle:
        source_token, row_weight, tokens_per_expert = sort_by_expert(
            expert_indices, expert_weights, keep, self.num_experts
        )
        counted = self._start_count_exchange(tokens_per_expert)
        rows = hidden.index_select(0, source_token)  # copied while the counts travel
        permutation = Permutation(source_token, row_weight, hidden.shape[0])
        # [source rank, local expert] rows I receive
        received_counts = counted().view(self.group_size, self.num_local_experts)
        local_expert_of_row = torch.repeat_interleave(
            torch.arange(self.num_local_experts, device=received_counts.device).repeat(self.group_size),
            received_counts.reshape(-1),
        ).to(rows.device)
        # splits must be host integers: the one host read an all-to-all of uneven rows cannot avoid
        input_splits = tokens_per_expert.view(self.group_size, self.num_local_experts).sum(1).tolist()
        output_splits = received_counts.sum(1).tolist()
        return AllToAllHandle(rows, input_splits, output_splits, permutation, local_expert_of_row)

    def _expert_batch(self, received, exchange: AllToAllHandle, positions):
        local_expert = exchange.local_expert_of_row
        if positions is not None:
            local_expert = local_expert.index_select(0, positions)
        tokens_per_expert = torch.bincount(local_expert, minlength=self.num_local_experts)
        # received rows are source-major; the experts need expert-major, so sort by local expert (stable
        # keeps each expert's rows in source-rank order). The experts write their outputs back in received
        # order, ready for the reverse all-to-all.
        expert_major_order = torch.argsort(local_expert, stable=True)
        return ExpertBatch(received, tokens_per_expert, row_index=expert_major_order)

    def _finish(self, returned, exchange: AllToAllHandle):
        return unpermute(returned, exchange.permutation)


@dataclass
class AllGatherHandle:
    padded_tokens: int  # every rank's tokens padded to this many for equal chunks
    num_tokens: int  # this rank's own tokens


class AllGatherDispatcher(GroupDispatcher, SequentialRun):
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
        marked = (
            expert_indices if keep is None else torch.where(keep, expert_indices, torch.full_like(expert_indices, -1))
        )
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
