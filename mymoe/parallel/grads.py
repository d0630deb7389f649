"""Gradient averaging over data parallelism and the true global gradient norm.

Why expert gradients are divided by the world size, not by the edp size: the objective of data
parallelism is the mean of the W ranks' losses, L = (1/W) sum_r L_r, each L_r a mean over rank r's own
tokens. A dense parameter's gradient on rank r is dL_r/dθ, so the average over the world is right.
An expert lives on one rank of each expert-parallel group, and the all-to-all brings it the tokens of
every rank in that group: after backward its gradient already is sum_{s in ep group} dL_s/dW. Summing
that over the edp group (one owner per ep group) gives sum over all W ranks of dL_r/dW, and dividing by
W gives dL/dW. Dividing by the edp size would overcount by the ep size. With EP = 1 both rules agree.

The global norm counts every gradient element once: dense gradients are identical on all ranks after
reduction (counted from this rank alone); each ep group holds every expert exactly once, so the sum
of squares of expert gradients is summed over the ep group. Under FSDP (fsdp.py) every gradient is a
shard that no other rank holds (dense over the world, experts over edp within each ep slice), so the sum
of squares of the local shards is summed over the world.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from mymoe.model.moe.experts import is_expert
from mymoe.parallel.collectives import apply_flat, named_collective
from mymoe.parallel.fsdp import is_fully_sharded
from mymoe.parallel.groups import ParallelContext


def split_parameters(model: torch.nn.Module) -> tuple[list, list]:
    """(dense, expert) trainable parameters, in a fixed order so every rank packs them alike."""
    dense, expert = [], []
    for param in model.parameters():
        if param.requires_grad:
            (expert if is_expert(param) else dense).append(param)
    return dense, expert


def reduce_gradients(model: torch.nn.Module, ctx: ParallelContext) -> None:
    """Average gradients as data parallelism prescribes: dense over the world, experts over edp / W."""
    if not ctx.is_distributed or is_fully_sharded(model):  # FSDP reduce-scatters in backward
        return
    dense, expert = split_parameters(model)
    for param in dense + expert:
        if param.grad is None:  # a rank whose experts got no tokens must still join the same collectives
            param.grad = torch.zeros_like(param)

    def average_over_world(flat):
        flat.div_(ctx.world_size)
        with named_collective("all_reduce (dense gradients, world)", ctx.timeout_seconds):
            dist.all_reduce(flat)

    def average_experts(flat):
        flat.div_(ctx.world_size)
        if ctx.expert_data_parallel_size > 1:
            with named_collective("all_reduce (expert gradients, expert-data-parallel group)", ctx.timeout_seconds):
                dist.all_reduce(flat, group=ctx.expert_data_parallel_group)

    apply_flat([p.grad for p in dense], average_over_world, ctx.device)
    apply_flat([p.grad for p in expert], average_experts, ctx.device)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a sharded (DTensor) gradient, or the tensor itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _sum_of_squares(params: list, device: torch.device) -> torch.Tensor:
    total = torch.zeros((), dtype=torch.float32, device=device)
    for param in params:
        if param.grad is not None:
            total += _local(param.grad.detach()).float().square().sum().to(device)
    return total


def global_grad_norm(model: torch.nn.Module, ctx: ParallelContext) -> torch.Tensor:
    """L2 norm of the whole model's gradient, each element counted once. Call after reduce_gradients."""
    dense, expert = split_parameters(model)
    if ctx.is_distributed and is_fully_sharded(model):
        squares = _sum_of_squares(dense + expert, ctx.device)
        with named_collective("all_reduce (sharded gradient norm, world)", ctx.timeout_seconds):
            dist.all_reduce(squares)
        return squares.sqrt()
    expert_squares = _sum_of_squares(expert, ctx.device)
    if ctx.expert_parallel_size > 1:
        with named_collective("all_reduce (expert gradient norm, expert-parallel group)", ctx.timeout_seconds):
            dist.all_reduce(expert_squares, group=ctx.expert_parallel_group)
    return (_sum_of_squares(dense, ctx.device) + expert_squares).sqrt()


def clip_grad_norm_(model: torch.nn.Module, max_norm: float, ctx: ParallelContext) -> torch.Tensor:
    """Scale all gradients so the global norm is at most max_norm (0 disables); return the norm before.

    Same rule as torch.nn.utils.clip_grad_norm_: scale by max_norm / (norm + 1e-6) when that is below 1.
    """
    norm = global_grad_norm(model, ctx)
    if max_norm > 0:
        scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for param in model.parameters():
            if param.grad is not None:
                grad = _local(param.grad.detach())
                grad.mul_(scale.to(grad.device, grad.dtype))
    return norm
