"""Start-up and shut-down: environment -> validated config -> process group -> agreed config -> groups."""

from __future__ import annotations

import datetime
import os
from typing import Optional

import torch
import torch.distributed as dist

from mymoe.config import Config, ConfigError, ParallelConfig, validate
from mymoe.parallel.agree import agree_on_config
from mymoe.parallel.env import LaunchInfo, agree_master_over_mpi, detect_launch
from mymoe.parallel.groups import ParallelContext, build_context


def resolve_backend(backend: str) -> str:
    """ "auto" is nccl when CUDA is there and gloo otherwise; an explicit choice is checked."""
    if backend == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl" and not torch.cuda.is_available():
        raise ConfigError("parallel.backend='nccl' needs CUDA, and this process sees no GPU: use 'gloo' or 'auto'")
    return backend


def _device(backend: str, local_rank: int) -> torch.device:
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def _agent_store(launch: LaunchInfo, timeout_seconds: float):
    """The store of torchrun's agent at MASTER_ADDR:MASTER_PORT, under a prefix for this restart attempt.

    torchrun keeps its store across ``--max-restarts``: without the prefix the restarted workers would
    read the dead workers' gloo addresses left in it and fail with "Connection refused".
    """
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    store = dist.TCPStore(
        launch.master_addr,
        launch.master_port,
        launch.world_size,
        is_master=False,
        timeout=datetime.timedelta(seconds=timeout_seconds),
    )
    return dist.PrefixStore(f"mymoe/attempt_{attempt}", store)


def init_distributed(config: Config, launch: Optional[LaunchInfo] = None) -> ParallelContext:
    """Join the job the launcher started and build the ep x edp layout.

    The config is validated for this world size first. When it is bad, the rank still joins and takes
    part in the config agreement, so a rank started with a different (or broken) config never leaves
    the others waiting: every rank raises, the mismatch error when configs differ, else the same
    ConfigError. A single process with no launcher variables needs no process group at all.
    """
    launch = launch or detect_launch()
    world_size = dist.get_world_size() if dist.is_initialized() else launch.world_size
    try:
        validate(config, world_size)
        problem = None
    except ConfigError as error:
        problem = error
    if world_size == 1 and not dist.is_initialized():
        if problem is not None:
            raise problem
        device = _device(resolve_backend(config.parallel.backend), launch.local_rank)
        return ParallelContext(
            launcher=launch.launcher,
            local_rank=launch.local_rank,
            device=device,
            timeout_seconds=config.parallel.timeout_seconds,
            dispatcher=config.parallel.dispatcher,
            a2a_chunks=config.parallel.a2a_chunks,
        )
    # a broken parallel section must not stop this rank from joining and hearing the verdict
    parallel = config.parallel if problem is None else ParallelConfig()
    backend = resolve_backend(parallel.backend)
    device = _device(backend, launch.local_rank)
    timeout = parallel.timeout_seconds
    if not dist.is_initialized():
        if launch.launcher in ("openmpi", "mpich"):
            launch = agree_master_over_mpi(launch)
        if launch.launcher == "torchrun" and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            dist.init_process_group(
                backend,
                store=_agent_store(launch, timeout),
                rank=launch.rank,
                world_size=launch.world_size,
                timeout=datetime.timedelta(seconds=timeout),
            )
        elif launch.launcher == "torchrun":  # torchrun-style variables without the agent: rank 0 hosts the store
            dist.init_process_group(
                backend,
                init_method="env://",
                rank=launch.rank,
                world_size=launch.world_size,
                timeout=datetime.timedelta(seconds=timeout),
            )
        else:
            dist.init_process_group(
                backend,
                init_method=f"tcp://{launch.master_addr}:{launch.master_port}",
                rank=launch.rank,
                world_size=launch.world_size,
                timeout=datetime.timedelta(seconds=timeout),
            )
    try:
        agree_on_config(config, device, timeout_seconds=timeout)
        if problem is not None:
            raise problem
        return build_context(
            parallel.expert_parallel_size,
            device=device,
            timeout_seconds=timeout,
            launcher=launch.launcher,
            local_rank=launch.local_rank,
            dispatcher=parallel.dispatcher,
            a2a_chunks=parallel.a2a_chunks,
        )
    except BaseException:
        shutdown()
        raise


def shutdown() -> None:
    """Destroy the process group (gloo aborts at interpreter exit otherwise). Safe to call twice."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
