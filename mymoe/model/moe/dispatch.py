"""Token dispatch: routing result -> expert-major rows -> experts -> back to token order.

The MoE layer is handed a dispatcher; every dispatcher has the same two methods:

    batch, handle = dispatcher.dispatch(hidden, expert_indices, expert_weights, keep)   # ExpertBatch
    expert_output = experts(batch)                                # [batch.out_rows, hidden]
    out = dispatcher.combine(expert_output, handle)               # [tokens, hidden], weighted sum over k

An ``ExpertBatch`` does not copy the tokens into expert order: it names, for each expert-sorted row, the
row of ``source`` it reads, so the experts gather rows chunk by chunk and add their outputs back at the
same index (see experts.py for why that saves memory). Capacity and dropping are decided once, before dispatch, by
``capacity_keep_mask`` on each rank's own tokens (GShard's rule), so results never depend on how many
ranks share the experts. Dropped assignments contribute nothing; the residual connection carries them
(``overflow.py`` holds the other overflow policies).

This module holds the pure permutation math and the single-process dispatcher. The all-to-all and
all-gather dispatchers live in ``mymoe.parallel`` so that model code never imports torch.distributed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch


def compute_capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: Optional[float],
                     min_capacity: int = 0) -> Optional[int]:
    """Slots per expert for one rank's tokens; None means dropless."""
    if capacity_factor is None:
        return None
    return max(int(math.ceil(capacity_factor * num_tokens * top_k / num_experts)), min_capacity)


def priority_order(expert_indices: torch.Tensor, expert_weights: torch.Tensor, policy: str = "probs",
                   protected: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Flat assignment indices (token * k + choice) in the order they claim expert slots, best first.

    policy "probs": highest weight first. policy "position": GShard order, every token's first choice
    before any second choice, then by token position. Assignments marked in `protected` [tokens, k] come
    before all others, in the same order among themselves.
    """
    num_tokens, top_k = expert_indices.shape
    if policy == "probs":
        order = torch.argsort(expert_weights.detach().reshape(-1), descending=True, stable=True)
    elif policy == "position":
        # flat index is token * k + choice; order by (choice, token)
        order = torch.arange(num_tokens * top_k, device=expert_indices.device)
        order = order.view(num_tokens, top_k).t().reshape(-1)
    else:
        raise ValueError(f"drop policy {policy!r} must be 'probs' or 'position'")
    if protected is not None:
        order = order[torch.argsort((~protected.reshape(-1)[order]).to(torch.int8), stable=True)]
    return order


def capacity_keep_mask(expert_indices: torch.Tensor, expert_weights: torch.Tensor, num_experts: int,
                       capacity: Optional[int], policy: str = "probs",
                       protected: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Which of the [tokens, k] assignments fit in their expert's capacity.

    Each expert takes its assignments in ``priority_order`` until `capacity` are kept. Protected
    assignments are always kept and take their room first, so an expert holds at most
    max(capacity, its protected assignments).
    """
    num_tokens, top_k = expert_indices.shape
    if capacity is None:
        return torch.ones_like(expert_indices, dtype=torch.bool)
    flat_experts = expert_indices.reshape(-1)
    order = priority_order(expert_indices, expert_weights, policy, protected)
    # stable sort by expert keeps the priority order inside each expert's segment
    by_expert = order[torch.argsort(flat_experts[order], stable=True)]
    counts = torch.bincount(flat_experts, minlength=num_experts)
    segment_start = torch.cumsum(counts, 0) - counts
    rank_in_expert = torch.arange(by_expert.numel(), device=by_expert.device) - segment_start[flat_experts[by_expert]]
    keep = torch.empty_like(flat_experts, dtype=torch.bool)
    keep[by_expert] = rank_in_expert < capacity
    if protected is not None:
        keep |= protected.reshape(-1)
    return keep.view(num_tokens, top_k)


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


def sort_by_expert(expert_indices: torch.Tensor, expert_weights: torch.Tensor, keep: torch.Tensor,
                   num_experts: int):
    """The kept assignments in expert order: (source token [kept], weight [kept], tokens_per_expert [experts])."""
    top_k = expert_indices.shape[1]
    flat_experts = expert_indices.reshape(-1)
    flat_keep = keep.reshape(-1)
    # dropped assignments get a sentinel expert so a single sort puts them last, then they are cut off
    sort_key = torch.where(flat_keep, flat_experts, torch.full_like(flat_experts, num_experts))
    order = torch.argsort(sort_key, stable=True)
    tokens_per_expert = torch.bincount(flat_experts[flat_keep], minlength=num_experts)
    order = order[: int(tokens_per_expert.sum())]
    source_token = torch.div(order, top_k, rounding_mode="floor")
    return source_token, expert_weights.reshape(-1)[order], tokens_per_expert


def permute(hidden: torch.Tensor, expert_indices: torch.Tensor, expert_weights: torch.Tensor,
            keep: torch.Tensor, num_experts: int):
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


class LocalDispatcher:
    """All experts live in this process: dispatch sorts assignment indices, the experts gather the token
    rows and add their weighted outputs back in token order, so combine has nothing left to do."""

    def __init__(self, num_experts: int):
        self.num_experts = num_experts
        self.num_local_experts = num_experts
        self.first_local_expert = 0

    def dispatch(self, hidden, expert_indices, expert_weights, keep):
        source_token, row_weight, tokens_per_expert = sort_by_expert(expert_indices, expert_weights, keep,
                                                                     self.num_experts)
        return ExpertBatch(hidden, tokens_per_expert, source_token, row_weight), None

    def combine(self, expert_output, handle=None):
        return expert_output
