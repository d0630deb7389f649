"""The router: scores -> (noise) -> (group limit) -> (+bias, for selection only) -> top-k -> weights.

Scoring is softmax (Mixtral, Qwen), sigmoid (DeepSeek-V3) or identity (the raw logits rank the
experts), of the logits plus a learned bias with ``router_bias`` (GPT-OSS). The combine weights are always
the clean scores of the chosen experts, renormalised over the k chosen when ``norm_topk_prob`` and
multiplied by ``routed_scaling_factor``; noise and the balancing bias only change which experts are chosen,
and ``force_balanced_routing`` (benchmarks only) replaces the choice by ``balanced_assignment``.

Losses returned for logging, unweighted, and summed with their coefficients into ``aux_loss``:
- load_balancing_loss (Switch / GShard): E * sum_i f_i * P_i over all tokens, f_i the fraction of the
  T*k assignments that chose expert i and P_i the mean router probability of expert i; 1 when balanced.
- seq_aux_loss (DeepSeek-V3): the same quantity per sequence, averaged over the sequences.
- z_loss (ST-MoE): mean over tokens of logsumexp(logits)^2, keeps logits small.
For sigmoid scoring the "probability" P is the score normalised over the experts (DeepSeek-V3's s'); for
identity scoring it is the softmax of the logits, as raw logits are no distribution.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from mymoe.config import MoEConfig


@dataclass
class RoutingResult:
    expert_indices: torch.Tensor  # [tokens, k] int64, global expert ids
    expert_weights: torch.Tensor  # [tokens, k] combine weights, differentiable wrt the router weight
    router_logits: torch.Tensor  # [tokens, experts]
    aux_loss: torch.Tensor  # scalar: coefficient-weighted sum of the losses below
    load_balancing_loss: torch.Tensor  # scalars, unweighted, detached
    seq_aux_loss: torch.Tensor
    z_loss: torch.Tensor
    selection_scores: torch.Tensor  # [tokens, experts] what top-k ranked: noise, bias and group limit included


def balanced_assignment(
    num_tokens: int, num_experts: int, top_k: int, device: torch.device, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """[tokens, k] experts for ``force_balanced_routing``: k distinct experts per token, and every expert
    assigned floor or ceil of tokens * k / experts times (exactly equal when that divides).

    The tokens take turns in a random order; the a-th assignment of that sequence (token i's j-th is
    a = i * k + j) goes to expert a mod experts, after a random relabelling of the experts. Consecutive
    assignments cycle through every expert, which balances the counts, and a token's k are consecutive, so
    distinct. The random order and labels keep which experts share a token, and so which ranks a token
    visits under expert parallelism, from following its position in the batch. ``generator`` as for noise:
    None draws from the global RNG, which activation checkpointing replays.
    """
    order = torch.randperm(num_tokens, generator=generator, device=device)  # [tokens] each token's turn
    labels = torch.randperm(num_experts, generator=generator, device=device)  # [experts]
    assignment = order[:, None] * top_k + torch.arange(top_k, device=device)  # [tokens, k]
    return labels[assignment % num_experts]


class Router(nn.Module):
    """Linear gate [experts, hidden] (the Hugging Face "gate") plus the selection rules of ``MoEConfig``.

    ``expert_bias`` is DeepSeek-V3's aux-loss-free balancing bias, updated by ``update_bias`` from the
    observed load and added to the scores for selection only. Training noise is drawn from
    ``self.generator`` when the caller sets one (it must live on the input's device), else from the
    global RNG; activation checkpointing restores only the global RNG for its recompute, so use the
    global RNG when combining noise with checkpointing.
    """

    def __init__(self, hidden_size: int, moe: MoEConfig, init_std: float = 0.02):
        super().__init__()
        self.num_experts = moe.n_routed_experts
        self.top_k = moe.num_experts_per_tok
        self.moe = moe
        self.weight = nn.Parameter(torch.empty(self.num_experts, hidden_size))
        # GPT-OSS: a bias on the logits, which (unlike expert_bias) changes the weights as well as the choice
        self.bias = nn.Parameter(torch.zeros(self.num_experts)) if moe.router_bias else None
        self.register_buffer("expert_bias", torch.zeros(self.num_experts, dtype=torch.float32))
        self.generator: Optional[torch.Generator] = None
        self.reset_parameters(init_std)

    def reset_parameters(self, init_std: float = 0.02) -> None:
        nn.init.normal_(self.weight, mean=0.0, std=init_std)

    def forward(self, hidden: torch.Tensor, batch_shape: Optional[tuple] = None) -> RoutingResult:
        """hidden [tokens, hidden_size]; batch_shape (batch, seq_len) splits the tokens into sequences for the
        sequence-level loss (None: all tokens form one sequence)."""
        moe = self.moe
        # routing decisions in at least fp32: bf16 logits tie often and flip choices between runs
        compute_dtype = torch.promote_types(hidden.dtype, torch.float32)
        router_input = hidden.to(compute_dtype)
        if self.training and moe.router_jitter_noise > 0:
            jitter = self._uniform(router_input, 1.0 - moe.router_jitter_noise, 1.0 + moe.router_jitter_noise)
            router_input = router_input * jitter
        bias = self.bias.to(compute_dtype) if self.bias is not None else None
        logits = F.linear(router_input, self.weight.to(compute_dtype), bias)  # [tokens, experts]
        scores = self._score(logits)

        with torch.no_grad():
            selection_logits = logits
            if self.training and moe.router_noise_std > 0:
                selection_logits = logits + self._normal(logits, moe.router_noise_std)
            selection_scores = self._score(selection_logits) + self.expert_bias.to(compute_dtype)
            if moe.n_group > 1 and moe.topk_group < moe.n_group:
                selection_scores = self._limit_groups(selection_scores)
            if moe.force_balanced_routing:
                expert_indices = balanced_assignment(
                    logits.shape[0], self.num_experts, self.top_k, logits.device, self.generator
                )
            else:
                expert_indices = torch.topk(selection_scores, self.top_k, dim=-1).indices  # [tokens, k]

        if moe.norm_topk_prob and self.top_k > 1 and moe.scoring_func in ("softmax", "identity"):
            # the renormalised softmax of the k chosen is the softmax of their logits: the same weights, and
            # an exact zero gradient for the experts not chosen (not a rounding residue AdamW would amplify).
            # Raw logits can be negative and sum to zero, so identity scores normalise the same way.
            expert_weights = logits.gather(1, expert_indices).softmax(dim=-1)
        else:
            expert_weights = scores.gather(1, expert_indices)
            if moe.norm_topk_prob and self.top_k > 1:
                expert_weights = expert_weights / (expert_weights.sum(-1, keepdim=True) + 1e-20)
        expert_weights = expert_weights * moe.routed_scaling_factor

        if moe.scoring_func == "identity":
            probs = logits.softmax(dim=-1)
        else:
            probs = scores if moe.scoring_func == "softmax" else scores / (scores.sum(-1, keepdim=True) + 1e-20)
        losses = {}
        aux_loss = logits.new_zeros(())
        for name, coefficient, loss_fn in (
            ("load_balancing", moe.router_aux_loss_coef, lambda: self._load_balancing_loss(probs, expert_indices)),
            ("seq_aux", moe.seq_aux_loss_coef, lambda: self._seq_aux_loss(probs, expert_indices, batch_shape)),
            ("z", moe.router_z_loss_coef, lambda: torch.logsumexp(logits, dim=-1).square().mean()),
        ):
            # a loss that does not train is still reported, but builds no graph
            with torch.set_grad_enabled(torch.is_grad_enabled() and coefficient > 0):
                loss = loss_fn()
            if coefficient > 0:
                aux_loss = aux_loss + coefficient * loss
            losses[name] = loss.detach()
        return RoutingResult(
            expert_indices,
            expert_weights,
            logits,
            aux_loss,
            losses["load_balancing"],
            losses["seq_aux"],
            losses["z"],
            selection_scores,
        )

    def _score(self, logits: torch.Tensor) -> torch.Tensor:
        if self.moe.scoring_func == "sigmoid":
            return torch.sigmoid(logits)
        if self.moe.scoring_func == "identity":
            return logits
        return torch.softmax(logits, dim=-1)

    def _uniform(self, like: torch.Tensor, low: float, high: float) -> torch.Tensor:
        return torch.empty_like(like).uniform_(low, high, generator=self.generator)

    def _normal(self, like: torch.Tensor, std: float) -> torch.Tensor:
        return torch.empty_like(like).normal_(0.0, std, generator=self.generator)

    def _limit_groups(self, selection_scores: torch.Tensor) -> torch.Tensor:
        """DeepSeek-V3 group-limited routing: keep the experts of the topk_group best groups, -inf elsewhere.

        A group scores the sum of its two best experts under sigmoid scoring, its best expert under softmax.
        """
        num_tokens = selection_scores.shape[0]
        grouped = selection_scores.view(num_tokens, self.moe.n_group, -1)  # [tokens, groups, experts/group]
        if self.moe.scoring_func == "sigmoid" and grouped.shape[-1] >= 2:
            group_scores = grouped.topk(2, dim=-1).values.sum(-1)
        else:
            group_scores = grouped.max(dim=-1).values
        chosen_groups = group_scores.topk(self.moe.topk_group, dim=-1).indices  # [tokens, topk_group]
        group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, chosen_groups, True)
        return grouped.masked_fill(~group_mask.unsqueeze(-1), float("-inf")).view(num_tokens, -1)

    def _load_balancing_loss(self, probs: torch.Tensor, expert_indices: torch.Tensor) -> torch.Tensor:
        num_assignments = expert_indices.numel()
        counts = torch.zeros(self.num_experts, dtype=probs.dtype, device=probs.device)  # [experts]
        counts.index_add_(0, expert_indices.reshape(-1), probs.new_ones(num_assignments))
        return self.num_experts * torch.sum(counts / num_assignments * probs.mean(0))

    def _seq_aux_loss(self, probs: torch.Tensor, expert_indices: torch.Tensor, batch_shape) -> torch.Tensor:
        num_tokens, num_experts, top_k = probs.shape[0], self.num_experts, self.top_k
        batch, seq_len = batch_shape if batch_shape is not None else (1, num_tokens)
        if batch * seq_len != num_tokens:
            raise ValueError(f"batch_shape={tuple(batch_shape)} does not cover the {num_tokens} routed tokens")
        sequence = torch.arange(batch, device=probs.device).repeat_interleave(seq_len * top_k)  # [tokens * k]
        counts = torch.zeros(batch * num_experts, dtype=probs.dtype, device=probs.device)
        counts.index_add_(0, sequence * num_experts + expert_indices.reshape(-1), probs.new_ones(num_tokens * top_k))
        fraction = counts.view(batch, num_experts) / (seq_len * top_k)  # [batch, experts]
        mean_probs = probs.view(batch, seq_len, num_experts).mean(1)
        return num_experts * (fraction * mean_probs).sum(-1).mean()

    @torch.no_grad()
    def update_bias(self, tokens_per_expert: torch.Tensor) -> None:
        """DeepSeek-V3 aux-loss-free balancing: raise the bias of under-loaded experts, lower the overloaded."""
        rate = self.moe.bias_update_rate
        if rate == 0:
            return
        load = tokens_per_expert.to(self.expert_bias)
        self.expert_bias += rate * torch.sign(load.mean() - load)

    def extra_repr(self) -> str:
        return (
            f"experts={self.num_experts}, top_k={self.top_k}, scoring={self.moe.scoring_func}, "
            f"groups={self.moe.topk_group}/{self.moe.n_group}"
        )
