"""The MoE layer: router + dispatcher + grouped experts (+ always-on shared experts).

    hidden -> router -> capacity keep mask -> dispatch (sort by expert) -> experts -> combine -> + shared

(dispatcher.run does the middle three and the shared experts, overlapping them where tokens travel.)

The layer owns no communication: a dispatcher is handed to it (``LocalDispatcher`` by default, an
all-to-all one from ``mymoe.parallel`` under expert parallelism, swapped in with ``set_dispatcher``).
Capacity is decided once, on this rank's own tokens, before dispatch; its math and what becomes of the
assignments that overflow it (dropped, spilled to another expert, or sent to the null expert) are
``overflow.py``'s. The step-driven schedules (warm-up from a dense path, capacity growth, aux-loss ramp)
and the learned mixing weight and token importance are ``dynamics.py``'s.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from mymoe.config import MoEConfig
from mymoe.model.layers import build_ffn
from mymoe.model.moe.dispatch import Dispatcher, LocalDispatcher
from mymoe.model.moe.dynamics import TokenImportance, schedule_fraction, scheduled_capacity
from mymoe.model.moe.experts import GroupedExperts
from mymoe.model.moe.overflow import Placement, compute_capacity, place_assignments
from mymoe.model.moe.router import Router


@dataclass
class MoEAux:
    """What one MoE forward reports besides its output; every field but aux_loss is detached."""

    aux_loss: torch.Tensor  # scalar, coefficient-weighted, to add to the training loss
    tokens_per_expert: torch.Tensor  # [experts] kept assignments per global expert, from this rank's tokens
    dropped_fraction: torch.Tensor  # share of the tokens * k assignments dropped by capacity
    max_load_ratio: torch.Tensor  # max / mean of tokens_per_expert; 1 is perfectly balanced
    load_balancing_loss: torch.Tensor  # the unweighted loss parts, for logging
    seq_aux_loss: torch.Tensor
    z_loss: torch.Tensor
    spilled_fraction: torch.Tensor  # share of the assignments kept on an expert the router did not choose
    null_fraction: torch.Tensor  # share of the assignments sent to the null expert (zero output)

    @property
    def stats(self) -> dict:
        """The router statistics of this layer as a plain dict, for logging."""
        return {
            "tokens_per_expert": self.tokens_per_expert,
            "dropped_fraction": self.dropped_fraction,
            "max_load_ratio": self.max_load_ratio,
            "load_balancing_loss": self.load_balancing_loss,
            "seq_aux_loss": self.seq_aux_loss,
            "z_loss": self.z_loss,
            "spilled_fraction": self.spilled_fraction,
            "null_fraction": self.null_fraction,
        }


def _in_backward() -> bool:
    # activation checkpointing re-runs the forward inside the backward pass; that re-run must not count
    # the step's load a second time
    return torch._C._current_graph_task_id() != -1


class MoELayer(nn.Module):
    def __init__(
        self,
        hidden_size: int,
        moe: MoEConfig,
        dispatcher: Optional[Dispatcher] = None,
        init_std: float = 0.02,
        expert_dropout: float = 0.0,
    ):
        super().__init__()
        self.moe = moe
        self.num_experts = moe.n_routed_experts
        self.top_k = moe.num_experts_per_tok
        self.gate = Router(hidden_size, moe, init_std)
        self.experts = GroupedExperts(
            moe.n_routed_experts,
            hidden_size,
            moe.moe_intermediate_size,
            init_std,
            bias=moe.expert_mlp_bias,
            activation=moe.expert_activation,
            swiglu_alpha=moe.swiglu_alpha,
            swiglu_limit=moe.swiglu_limit,
            dropout=expert_dropout,
        )
        self.shared_experts = None
        self.shared_expert_gate = None
        if moe.n_shared_experts > 0:
            shared_size = moe.shared_expert_intermediate_size or moe.n_shared_experts * moe.moe_intermediate_size
            self.shared_experts = build_ffn(moe.expert_activation == "gelu", hidden_size, shared_size, expert_dropout)
            for linear in self.shared_experts.children():
                nn.init.normal_(linear.weight, mean=0.0, std=init_std)
            if moe.shared_expert_gate:
                self.shared_expert_gate = nn.Linear(hidden_size, 1, bias=False)
                nn.init.normal_(self.shared_expert_gate.weight, mean=0.0, std=init_std)
        self.dispatcher: Dispatcher = dispatcher or LocalDispatcher(moe.n_routed_experts)
        self._check_dispatcher(self.dispatcher)
        self._pending_load: Optional[torch.Tensor] = None
        self._pending_rows: Optional[torch.Tensor] = None
        self._build_dynamics(hidden_size, init_std)

    def _build_dynamics(self, hidden_size: int, init_std: float) -> None:
        """The parts dynamics.py describes: a dense path to mix with (unless the shared expert is it), the
        learned mixing logit and the token scorer; all None when their options are off."""
        moe = self.moe
        self.step: Optional[int] = None  # the trainer's global step, set by MoECausalLM.set_step
        self.dense_ffn = None
        if (moe.moe_warmup_steps or moe.flexible_ffn) and self.shared_experts is None:
            width = moe.moe_intermediate_size * moe.num_experts_per_tok  # the routed width one token uses
            self.dense_ffn = build_ffn(moe.expert_activation == "gelu", hidden_size, width)
        # initialised near 0 (MoECausalLM.reset_parameters): g near 0.5, the two paths start with equal shares
        self.ffn_mix_logit = nn.Parameter(torch.zeros(())) if moe.flexible_ffn else None
        self.importance = TokenImportance(hidden_size) if moe.token_importance else None
        if self.importance is not None:
            nn.init.normal_(self.importance.score.weight, mean=0.0, std=init_std)

    def set_dispatcher(self, dispatcher: Dispatcher) -> None:
        """Swap the dispatcher; the experts must already hold exactly its local experts (``experts.shard``)."""
        self._check_dispatcher(dispatcher)
        self.dispatcher = dispatcher

    def _check_dispatcher(self, dispatcher: Dispatcher) -> None:
        if dispatcher.num_experts != self.num_experts:
            raise ValueError(
                f"dispatcher routes {dispatcher.num_experts} experts but the layer has "
                f"n_routed_experts={self.num_experts}"
            )
        held = (self.experts.first_expert, self.experts.num_experts)
        wanted = (dispatcher.first_local_expert, dispatcher.num_local_experts)
        if held != wanted:
            raise ValueError(
                f"the experts hold {held[1]} experts from global index {held[0]} but the dispatcher "
                f"serves {wanted[1]} from {wanted[0]}: call "
                f"layer.experts.shard({wanted[0]}, {wanted[1]}) before set_dispatcher"
            )

    def capacity(self, num_tokens: int) -> Optional[int]:
        """Slots per expert for this many local tokens in the current mode; None when dropless."""
        moe = self.moe
        factor = moe.capacity_factor
        if not self.training and moe.eval_capacity_factor is not None:
            factor = moe.eval_capacity_factor
        elif moe.min_expert_capacity is not None and factor is not None:
            return scheduled_capacity(self.step, moe)
        return compute_capacity(num_tokens, self.num_experts, self.top_k, factor, moe.min_capacity)

    def moe_share(self):
        """The MoE path's share of the output: the warm-up fraction, times the learned g of flexible_ffn
        (a Python float 1.0 when neither is on, so the default path multiplies nothing)."""
        share = schedule_fraction(self.step, self.moe.moe_warmup_steps)
        if self.ffn_mix_logit is not None:
            return share * torch.sigmoid(self.ffn_mix_logit)
        return share

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, MoEAux]:
        """hidden [batch, seq, hidden] or [tokens, hidden] -> (output of the same shape, MoEAux)."""
        batch_shape = tuple(hidden.shape[:2]) if hidden.dim() == 3 else None
        tokens = hidden.reshape(-1, hidden.shape[-1])  # [tokens, hidden]
        routing = self.gate(tokens, batch_shape)
        importance = self.importance(tokens) if self.importance is not None else None  # [tokens]
        # what decides who keeps a slot at capacity: router weight, or the token's learned importance
        priority = routing.expert_weights if importance is None else importance.detach()[:, None].expand(-1, self.top_k)

        capacity = self.capacity(tokens.shape[0])
        placement = place_assignments(
            routing.expert_indices,
            priority,
            routing.selection_scores,
            capacity=capacity,
            drop_policy=self.moe.drop_policy,
            overflow_policy=self.moe.overflow_policy,
            min_tokens_per_sequence_kept=self.moe.min_tokens_per_sequence_kept,
            batch_shape=batch_shape,
        )
        # the shared experts need no dispatched token: the dispatcher runs them while tokens are in flight
        shared_work = None if self.shared_experts is None else functools.partial(self._shared_output, tokens)
        # dropless keeps every assignment; saying so (keep None) spares the dispatcher a host read of the count
        keep = None if capacity is None else placement.keep
        computed = []  # rows this rank's experts computed, from every sender (chunk by chunk)

        def experts(batch):
            computed.append(batch.tokens_per_expert.sum())
            return self.experts(batch)

        routed, shared = self.dispatcher.run(
            experts, tokens, placement.expert_indices, routing.expert_weights, keep, shared_work
        )
        output = routed.to(hidden.dtype)
        if importance is not None:
            output = output * TokenImportance.output_scale(importance).to(output.dtype)[:, None]

        share = self.moe_share()
        whole = isinstance(share, float) and share == 1.0  # no warm-up left and no learned mix
        if shared is not None:
            # the shared expert is the dense path: (1 - a) * shared + a * (routed + shared)
            output = (output if whole else share * output) + shared
        elif not whole:
            output = (1 - share) * self.dense_ffn(tokens) + share * output

        aux = self._aux(routing, placement)
        ramp = schedule_fraction(self.step, self.moe.aux_loss_ramp_steps)
        if ramp != 1.0:
            aux.aux_loss = ramp * aux.aux_loss
        if self.training and not _in_backward():
            rows = sum(computed)
            if self._pending_load is None:
                self._pending_load, self._pending_rows = aux.tokens_per_expert, rows
            else:
                self._pending_load = self._pending_load + aux.tokens_per_expert
                self._pending_rows = self._pending_rows + rows
        return output.view(hidden.shape), aux

    def _shared_output(self, tokens: torch.Tensor) -> torch.Tensor:
        shared = self.shared_experts(tokens)
        if self.shared_expert_gate is not None:
            shared = torch.sigmoid(self.shared_expert_gate(tokens)) * shared
        return shared

    @torch.no_grad()
    def _aux(self, routing, placement: Placement) -> MoEAux:
        keep = placement.keep
        # counted with index_add rather than bincount so that no step waits on the device
        tokens_per_expert = torch.zeros(self.num_experts, dtype=torch.int64, device=keep.device)
        tokens_per_expert.index_add_(0, placement.expert_indices.reshape(-1), keep.reshape(-1).long())
        load = tokens_per_expert.float()
        null_fraction = placement.null.float().mean()
        dropped_fraction = (~keep & ~placement.null).float().mean()
        max_load_ratio = load.max() / load.mean().clamp(min=1e-9)
        return MoEAux(
            routing.aux_loss,
            tokens_per_expert,
            dropped_fraction,
            max_load_ratio,
            routing.load_balancing_loss,
            routing.seq_aux_loss,
            routing.z_loss,
            placement.spilled.float().mean(),
            null_fraction,
        )

    def pending_load(self) -> torch.Tensor:
        """Kept assignments per global expert summed over the training forwards since the last bias update."""
        if self._pending_load is None:
            return torch.zeros(self.num_experts, dtype=torch.int64, device=self.gate.expert_bias.device)
        return self._pending_load

    def pending_rows(self) -> torch.Tensor:
        """Rows this rank's experts computed over the same forwards (what sets its share of the step's time)."""
        if self._pending_rows is None:
            return torch.zeros((), dtype=torch.int64, device=self.gate.expert_bias.device)
        return self._pending_rows

    @torch.no_grad()
    def reset_router(self, init_std: float, generator: torch.Generator) -> list[nn.Parameter]:
        """Re-initialise the router (weights from `generator`, biases and balancing bias to zero) and return
        its parameters, whose optimizer state the caller clears."""
        self.gate.weight.normal_(0.0, init_std, generator=generator)
        self.gate.expert_bias.zero_()
        if self.gate.bias is not None:
            self.gate.bias.zero_()
        return list(self.gate.parameters())

    def update_expert_bias(self, global_load: torch.Tensor) -> None:
        """Apply the aux-loss-free bias update from the step's load (all-reduced over ranks by the trainer)
        and start counting afresh."""
        self.gate.update_bias(global_load)
        self._pending_load = self._pending_rows = None
