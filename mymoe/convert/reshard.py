"""Write a sharded checkpoint at a chosen world size and expert-parallel size, from a sharded checkpoint
(offline resharding) or from a consolidated file.

Loading already reshards: checkpoints address experts by global index, so the trainer resumes any
checkpoint at any layout. Rewriting offline still helps when the new layout should read only its own
files (one file per rank, each rank's experts in its own file) or when the source is a consolidated
file. The rewrite is done the way a run saves: one process per target rank joins a local gloo group,
holds exactly the experts that rank holds, loads them (through the CheckpointManager, with its checksum
and architecture checks, or from the consolidated file) and saves them through the CheckpointManager.
Model, optimizer moments, step, data-reader position and each rank's RNG stream carry over; a rank that
did not exist in the source starts from rank 0's RNG state, as a resumed run would.
"""

from __future__ import annotations

import datetime
import multiprocessing
import os
import tempfile
import traceback
from pathlib import Path
from typing import Optional

from mymoe.checkpoint.manager import CheckpointManager, architecture_differences, find_checkpoint
from mymoe.checkpoint.storage import CheckpointError
from mymoe.config import Config, config_from_dict, validate
from mymoe.convert.atomic import atomic_output
from mymoe.convert.consolidate import ConsolidatedFile
from mymoe.convert.state import TrainingState
from mymoe.parallel import ParallelContext
from mymoe.parallel.env import free_port


def target_config(
    source: Config, run_config: Optional[Config], world_size: int, expert_parallel_size: int, source_name: str
) -> Config:
    """The config to save under: the run's own when given (its architecture must match), else the source's,
    with the new expert-parallel size; checked for this world size."""
    config = config_from_dict(run_config.to_dict() if run_config is not None else source.to_dict())
    if run_config is not None:
        differences = architecture_differences(source.to_dict()["model"], config.to_dict()["model"])
        if differences:
            raise CheckpointError(
                f"{source_name} was saved from a different model than the given config, nothing "
                f"was written:\n  " + "\n  ".join(differences)
            )
    config.parallel.expert_parallel_size = expert_parallel_size
    return validate(config, world_size)


def write_sharded(
    source: str | Path,
    out_root: str | Path,
    world_size: int,
    expert_parallel_size: int,
    step: Optional[int] = None,
    run_config: Optional[Config] = None,
    overwrite: bool = False,
    timeout_seconds: float = 600.0,
) -> dict:
    """Write `source` (a sharded checkpoint or a consolidated .safetensors file) as a checkpoints folder at
    `out_root` saved by `world_size` ranks with `expert_parallel_size`; returns a summary dict."""
    source, out_root = Path(source), Path(out_root)
    if source.is_file():
        consolidated = ConsolidatedFile(source)
        source_config, source_step, directory = consolidated.config, consolidated.require_training()["step"], None
    else:
        directory, manifest = find_checkpoint(source, step)
        source_config, source_step = config_from_dict(manifest["config"]), manifest["step"]
    config = target_config(source_config, run_config, world_size, expert_parallel_size, str(source))
    with atomic_output(out_root, overwrite) as temporary:
        arguments = (str(directory) if directory is not None else None, str(source), str(temporary), config.to_dict())
        if world_size == 1:
            write_rank(0, 1, expert_parallel_size, *arguments)
        else:
            run_ranks(world_size, expert_parallel_size, arguments, timeout_seconds)
    return {
        "step": source_step,
        "world_size": world_size,
        "expert_parallel_size": expert_parallel_size,
        "out_root": out_root,
        "files": sum(1 for _ in out_root.rglob("*.distcp")),
    }


def write_rank(
    rank: int,
    world_size: int,
    expert_parallel_size: int,
    checkpoint_dir: Optional[str],
    source: str,
    out_root: str,
    config_dict: dict,
) -> None:
    """One target rank: hold its experts, load them, save them (collective when world_size > 1)."""
    config = config_from_dict(config_dict)
    ctx = ParallelContext(
        rank=rank,
        world_size=world_size,
        backend="gloo" if world_size > 1 else None,
        expert_parallel_size=expert_parallel_size,
        expert_parallel_rank=rank % expert_parallel_size,
        expert_data_parallel_size=world_size // expert_parallel_size,
        expert_data_parallel_rank=rank // expert_parallel_size,
    )
    first, count = ctx.local_experts(config.model.moe.n_routed_experts)
    state = TrainingState(config, first, count)
    if checkpoint_dir is not None:
        directory = Path(checkpoint_dir)
        CheckpointManager(directory.parent, config, ctx, verbose=False).load(state, directory)
    else:
        ConsolidatedFile(source).load_training_state(state, rank)
    CheckpointManager(Path(out_root), config, ctx, verbose=False).save(state)


def _rank_main(
    rank: int,
    world_size: int,
    port: int,
    expert_parallel_size: int,
    arguments: tuple,
    report: str,
    timeout_seconds: float,
) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)  # ranks share this machine's cores
    error = None
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_seconds),
        )
        write_rank(rank, world_size, expert_parallel_size, *arguments)
    except BaseException as failure:  # reported to the parent, which names the rank
        error = (
            f"{type(failure).__name__}: {failure}" if isinstance(failure, CheckpointError) else traceback.format_exc()
        )
    Path(report).write_text(error or "")
    if dist.is_initialized():
        dist.destroy_process_group()
    os._exit(1 if error else 0)


def run_ranks(world_size: int, expert_parallel_size: int, arguments: tuple, timeout_seconds: float) -> None:
    """Start one local process per target rank over gloo and wait; raise the first rank's error."""
    context = multiprocessing.get_context("spawn")
    port = free_port("127.0.0.1")
    with tempfile.TemporaryDirectory(prefix="mymoe-convert-") as reports:
        processes = []
        for rank in range(world_size):
            process = context.Process(
                target=_rank_main,
                args=(
                    rank,
                    world_size,
                    port,
                    expert_parallel_size,
                    arguments,
                    f"{reports}/rank{rank}",
                    timeout_seconds,
                ),
                daemon=True,
            )
            process.start()
            processes.append(process)
        for process in processes:
            process.join(timeout_seconds)
        errors = []
        for rank, process in enumerate(processes):
            if process.is_alive():
                process.kill()
                errors.append(f"rank {rank} did not finish within {timeout_seconds:.0f} s")
                continue
            path = Path(reports) / f"rank{rank}"
            text = path.read_text() if path.exists() else f"exited with code {process.exitcode} before reporting"
            if text:
                errors.append(f"rank {rank}: {text.strip()}")
        if errors:
            raise CheckpointError(
                "writing the sharded checkpoint failed, nothing was written:\n  " + "\n  ".join(errors[:2])
            )
