"""Token dispatch: routing result -> expert-major rows -> experts -> back to token order.

The MoE layer is handed a dispatcher; every dispatcher has the same two methods:

    batch, handle = dispatcher.dispatch(hidden, expert_indices, expert_weights, keep)   # ExpertBatch
    expert_output = experts(batch)                                # [batch.out_rows, hidden]
    out = dispatcher.combine(expert_output, handle)               # [tokens, hidden], weighted sum over k

The layer calls ``dispatcher.run(experts, ..., alongside)``, which does the three steps and runs
``alongside()`` (the shared experts) in between, so a dispatcher that moves tokens between ranks can
overlap that work, and the experts' own, with the exchange (mymoe.parallel.dispatch.ExchangeDispatcher).

An ``ExpertBatch`` does not copy the tokens into expert order: it names, for each expert-sorted row, the
row of ``source`` it reads, so the experts gather rows chunk by chunk and add their outputs back at the
same index (see experts.py for why that saves memory). Capacity and dropping are decided once, before
dispatch, on each rank's own tokens (GShard's rule; ``overflow.py``), so results never depend on how many
ranks share the experts: a dispatcher only moves the rows it is told to keep.

This module holds the pure permutation math and the single-process dispatcher. The all-to-all and
all-gather dispatchers live in ``mymoe.parallel`` so that model code never imports torch.distributed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Protocol, runtime_checkable

import torch


@dataclass
class ExpertBatch:
    """The work of the local experts: row r (rows sorted by local expert) is source[row_index[r]].

    The experts return out [out_rows, hidden] with out[row_index[r]] += row_weight[r] * expert(row r).
    row_index None means source already holds the expert-sorted rows and out is row for row; row_weight
    None leaves the routing weights to the dispatcher's combine.
    """

    source: torch.Tensor  # [N, hidden]
    tokens_per_expert: torch.Tensor  # [num_local_experts] int64
    row_index: Optional[torch.Tensor] = None  # [rows] int64
    row_weight: Optional[torch.Tensor] = None  # [rows], differentiable (the router's gradient flows through it)
    out_rows: Optional[int] = None  # rows of the output; None: as many as source

    def __post_init__(self):
        if self.out_rows is None:
            self.out_rows = self.source.shape[0]


@dataclass
class Permutation:
    """Where each expert-major row came from: enough to undo the sort and weight the outputs."""

    source_token: torch.Tensor  # [rows] index of the token each row belongs to
    row_weight: torch.Tensor  # [rows] combine weight of that assignment
    num_tokens: int


def sort_by_expert(
    expert_indices: torch.Tensor, expert_weights: torch.Tensor, keep: Optional[torch.Tensor], num_experts: int
):
    """The kept assignments in expert order: (source token [kept], weight [kept], tokens_per_expert [experts]).

    keep None means every assignment is kept (dropless): then nothing is read on the host, as the kept
    count is the number of assignments.
    """
    top_k = expert_indices.shape[1]
    flat_experts = expert_indices.reshape(-1)
    if keep is None:
        order = torch.argsort(flat_experts, stable=True)
        # index_add rather than bincount: bincount on CUDA reads the largest index on the host
        tokens_per_expert = torch.zeros(num_experts, dtype=torch.int64, device=flat_experts.device)
        tokens_per_expert.index_add_(0, flat_experts, torch.ones_like(flat_experts))
        return torch.div(order, top_k, rounding_mode="floor"), expert_weights.reshape(-1)[order], tokens_per_expert
    flat_keep = keep.reshape(-1)
    # dropped assignments get a sentinel expert so a single sort puts them last, then they are cut off
    sort_key = torch.where(flat_keep, flat_experts, torch.full_like(flat_experts, num_experts))
    order = torch.argsort(sort_key, stable=True)
    tokens_per_expert = torch.bincount(flat_experts[flat_keep], minlength=num_experts)
    order = order[: int(tokens_per_expert.sum())]
    source_token = torch.div(order, top_k, rounding_mode="floor")
    return source_token, expert_weights.reshape(-1)[order], tokens_per_expert


def permute(
    hidden: torch.Tensor,
    expert_indices: torch.Tensor,
    expert_weights: torch.Tensor,
    keep: Optional[torch.Tensor],
    num_experts: int,
):
    """Sort the kept assignments by expert and copy their rows.

    Returns rows [kept, hidden], tokens_per_expert [num_experts] and the Permutation to undo it.
    """
    num_tokens = expert_indices.shape[0]
    source_token, row_weight, tokens_per_expert = sort_by_expert(expert_indices, expert_weights, keep, num_experts)
    rows = hidden.index_select(0, source_token)
    return rows, tokens_per_expert, Permutation(source_token, row_weight, num_tokens)


def unpermute(expert_output: torch.Tensor, perm: Permutation) -> torch.Tensor:
    """Weighted sum of each token's expert outputs, back in token order; dropped tokens get zeros."""
    weighted = expert_output * perm.row_weight.unsqueeze(-1).to(expert_output.dtype)
    out = expert_output.new_zeros(perm.num_tokens, expert_output.shape[-1])
    return out.index_add(0, perm.source_token, weighted)


@runtime_checkable
class Dispatcher(Protocol):
    """What the MoE layer needs of a dispatcher; LocalDispatcher here and the expert-parallel ones in
    mymoe.parallel satisfy it. The layer checks its experts hold [first_local_expert, + num_local_experts)."""

    num_experts: int  # global routed experts
    num_local_experts: int  # experts this process computes
    first_local_expert: int  # global index of the first of them

    def dispatch(
        self,
        hidden: torch.Tensor,
        expert_indices: torch.Tensor,
        expert_weights: torch.Tensor,
        keep: Optional[torch.Tensor],
    ) -> tuple[ExpertBatch, Any]:
        """hidden [tokens, hidden], expert_indices / expert_weights / keep [tokens, k] -> (the local experts'
        work, a handle for combine). keep None: every assignment is kept (dropless)."""
        ...

    def combine(self, expert_output: torch.Tensor, handle: Any) -> torch.Tensor:
        """The experts' output [batch.out_rows, hidden] -> [tokens, hidden], weighted sum over k."""
        ...

    def run(
        self,
        experts: Callable[[ExpertBatch], torch.Tensor],
        hidden: torch.Tensor,
        expert_indices: torch.Tensor,
        expert_weights: torch.Tensor,
        keep: Optional[torch.Tensor],
        alongside: Optional[Callable[[], torch.Tensor]] = None,
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """dispatch -> experts -> combine, and ``alongside()`` (work that needs no dispatched token, run
        while tokens are in flight where the dispatcher moves them): (combined output, its result or None)."""
        ...


class SequentialRun:
    """``Dispatcher.run`` for a dispatcher with nothing in flight to overlap: one step after another."""

    def run(self, experts, hidden, expert_indices, expert_weights, keep, alongside=None):
        batch, handle = self.dispatch(hidden, expert_indices, expert_weights, keep)
        side = alongside() if alongside is not None else None
        return self.combine(experts(batch), handle), side


class LocalDispatcher(SequentialRun):
    """All experts live in this process: dispatch sorts assignment indices, the experts gather the token
    rows and add their weighted outputs back in token order, so combine has nothing left to do."""

    def __init__(self, num_experts: int):
        self.num_experts = num_experts
        self.num_local_experts = num_experts
        self.first_local_expert = 0

    def dispatch(self, hidden, expert_indices, expert_weights, keep):
        source_token, row_weight, tokens_per_expert = sort_by_expert(
            expert_indices, expert_weights, keep, self.num_experts
        )
        return ExpertBatch(hidden, tokens_per_expert, source_token, row_weight), None

    def combine(self, expert_output, handle=None):
        return expert_output
