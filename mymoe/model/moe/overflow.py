"""Expert capacity: how many slots each expert has, which assignments take them, what becomes of those
that overflow, and which ones never overflow. Decided once, on each rank's own tokens, before dispatch.

Slots: ``compute_capacity`` = ceil(capacity_factor * tokens * k / experts), at least min_capacity (None:
dropless). Priority (``model.moe.drop_policy``, ``priority_order``): "probs" takes the highest-weight
assignments first, "position" every token's first choice before any second choice (GShard).

``model.moe.overflow_policy``:

- ``"drop"`` (default): an overflowing assignment contributes nothing; the residual carries its token.
- ``"spill"``: it moves to the token's best unchosen expert that still has room, found in rounds: in
  round r every token with an overflowing assignment offers the best-priority one to its r-th best
  expert outside its top-k (ranked by the scores top-k ranked: router noise and the balancing bias
  count, and experts outside the token's groups under group-limited routing are never offered), and
  each expert accepts offers in priority order while it has room. One offer
  per token per round means a token never lands twice on one expert. No expert ever exceeds its
  capacity. A spilled assignment keeps its combine weight, so the token's output keeps the scale the
  router gave it; the router's gradient flows through the score of the expert first chosen. Spilling
  costs up to n_routed_experts - k rounds, each ending in a host sync; it stops once nothing waits or
  no expert has room. With 64 experts, top-2 and a skewed router that was 16 rounds at capacity_factor
  1.25 but all 62 at 1.0, where the last few assignments search for the last free slots.
- ``"null_expert"``: it goes to the null expert, a slot of unlimited capacity whose output is zero. The
  output is the same as dropping, but the assignment is counted as routed to the null expert
  (``null_fraction``) rather than lost (``dropped_fraction``), for runs that budget for overflow.

``model.moe.min_tokens_per_sequence_kept = n`` protects, in every sequence, the first choices of the n
tokens whose first-choice weight is highest (ties: earlier position; all of them when the sequence is
shorter than n): they are kept whatever the capacity and take their expert's room before any other
assignment, so every sequence keeps at least n tokens routed. An expert then holds at most
max(capacity, its protected assignments); a value at least the sequence length means no first choice is
ever dropped. Inputs without a batch dimension form one sequence.
"""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass
from typing import Optional

import torch

from mymoe.config import DropPolicy, OverflowPolicy

DROP_POLICIES = typing.get_args(DropPolicy)
OVERFLOW_POLICIES = typing.get_args(OverflowPolicy)


def compute_capacity(
    num_tokens: int, num_experts: int, top_k: int, capacity_factor: Optional[float], min_capacity: int = 0
) -> Optional[int]:
    """Slots per expert for one rank's tokens; None means dropless."""
    if capacity_factor is None:
        return None
    return max(int(math.ceil(capacity_factor * num_tokens * top_k / num_experts)), min_capacity)


def priority_order(
    expert_indices: torch.Tensor,
    expert_weights: torch.Tensor,
    policy: DropPolicy = "probs",
    protected: Optional[torch.Tensor] = None,
) -> torch.Tensor:
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
        raise ValueError(f"drop policy {policy!r} must be one of {', '.join(DROP_POLICIES)}")
    if protected is not None:
        order = order[torch.argsort((~protected.reshape(-1)[order]).to(torch.int8), stable=True)]
    return order


def capacity_keep_mask(
    expert_indices: torch.Tensor,
    expert_weights: torch.Tensor,
    num_experts: int,
    capacity: Optional[int],
    policy: DropPolicy = "probs",
    protected: Optional[torch.Tensor] = None,
) -> torch.Tensor:
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
class Placement:
    """Where each of the [tokens, k] assignments ends up."""

    expert_indices: torch.Tensor  # [tokens, k] the expert each assignment is sent to (spilled ones moved)
    keep: torch.Tensor  # [tokens, k] bool, sent to a real expert
    spilled: torch.Tensor  # [tokens, k] bool, kept on an expert other than the router's choice
    null: torch.Tensor  # [tokens, k] bool, sent to the null expert


def protected_first_choices(
    expert_weights: torch.Tensor, batch_shape: Optional[tuple], per_sequence: int
) -> Optional[torch.Tensor]:
    """[tokens, k] bool: the first choices of each sequence's `per_sequence` highest-weight tokens."""
    if per_sequence <= 0:
        return None
    num_tokens, top_k = expert_weights.shape
    batch, seq_len = batch_shape if batch_shape is not None else (1, num_tokens)
    first_choice = expert_weights[:, 0].detach().view(batch, seq_len)
    best_tokens = torch.argsort(first_choice, dim=1, descending=True, stable=True)[:, :per_sequence]
    protected_tokens = torch.zeros(batch, seq_len, dtype=torch.bool, device=expert_weights.device)
    protected_tokens.scatter_(1, best_tokens, True)
    protected = torch.zeros(num_tokens, top_k, dtype=torch.bool, device=expert_weights.device)
    protected[:, 0] = protected_tokens.view(-1)
    return protected


def spill_overflow(
    expert_indices: torch.Tensor, keep: torch.Tensor, selection_scores: torch.Tensor, capacity: int, order: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Move overflowing assignments to experts with room, in the rounds the module docstring describes.

    order: flat assignment indices in priority order (``priority_order``). Returns the new expert_indices
    and keep [tokens, k], and which assignments were spilled.
    """
    num_tokens, top_k = expert_indices.shape
    num_experts = selection_scores.shape[1]
    device = expert_indices.device
    flat_experts = expert_indices.reshape(-1).clone()
    flat_keep = keep.reshape(-1).clone()
    spilled = torch.zeros_like(flat_keep)
    chosen = torch.zeros(num_tokens, num_experts, dtype=torch.bool, device=device).scatter_(1, expert_indices, True)
    ranked = selection_scores.detach().masked_fill(chosen, float("-inf"))
    alternatives = torch.argsort(ranked, dim=1, descending=True, stable=True)[:, : num_experts - top_k]
    offerable = torch.isfinite(ranked.gather(1, alternatives))  # -inf: outside the token's groups
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=device)  # priority rank of each assignment
    token_of = torch.arange(num_tokens * top_k, device=device) // top_k
    load = torch.zeros(num_experts, dtype=torch.int64, device=device).index_add_(0, flat_experts, flat_keep.long())
    room = (capacity - load).clamp(min=0)  # [experts]
    for round_index in range(num_experts - top_k):
        waiting = ~flat_keep
        if not bool(waiting.any()) or int(room.sum()) == 0:
            break
        best_waiting = torch.full((num_tokens,), order.numel(), dtype=rank.dtype, device=device)
        best_waiting.scatter_reduce_(0, token_of[waiting], rank[waiting], reduce="amin")
        offers = torch.nonzero(waiting & (rank == best_waiting[token_of])).squeeze(1)
        offers = offers[torch.argsort(rank[offers])]
        target = alternatives[token_of[offers], round_index]
        open_to_offer = offerable[token_of[offers], round_index]
        offers, target = offers[open_to_offer], target[open_to_offer]
        by_expert = torch.argsort(target, stable=True)  # priority order kept inside each expert
        offers, target = offers[by_expert], target[by_expert]
        counts = torch.bincount(target, minlength=num_experts)
        position = torch.arange(offers.numel(), device=device) - (torch.cumsum(counts, 0) - counts)[target]
        accepted = position < room[target]
        offers, target = offers[accepted], target[accepted]
        flat_experts[offers] = target
        flat_keep[offers] = True
        spilled[offers] = True
        room -= torch.bincount(target, minlength=num_experts)
    shape = expert_indices.shape
    return flat_experts.view(shape), flat_keep.view(shape), spilled.view(shape)


def place_assignments(
    expert_indices: torch.Tensor,
    expert_weights: torch.Tensor,
    selection_scores: torch.Tensor,
    *,
    capacity: Optional[int],
    drop_policy: DropPolicy = "probs",
    overflow_policy: OverflowPolicy = "drop",
    min_tokens_per_sequence_kept: int = 0,
    batch_shape: Optional[tuple] = None,
) -> Placement:
    """Capacity, protection and the overflow policy applied to one rank's [tokens, k] assignments
    (expert_indices, expert_weights; selection_scores [tokens, experts] rank the spill targets).
    batch_shape (batch, seq) tells min_tokens_per_sequence_kept where sequences end."""
    if overflow_policy not in OVERFLOW_POLICIES:
        raise ValueError(f"overflow policy {overflow_policy!r} must be one of {', '.join(OVERFLOW_POLICIES)}")
    num_experts = selection_scores.shape[1]
    protected = protected_first_choices(expert_weights, batch_shape, min_tokens_per_sequence_kept)
    keep = capacity_keep_mask(expert_indices, expert_weights, num_experts, capacity, drop_policy, protected)
    spilled = torch.zeros_like(keep)
    if overflow_policy == "spill" and capacity is not None:
        order = priority_order(expert_indices, expert_weights, drop_policy, protected)
        expert_indices, keep, spilled = spill_overflow(expert_indices, keep, selection_scores, capacity, order)
    null = ~keep if overflow_policy == "null_expert" else torch.zeros_like(keep)
    return Placement(expert_indices, keep, spilled, null)
