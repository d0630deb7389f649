"""Bad layouts and mismatched configs fail on every rank at start-up, and a dead or stalled rank makes the
others fail within the timeout with an error that names the collective. Nothing here may hang."""

import os
import time

import pytest
import torch

from dist_utils import free_port, run_distributed
from mymoe.config import Config, ConfigError, MoEConfig
from mymoe.model.moe.layer import MoELayer
from mymoe.parallel import (
    AllGatherDispatcher,
    AllToAllDispatcher,
    CollectiveError,
    LaunchInfo,
    build_context,
    init_distributed,
    shutdown,
)

TIMEOUT_SECONDS = 3


def config_for(experts: int = 8, expert_parallel_size: int = 2, lr: float = 3e-4) -> Config:
    config = Config()
    config.model.moe.n_routed_experts = experts
    config.parallel.expert_parallel_size = expert_parallel_size
    config.parallel.backend = "gloo"
    config.parallel.timeout_seconds = 30
    config.train.lr = lr
    return config


# what each rank is started with, per case; every case must fail on every rank
BAD_STARTS = {
    "world size not divisible": lambda rank: config_for(experts=6, expert_parallel_size=3),
    "experts not divisible": lambda rank: config_for(experts=6, expert_parallel_size=4),
    "rank 2 has another lr": lambda rank: config_for(lr=1e-3 if rank == 2 else 3e-4),
    "only rank 3 has a bad layout": lambda rank: config_for(expert_parallel_size=3 if rank == 3 else 2),
}


def bad_start_worker(rank: int, world_size: int, ports: list) -> dict:
    outcomes = {}
    for port, (case, make_config) in zip(ports, BAD_STARTS.items()):
        # each case joins afresh on its own port through the tcp:// path srun and mpirun use
        launch = LaunchInfo("slurm", rank, world_size, rank, "127.0.0.1", port)
        start = time.monotonic()
        try:
            init_distributed(make_config(rank), launch)
            outcomes[case] = ("no error", "", 0.0)
        except ConfigError as error:
            outcomes[case] = (type(error).__name__, str(error), time.monotonic() - start)
        shutdown()

    # direct use of the pieces: the same checks, raised before any collective
    init_distributed(config_for(), LaunchInfo("slurm", rank, world_size, rank, "127.0.0.1", ports[-1]))
    for case, call in {
        "build_context(3) on 4 ranks": lambda: build_context(3, device=torch.device("cpu"), timeout_seconds=30),
        "alltoall over 6 experts": lambda: AllToAllDispatcher(None, 6),
        "allgather over 6 experts": lambda: AllGatherDispatcher(None, 6),
    }.items():
        try:
            call()
            outcomes[case] = ("no error", "", 0.0)
        except ValueError as error:
            outcomes[case] = (type(error).__name__, str(error), 0.0)
    shutdown()
    return outcomes


@pytest.mark.slow
def test_bad_start_fails_on_every_rank():
    ports = [free_port() for _ in range(len(BAD_STARTS) + 1)]
    results = run_distributed(bad_start_worker, world_size=4, args=(ports,), init_process_group=False, timeout=60)
    expected = {
        "world size not divisible": ("ConfigError", "parallel.expert_parallel_size=3 must divide the world size 4"),
        "experts not divisible": (
            "ConfigError",
            "parallel.expert_parallel_size=4 must divide model.moe.n_routed_experts=6 (try 1, 2, 3, 6)",
        ),
        "rank 2 has another lr": ("ConfigMismatchError", "rank 2 differs from rank 0"),
        "only rank 3 has a bad layout": ("ConfigMismatchError", "rank 3 differs from rank 0"),
        "build_context(3) on 4 ranks": ("ValueError", "expert_parallel_size=3 must divide the world size 4"),
        "alltoall over 6 experts": ("ValueError", "num_experts=6 must be divisible by the expert-parallel size 4"),
        "allgather over 6 experts": ("ValueError", "num_experts=6 must be divisible by the expert-parallel size 4"),
    }
    for result in results:
        for case, (error_type, fragment) in expected.items():
            got_type, message, seconds = result.value[case]
            assert got_type == error_type and fragment in message, f"rank {result.rank}, {case}: {got_type}: {message}"
            assert seconds < 10, f"rank {result.rank}, {case}: took {seconds:.1f} s to fail"


def fault_worker(rank: int, world_size: int) -> dict:
    """EP groups [0, 1] and [2, 3]: rank 1 dies and rank 3 stalls once the layout is up."""
    config = config_for(experts=4, expert_parallel_size=2)
    config.parallel.timeout_seconds = TIMEOUT_SECONDS
    config.model.hidden_size = 16
    ctx = init_distributed(config)
    layer = MoELayer(16, MoEConfig(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16))
    dispatcher = AllToAllDispatcher(ctx.expert_parallel_group, 4, name="layer 0", timeout_seconds=TIMEOUT_SECONDS)
    layer.experts.shard(dispatcher.first_local_expert, dispatcher.num_local_experts)
    layer.set_dispatcher(dispatcher)
    if rank == 1:
        os._exit(3)  # dies without a word, as a crashed or OOM-killed process does
    if rank == 3:
        time.sleep(TIMEOUT_SECONDS + 1)  # stalls past the timeout, then leaves
        return {"stalled": True}
    start = time.monotonic()
    try:
        layer(torch.randn(6, 16))
    except CollectiveError as error:
        return {"error": str(error), "seconds": time.monotonic() - start}
    finally:
        shutdown()
    return {"error": None, "seconds": time.monotonic() - start}


@pytest.mark.slow
def test_dead_and_stalled_ranks_fail_within_the_timeout():
    results = run_distributed(
        fault_worker,
        world_size=4,
        init_process_group=False,
        timeout=60,
        raise_errors=False,
        grace_after_failure=TIMEOUT_SECONDS + 10,
    )
    assert results[1].error_type == "Crashed"
    for rank, says in ((0, "failed: a rank probably died"), (2, f"timed out after {TIMEOUT_SECONDS} s")):
        outcome = results[rank].value
        assert outcome is not None, f"rank {rank}: {results[rank].error_type}: {results[rank].error}"
        assert outcome["error"] and "all_to_all_single (token counts, MoE dispatch, layer 0)" in outcome["error"], (
            outcome
        )
        assert says in outcome["error"], outcome
        assert outcome["seconds"] < TIMEOUT_SECONDS + 3, f"rank {rank} took {outcome['seconds']:.1f} s to fail"
