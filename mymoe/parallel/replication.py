"""Expert replication (``parallel.redundant_experts``): copies of busy experts on the ranks that wait for them.

Under expert parallelism the rank holding the busiest experts sets the pace of the step. Each rank of the
expert-parallel group gets ``redundant_experts`` extra slots; from the measured load of every expert
(summed over all ranks, so every rank plans alike) ``plan_replicas`` fills them with copies of busy experts
and says which share of an expert's tokens each copy takes, so that the predicted busiest rank comes as
close to the mean as the slots allow. How it stays the same model:

- Routing, capacity and the aux losses see the real experts; only then does ``ReplicatedDispatcher`` send
  each kept assignment to one of its expert's copies (by its share), as a "virtual" expert: rank r computes
  virtual experts [r * (n + R), (r + 1) * (n + R)), its n own experts then its R slots. The all-to-all
  dispatcher underneath is the plain one, over the virtual experts.
- A copy's weights are a plain tensor (``GroupedExperts.replicas``), in no state dict and no optimizer.
  After backward, ``Replicator.add_replica_grads`` sends each copy's gradient to the expert's owner, which
  adds it to its own: the sum over copies is the gradient of the unreplicated expert. The owner steps; after
  the step ``refresh`` sends its new weights to the copies. So copies carry no optimizer state and a
  re-placement moves none; checkpoints hold one entry per global expert, as without replication.
- Both exchanges are all-to-alls within the expert-parallel group that move exactly the copied experts.

Each re-placement (every ``replication_interval`` steps, from that window's loads; and at start from the
loads of the checkpoint's last window) reads the loads on the host once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from mymoe.model.moe.experts import GroupedExperts
from mymoe.parallel.collectives import all_to_all
from mymoe.parallel.dispatch import AllToAllDispatcher
from mymoe.parallel.groups import ParallelContext

GOLDEN = (math.sqrt(5) - 1) / 2  # a low-discrepancy sequence: consecutive assignments spread evenly over copies


@dataclass
class ReplicaPlan:
    """Where every expert's copies are and what share of its tokens each takes."""

    ep_size: int
    experts_per_rank: int
    slots: int  # replica slots per rank
    extra: list  # per rank, its filled slots in order: [(expert, share of that expert's tokens)]

    def copies(self, expert: int) -> list[tuple[int, float]]:
        """[(virtual expert, share)] of `expert`: its owner's first, then its replicas by rank."""
        width = self.experts_per_rank + self.slots
        owner, local = divmod(expert, self.experts_per_rank)
        replicas = [
            (rank * width + self.experts_per_rank + slot, share)
            for rank, slots in enumerate(self.extra)
            for slot, (held, share) in enumerate(slots)
            if held == expert
        ]
        return [(owner * width + local, 1.0 - sum(share for _, share in replicas))] + replicas

    def slot_experts(self, rank: int) -> list[int]:
        """The expert in each of `rank`'s slots, -1 where a slot is empty."""
        held = [expert for expert, _ in self.extra[rank]]
        return held + [-1] * (self.slots - len(held))

    def predicted_rows(self, loads: list[float]) -> list[float]:
        """Rows each rank would compute for these per-expert loads under this plan."""
        rows = [0.0] * self.ep_size
        width = self.experts_per_rank + self.slots
        for expert, load in enumerate(loads):
            for virtual, share in self.copies(expert):
                rows[virtual // width] += load * share
        return rows


def plan_replicas(loads: list[float], ep_size: int, experts_per_rank: int, slots: int) -> ReplicaPlan:
    """Fill the slots greedily: move part of the busiest rank's busiest expert to a new copy on the least busy
    rank with a free slot, as much as evens the two, until the slots run out or nothing would improve.
    Pure and deterministic, so every rank plans alike from the same loads."""
    served = {}  # (rank, expert) -> tokens that rank computes for that expert
    for expert, load in enumerate(loads):
        served[(expert // experts_per_rank, expert)] = float(load)
    rank_rows = [0.0] * ep_size
    for (rank, _), rows in served.items():
        rank_rows[rank] += rows
    extra: list = [[] for _ in range(ep_size)]
    for _ in range(ep_size * slots):
        hot = max(range(ep_size), key=lambda r: (rank_rows[r], -r))
        free = [r for r in range(ep_size) if len(extra[r]) < slots and r != hot]
        if not free:
            break
        cold = min(free, key=lambda r: (rank_rows[r], r))
        gap = rank_rows[hot] - rank_rows[cold]
        candidates = [
            (rows, -expert, expert)
            for (rank, expert), rows in served.items()
            if rank == hot and rows > 0 and (cold, expert) not in served
        ]
        if gap <= 1e-9 * max(rank_rows[hot], 1.0) or not candidates:
            break
        _, _, expert = max(candidates)
        moved = min(served[(hot, expert)], gap / 2)
        served[(hot, expert)] -= moved
        served[(cold, expert)] = moved
        rank_rows[hot] -= moved
        rank_rows[cold] += moved
        extra[cold].append(expert)
    shares = [
        [(expert, served[(rank, expert)] / loads[expert]) for expert in slots_of] for rank, slots_of in enumerate(extra)
    ]
    return ReplicaPlan(ep_size, experts_per_rank, slots, shares)


def copy_tables(plan: ReplicaPlan, num_experts: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(virtual experts [experts, copies], cumulative shares [experts, copies]); short rows padded with the
    last copy and a cumulative share of 1, which no draw in [0, 1) reaches."""
    copies = [plan.copies(expert) for expert in range(num_experts)]
    width = max(len(c) for c in copies)
    virtual = torch.tensor([[v for v, _ in c] + [c[-1][0]] * (width - len(c)) for c in copies], dtype=torch.int64)
    cumulative = torch.tensor(
        [[min(sum(s for _, s in c[: i + 1]), 1.0) if i < len(c) - 1 else 1.0 for i in range(width)] for c in copies],
        dtype=torch.float64,
    )
    return virtual.to(device), cumulative.to(device)


def choose_copies(expert_indices: torch.Tensor, virtual: torch.Tensor, cumulative: torch.Tensor) -> torch.Tensor:
    """The virtual expert (a copy) of each assignment [tokens, k]: the n-th assignment draws frac(n * golden
    ratio), evenly spread over [0, 1), and takes the copy whose cumulative share interval holds it. On the
    device, without a host read."""
    flat = expert_indices.reshape(-1)
    draw = torch.frac((torch.arange(flat.numel(), device=flat.device, dtype=torch.float64) + 1) * GOLDEN)
    copy = (draw.unsqueeze(1) >= cumulative[flat][:, :-1]).sum(1)  # boundaries passed: [assignments]
    return virtual[flat, copy].view_as(expert_indices)


class ReplicatedDispatcher:
    """The layer's dispatcher under replication: real experts outside (as the layer checks), virtual ones to
    the all-to-all underneath (n own + R slots per rank)."""

    def __init__(self, inner: AllToAllDispatcher, num_experts: int, experts_per_rank: int, slots: int):
        self.inner = inner
        self.num_experts = num_experts
        self.num_local_experts = experts_per_rank
        self.first_local_expert = inner.first_local_expert // (experts_per_rank + slots) * experts_per_rank
        self.virtual: Optional[torch.Tensor] = None
        self.cumulative: Optional[torch.Tensor] = None

    def set_plan(self, plan: ReplicaPlan, device) -> None:
        self.virtual, self.cumulative = copy_tables(plan, self.num_experts, device)

    def run(self, experts, hidden, expert_indices, expert_weights, keep, alongside=None):
        virtual = choose_copies(expert_indices, self.virtual, self.cumulative)
        return self.inner.run(experts, hidden, virtual, expert_weights, keep, alongside)


def install(layer, ctx: ParallelContext, slots: int, name: str) -> ReplicatedDispatcher:
    """Give an expert-sharded layer a ReplicatedDispatcher with empty slots (collective-free)."""
    experts: GroupedExperts = layer.experts
    per_rank = experts.num_experts
    inner = AllToAllDispatcher(
        ctx.expert_parallel_group,
        ctx.expert_parallel_size * (per_rank + slots),
        name=name,
        timeout_seconds=ctx.timeout_seconds,
        chunks=ctx.a2a_chunks,
    )
    dispatcher = ReplicatedDispatcher(inner, experts.num_global_experts, per_rank, slots)
    plan = ReplicaPlan(ctx.expert_parallel_size, per_rank, slots, [[] for _ in range(ctx.expert_parallel_size)])
    dispatcher.set_plan(plan, ctx.device)
    layer.set_dispatcher(dispatcher)
    experts.replicas = {
        name: torch.zeros((slots,) + tuple(p.shape[1:]), device=p.device, dtype=p.dtype, requires_grad=True)
        for name, p in experts.named_parameters(recurse=False)
    }
    return dispatcher


class Replicator:
    """The trainer's handle on replication: re-plan from loads, add copies' gradients home, refresh copies."""

    def __init__(self, model, ctx: ParallelContext, slots: int, interval: int):
        self.ctx, self.slots, self.interval = ctx, slots, interval
        self.rank = ctx.expert_parallel_rank
        names = {id(module): name for name, module in model.named_modules()}
        self.layers = list(model.iter_moe_layers())
        self.dispatchers = [install(layer, ctx, slots, names.get(id(layer), "moe")) for layer in self.layers]
        self.plans: list[ReplicaPlan] = [self._empty_plan(layer) for layer in self.layers]
        self.window_load: Optional[torch.Tensor] = None  # [layers, experts] summed since the last re-plan
        self.last_window: Optional[list] = None  # the loads the current plans were made from

    def _empty_plan(self, layer) -> ReplicaPlan:
        ep = self.ctx.expert_parallel_size
        return ReplicaPlan(ep, layer.experts.num_experts, self.slots, [[] for _ in range(ep)])

    # --- placement ----------------------------------------------------------------------------------------
    def observe(self, step: int, loads: torch.Tensor) -> bool:
        """Feed a step's global loads [layers, experts]; re-plan at the end of each interval. True if it did."""
        self.window_load = loads.detach().clone() if self.window_load is None else self.window_load + loads
        if step % self.interval != 0:
            return False
        window, self.window_load = self.window_load.tolist(), None
        self.replan(window)
        return True

    def replan(self, window: list) -> None:
        """Plan every layer from its loads [layers][experts]; the copies are filled by the next refresh."""
        self.last_window = window
        for index, (layer, dispatcher, loads) in enumerate(zip(self.layers, self.dispatchers, window)):
            plan = plan_replicas(loads, self.ctx.expert_parallel_size, layer.experts.num_experts, self.slots)
            self.plans[index] = plan
            dispatcher.set_plan(plan, self.ctx.device)

    def state(self) -> dict:
        window = self.window_load.tolist() if self.window_load is not None else None
        return {"window": window, "planned_from": self.last_window}

    def load_state(self, state: Optional[dict]) -> None:
        """Resume: the window so far, and the plans of the checkpoint's last re-placement."""
        state = state or {}
        window = state.get("window")
        self.window_load = torch.tensor(window, device=self.ctx.device) if window is not None else None
        if state.get("planned_from") is not None:
            self.replan(state["planned_from"])
        self.refresh()

    # --- the two exchanges ----------------------------------------------------------------------------------
    def _routes(self, plan: ReplicaPlan) -> tuple[list[list[int]], list[tuple[int, int]]]:
        """(for each rank q, the local indices of my experts that q copies, in q's slot order;
        my slots as (slot, owner) in slot order)."""
        per_rank = plan.experts_per_rank
        sends = []
        for rank in range(plan.ep_size):
            held = plan.slot_experts(rank)
            sends.append([e - self.rank * per_rank for e in held if e >= 0 and e // per_rank == self.rank])
        mine = [(slot, e // per_rank) for slot, e in enumerate(plan.slot_experts(self.rank)) if e >= 0]
        return sends, mine

    @staticmethod
    def _flat(tensors: list[torch.Tensor], index: list[int], width: int, like: torch.Tensor) -> torch.Tensor:
        if not index:
            return like.new_zeros(0, width)
        return torch.cat([t[index].reshape(len(index), -1) for t in tensors], dim=1)

    def _exchange(self, layer_index: int, outgoing: torch.Tensor, send_counts: list, receive_counts: list, what: str):
        name = f"expert replication, {what}, MoE layer {layer_index}"
        return all_to_all(
            outgoing, receive_counts, send_counts, self.ctx.expert_parallel_group, name, self.ctx.timeout_seconds
        )

    @torch.no_grad()
    def refresh(self) -> None:
        """Copy each replicated expert's weights from its owner into its copies (after an optimizer step)."""
        for index, (layer, plan) in enumerate(zip(self.layers, self.plans)):
            experts = layer.experts
            names = [name for name, _ in experts.named_parameters(recurse=False)]
            params = [getattr(experts, name) for name in names]
            width = sum(p[0].numel() for p in params)
            sends, mine = self._routes(plan)
            outgoing = torch.cat([self._flat(params, local, width, params[0]) for local in sends])
            receive_counts = [sum(1 for _, owner in mine if owner == rank) for rank in range(plan.ep_size)]
            received = self._exchange(index, outgoing, [len(s) for s in sends], receive_counts, "weights")
            order = [slot for owner in range(plan.ep_size) for slot, o in mine if o == owner]
            for name in names:
                experts.replicas[name].zero_()  # an empty slot computes nothing, from zeros
            offset = 0
            for name, param in zip(names, params):
                size = param[0].numel()
                for row, slot in enumerate(order):
                    experts.replicas[name][slot].copy_(received[row, offset : offset + size].view_as(param[0]))
                offset += size

    @torch.no_grad()
    def add_replica_grads(self) -> None:
        """Send each copy's gradient to its expert's owner and add it there (after backward, before the
        data-parallel reduction)."""
        for index, (layer, plan) in enumerate(zip(self.layers, self.plans)):
            experts = layer.experts
            names = [name for name, _ in experts.named_parameters(recurse=False)]
            params = [getattr(experts, name) for name in names]
            width = sum(p[0].numel() for p in params)
            sends, mine = self._routes(plan)
            order = [slot for owner in range(plan.ep_size) for slot, o in mine if o == owner]
            grads = [
                experts.replicas[name].grad
                if experts.replicas[name].grad is not None
                else torch.zeros_like(experts.replicas[name])
                for name in names
            ]
            outgoing = self._flat(grads, order, width, params[0])
            send_counts = [sum(1 for _, owner in mine if owner == rank) for rank in range(plan.ep_size)]
            received = self._exchange(index, outgoing, send_counts, [len(s) for s in sends], "gradients")
            targets = [local for local_list in sends for local in local_list]
            offset = 0
            for param in params:
                size = param[0].numel()
                if targets and param.grad is None:
                    param.grad = torch.zeros_like(param)
                for row, local in enumerate(targets):
                    param.grad[local] += received[row, offset : offset + size].view_as(param[0])
                offset += size
            for name in names:
                experts.replicas[name].grad = None


def unreplicated_rows(loads: list, ep_size: int, edp_size: int) -> list[float]:
    """Rows each expert-parallel rank would compute without copies: its experts' global loads, shared by the
    edp_size groups of ranks that hold the same experts (their mean)."""
    per_rank = len(loads) // ep_size
    return [sum(loads[rank * per_rank : (rank + 1) * per_rank]) / edp_size for rank in range(ep_size)]
