"""Fully sharded data parallelism (PyTorch FSDP2) composed with our expert parallelism.

The mesh is the one of groups.py, seen as FSDP sees it: dense parameters are data-parallel over every
rank, so they are sharded over the whole world; an expert slice is replicated only over its
expert-data-parallel group (ranks [ep_rank, ep_rank + ep, ...]), so it is sharded over that group. The
all-to-all dispatch between expert-parallel ranks is untouched: FSDP gathers a module's parameters before
its forward and the dispatcher then moves tokens exactly as it does without FSDP.

Applied in order, from the inside out, as torchtitan does:

    1. each MoE layer's experts: fully_shard over the expert-data-parallel group (with EP = 1 that is the
       world, and the experts go with their block instead: one all-gather per block, not two)
    2. each block (and the multi-token-prediction head): fully_shard over the world; the last one stays
       gathered after its forward, since backward starts with it and would gather it again at once
    3. the root (embedding, final norm, lm head): fully_shard over the world, kept gathered after
       forward since backward needs it at once

Gradient normalisation matches the replicated layout (grads.py): FSDP averages dense gradients over the
world; expert gradients are summed over the expert-data-parallel group and divided by the world size,
not by the group size, since each expert already summed its ep group's tokens in backward.

On gloo, FSDP's all-gather and reduce-scatter are carried by all_reduce (AllGatherByAllReduce,
ReduceScatterByAllReduce): gloo's own all-gather and reduce-scatter are several times slower on CPU.

Parameters are sharded on dim 0. A stacked expert tensor [E_local, in, out] is too, keeping whole
experts on each rank, when E_local is a multiple of the expert-data-parallel size; otherwise (8 experts
over 16 ranks) it is sharded on dim 1, inside each expert, so its memory still shrinks with every rank
added (torchtitan does the same). The checkpoint layout handles both (mymoe/checkpoint/layout.py).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.fsdp._fully_shard._fsdp_api import AllGather, ReduceScatter
from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultAllocMixin
from torch.distributed.tensor import Shard

from mymoe.config import ParallelConfig
from mymoe.parallel.groups import ParallelContext

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def is_fully_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def data_parallel_meshes(ctx: ParallelContext) -> tuple[DeviceMesh, DeviceMesh]:
    """(dense mesh over the world, expert mesh over this rank's expert-data-parallel group), built on the
    groups the context already holds, so FSDP opens no process group of its own."""
    device_type = ctx.device.type
    dense = DeviceMesh.from_group(dist.group.WORLD, device_type)
    if ctx.expert_parallel_size == 1:
        return dense, dense
    return dense, DeviceMesh.from_group(ctx.expert_data_parallel_group, device_type)


def expert_shard_dim(shape: tuple, group_size: int) -> int:
    """Dim a stacked expert tensor is sharded on over `group_size` ranks: 0 (whole experts per rank) when
    its experts divide evenly, else 1 when that divides evenly (FSDP2 pads only dim 0), else 0 padded."""
    if len(shape) < 2 or shape[0] % group_size == 0 or shape[1] % group_size:
        return 0
    return 1


def expert_placement(group_size: int):
    """shard_placement_fn that applies expert_shard_dim to expert parameters and dim 0 to the rest."""

    def placement(param: nn.Parameter) -> Shard:
        return Shard(expert_shard_dim(tuple(param.shape), group_size) if getattr(param, "is_expert", False) else 0)

    return placement


def sharded_blocks(model: nn.Module) -> list[nn.Module]:
    """The modules each sharded as one unit over the world, in forward order."""
    blocks = list(model.model.layers)
    if model.mtp is not None:
        blocks.append(model.mtp)
    return blocks


class AllGatherByAllReduce(DefaultAllocMixin, AllGather):
    """FSDP's all-gather as a sum of zero-padded shards: gloo's all_reduce moves twice the bytes of its
    all_gather yet runs several times faster on CPU (measured: 0.06 s against 0.45 s for 54 MB at world
    2, mymoe's benchmark model's block), and adding zeros is exact."""

    def __call__(self, output_tensor, input_tensor, group, async_op=False):
        shard, rank = input_tensor.numel(), group.rank()
        own = output_tensor.narrow(0, shard * rank, shard)
        if own.data_ptr() != input_tensor.data_ptr():  # FSDP copies the shard in place already
            own.copy_(input_tensor)
        output_tensor.narrow(0, 0, shard * rank).zero_()
        output_tensor.narrow(0, shard * (rank + 1), output_tensor.numel() - shard * (rank + 1)).zero_()
        # always asynchronous, even when FSDP asks for a blocking gather: gloo runs it on its own thread, so
        # a prefetched block's gather overlaps compute, and FSDP waits on the returned work before the
        # parameters are used (benchmarks/layouts.py, world 2, one run: FSDP at 0.934 of the replicated
        # layout's tokens/s this way, 0.888 blocking)
        return dist.all_reduce(output_tensor, group=group, async_op=True)


class ReduceScatterByAllReduce(DefaultAllocMixin, ReduceScatter):
    """FSDP's reduce-scatter as an all_reduce of the whole gradient buffer (a temporary FSDP frees after
    this call) keeping this rank's chunk: faster on gloo for the same reason as AllGatherByAllReduce."""

    def __call__(self, output_tensor, input_tensor, group, op, async_op=False):
        dist.all_reduce(input_tensor, op=op, group=group)
        output_tensor.copy_(input_tensor.narrow(0, output_tensor.numel() * group.rank(), output_tensor.numel()))


def use_all_reduce_comms(module: FSDPModule) -> None:
    """Gloo only (NCCL's all-gather and reduce-scatter are the fast ones there)."""
    module.set_custom_all_gather(AllGatherByAllReduce())
    module.set_custom_reduce_scatter(ReduceScatterByAllReduce())


def apply_fsdp(model: nn.Module, ctx: ParallelContext, parallel: ParallelConfig) -> nn.Module:
    """Shard `model` in place (collective: every rank calls); returns it. A single process is left as is.

    Call after expert parallelism (parallelize) and adapters (mymoe.peft) are in place: FSDP shards the
    parameters that exist when it is applied.
    """
    if not ctx.is_distributed:
        return model
    dense_mesh, expert_mesh = data_parallel_meshes(ctx)
    common = {
        "mp_policy": MixedPrecisionPolicy(
            param_dtype=DTYPES[parallel.fsdp_param_dtype], reduce_dtype=DTYPES[parallel.fsdp_reduce_dtype]
        ),
        # pinned host memory makes the copies to the GPU asynchronous; there is none to pin for on CPU
        "offload_policy": (
            CPUOffloadPolicy(pin_memory=ctx.device.type == "cuda") if parallel.fsdp_cpu_offload else OffloadPolicy()
        ),
    }
    blocks = sharded_blocks(model)
    in_last_block = set(blocks[-1].modules())

    def reshard(module: nn.Module) -> bool:
        return parallel.fsdp_reshard_after_forward and module not in in_last_block

    for layer in model.iter_moe_layers() if ctx.expert_parallel_size > 1 else ():
        # experts on their own mesh; with EP = 1 they share the world's and go with their block, in one gather
        edp = ctx.expert_data_parallel_size
        fully_shard(
            layer.experts,
            mesh=expert_mesh,
            reshard_after_forward=reshard(layer.experts),
            shard_placement_fn=expert_placement(edp),
            **common,
        )
        layer.experts.set_gradient_divide_factor(float(ctx.world_size))
        # gloo has no pre-multiplied sum: divide before and after a plain sum (a group of one rank
        # reduces nothing and divides once by itself)
        if ctx.backend != "nccl" and edp > 1:
            layer.experts.set_force_sum_reduction_for_comms(True)
    for block in blocks:
        fully_shard(
            block,
            mesh=dense_mesh,
            reshard_after_forward=reshard(block),
            shard_placement_fn=expert_placement(ctx.world_size),
            **common,
        )
    fully_shard(model, mesh=dense_mesh, reshard_after_forward=False, **common)
    if ctx.backend == "gloo":
        for module in model.modules():
            if isinstance(module, FSDPModule):
                use_all_reduce_comms(module)
    # FSDP replaces each parameter by a sharded one; the marker the optimizer groups, the gradient norm
    # and the checkpoint read must come along
    for layer in model.iter_moe_layers():
        for param in layer.experts.parameters():
            param.is_expert = True
    if parallel.fsdp_prefetch > 0:
        ahead = parallel.fsdp_prefetch
        for index, block in enumerate(blocks):
            block.set_modules_to_forward_prefetch(blocks[index + 1 : index + 1 + ahead])
            block.set_modules_to_backward_prefetch(blocks[max(index - ahead, 0) : index][::-1])
    return model


def set_gradient_sync(model: nn.Module, enabled: bool) -> None:
    """Reduce-scatter gradients in this backward (the last micro-batch of a step) or keep accumulating
    them unsharded, one reduction per optimizer step instead of one per micro-batch."""
    if is_fully_sharded(model):
        model.set_requires_gradient_sync(enabled)
