"""Expert-parallel MoE layer == one process holding every expert, outputs and all gradients, on every rank.

Each spawned run tries every expert-parallel size its world allows, every dispatcher (the all-to-all ones
also with their exchange pipelined in chunks), dropless and capacity mode, and a "forced" case where the
router bias starves some experts (one rank's experts get no tokens at all when EP = 4) and rank 1 has no
tokens to send. Processes start once per world size.

The reference for rank r is a full layer with the same weights run on rank r's input. Every gradient is
compared with that reference, except the expert weights: an expert serves the tokens of its whole
expert-parallel group, so its gradient is the sum of the references of the group's ranks.
"""

import functools

import pytest
import torch
import torch.distributed as dist

from dist_utils import run_distributed
from mymoe.config import MoEConfig
from mymoe.model.moe.layer import MoELayer
from mymoe.parallel import AllGatherDispatcher, AllToAllDispatcher, DedupAllToAllDispatcher, build_context

HIDDEN, FFN, EXPERTS, TOP_K = 16, 32, 8, 2
TOLERANCE = 1e-5
DISPATCHERS = {
    "alltoall": AllToAllDispatcher,
    "alltoall_dedup": DedupAllToAllDispatcher,
    "allgather": AllGatherDispatcher,
    # the overlapped pipeline: experts compute chunk i while chunk i+1 travels (3 chunks leave some empty)
    "alltoall, 3 chunks": functools.partial(AllToAllDispatcher, chunks=3),
    "alltoall_dedup, 3 chunks": functools.partial(DedupAllToAllDispatcher, chunks=3),
    "alltoall, blocking": functools.partial(AllToAllDispatcher, chunks=0),  # dispatch, experts, combine
}
TENSORS_PER_CASE = 9  # output, input, router, 3 shared-expert and 3 expert weights


def make_layer(capacity_factor, forced: bool, expert_activation: str = "swiglu") -> MoELayer:
    torch.manual_seed(0)
    moe = MoEConfig(
        expert_activation=expert_activation,
        n_routed_experts=EXPERTS,
        num_experts_per_tok=TOP_K,
        moe_intermediate_size=FFN,
        n_shared_experts=1,
        capacity_factor=capacity_factor,
        min_capacity=1,
    )
    layer = MoELayer(HIDDEN, moe)
    if forced:
        # selection-only bias: expert 0 and the last two (all of rank 3's when EP = 4) never get a token
        with torch.no_grad():
            layer.gate.expert_bias[[0, EXPERTS - 2, EXPERTS - 1]] = -1e4
    return layer


def rank_batch(rank: int, forced: bool):
    """Rank r's input and upstream gradient; uneven sizes, and rank 1 sends nothing in the forced case."""
    generator = torch.Generator().manual_seed(100 + rank)
    num_tokens = 0 if forced and rank == 1 else 5 + 3 * rank
    hidden = torch.randn(num_tokens, HIDDEN, generator=generator)
    upstream = torch.randn(num_tokens, HIDDEN, generator=generator)
    return hidden, upstream


def run_layer(layer: MoELayer, hidden, upstream) -> dict:
    hidden = hidden.clone().requires_grad_(True)
    output, _ = layer(hidden)
    (output * upstream).sum().backward()

    def grad(param):
        return torch.zeros_like(param) if param.grad is None else param.grad.clone()

    result = {"output": output.detach(), "grad input": hidden.grad.clone(), "grad router": grad(layer.gate.weight)}
    for name, param in layer.shared_experts.named_parameters():
        result[f"grad shared {name}"] = grad(param)
    for name in layer.experts.projection_names:
        result[f"grad expert {name}"] = grad(getattr(layer.experts, name))
    return result


def check_case(
    rank: int, world_size: int, ctx, dispatcher_name: str, capacity_factor, forced: bool, activation: str = "swiglu"
) -> int:
    """Compare rank's expert-parallel run with the references; return how many tensors were compared."""
    first_of_group = rank - ctx.expert_parallel_rank
    group_ranks = range(first_of_group, first_of_group + ctx.expert_parallel_size)
    references = {
        r: run_layer(make_layer(capacity_factor, forced, activation), *rank_batch(r, forced)) for r in group_ranks
    }

    layer = make_layer(capacity_factor, forced, activation)
    dispatcher = DISPATCHERS[dispatcher_name](
        ctx.expert_parallel_group, EXPERTS, name="test", timeout_seconds=ctx.timeout_seconds
    )
    layer.experts.shard(dispatcher.first_local_expert, dispatcher.num_local_experts)
    layer.set_dispatcher(dispatcher)
    got = run_layer(layer, *rank_batch(rank, forced))

    first, count = dispatcher.first_local_expert, dispatcher.num_local_experts
    case = (
        f"rank {rank}, world {world_size}, EP {ctx.expert_parallel_size}, {dispatcher_name}, "
        f"capacity_factor={capacity_factor}, forced={forced}, {activation}"
    )
    for key, value in got.items():
        if key.startswith("grad expert"):
            expected = sum(ref[key] for ref in references.values())[first : first + count]
        else:
            expected = references[rank][key]
        assert value.shape == expected.shape, (
            f"{case}: {key} has shape {tuple(value.shape)}, expected {tuple(expected.shape)}"
        )
        error = (value - expected).abs().max().item() if value.numel() else 0.0
        assert error <= TOLERANCE, f"{case}: {key} differs from the single-process layer by {error:.3g}"
    if forced and first == 0:
        assert not got["grad expert w_up"][0].any(), f"{case}: starved expert 0 has a gradient"
    return len(got)


def equivalence_worker(rank: int, world_size: int, expert_parallel_sizes: list) -> int:
    compared = 0
    for expert_parallel_size in expert_parallel_sizes:
        ctx = build_context(expert_parallel_size, device=torch.device("cpu"), timeout_seconds=30)
        for dispatcher_name in DISPATCHERS:
            for capacity_factor in (None, 1.0):
                for forced in (False, True):
                    compared += check_case(rank, world_size, ctx, dispatcher_name, capacity_factor, forced)
        dist.barrier()
    return compared


@pytest.mark.slow
@pytest.mark.parametrize("world_size, expert_parallel_sizes", [(2, [1, 2]), (4, [1, 2, 4])])
def test_expert_parallel_layer_matches_single_process(world_size, expert_parallel_sizes):
    results = run_distributed(equivalence_worker, world_size, args=(expert_parallel_sizes,), timeout=60)
    cases = len(expert_parallel_sizes) * len(DISPATCHERS) * 2 * 2
    assert [result.value for result in results] == [cases * TENSORS_PER_CASE] * world_size


def gelu_worker(rank: int, world_size: int) -> int:
    ctx = build_context(2, device=torch.device("cpu"), timeout_seconds=30)
    compared = 0
    for dispatcher_name in DISPATCHERS:
        for capacity_factor in (None, 1.0):
            for forced in (False, True):
                compared += check_case(rank, world_size, ctx, dispatcher_name, capacity_factor, forced, "gelu")
    return compared


@pytest.mark.slow
def test_gelu_experts_under_expert_parallelism_match_single_process():
    """The plain two-layer experts (no w_gate) through every dispatcher at EP 2: outputs and gradients."""
    results = run_distributed(gelu_worker, 2, timeout=60)
    tensors_per_case = 7  # output, input, router, 2 shared-expert and 2 expert weights
    assert [result.value for result in results] == [len(DISPATCHERS) * 2 * 2 * tensors_per_case] * 2
