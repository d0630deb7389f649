"""Run a function on N processes joined in a gloo process group, from pytest.

    from dist_utils import run_distributed

    def worker(rank, world_size, scale):        # module level, so the spawned children can import it
        ...                                      # a gloo process group is up (unless init_process_group=False)
        return {"loss": 1.0 * scale}             # anything picklable; tensors are fine

    results = run_distributed(worker, world_size=2, args=(3.0,), timeout=60)
    assert results[1].value["loss"] == 3.0

Each child gets the variables torchrun would set (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT
on a free port), one intra-op thread (tests share a few cores), and writes its return value or its
exception to a file the parent reads. A rank that raises fails the test with every failing rank's
traceback; ranks still running at the deadline are killed and named. Pass `raise_errors=False` to get
the errors back as RankResult objects when failing is what the test expects.
"""

from __future__ import annotations

import datetime
import multiprocessing
import os
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from mymoe.parallel.env import free_port

__all__ = ["DistributedTestError", "RankResult", "free_port", "run_distributed"]

PORT_IN_USE = ("address already in use", "eaddrinuse")


@dataclass
class RankResult:
    rank: int
    value: Any = None
    error_type: Optional[str] = None  # class name of the exception the rank raised, None if it returned
    error: Optional[str] = None  # its message
    traceback: Optional[str] = None
    exitcode: Optional[int] = None  # None: killed at the deadline
    seconds: float = 0.0  # from spawn to the rank's exit (or the deadline)

    @property
    def ok(self) -> bool:
        return self.error_type is None and self.exitcode == 0


class DistributedTestError(AssertionError):
    """A rank failed or the run passed its deadline; the message holds every rank's story."""


def _child(
    fn,
    rank: int,
    world_size: int,
    port: int,
    args: tuple,
    env: dict,
    result_path: str,
    init_process_group: bool,
    pg_timeout: float,
) -> None:
    os.environ.update(
        {
            "RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": str(world_size),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
    )
    os.environ.update(env)
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        if init_process_group:
            dist.init_process_group(
                "gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=pg_timeout)
            )
        outcome = {"value": fn(rank, world_size, *args)}
    except BaseException as error:  # report everything, including SystemExit from a test helper
        outcome = {"error_type": type(error).__name__, "error": str(error), "traceback": traceback.format_exc()}
    with open(result_path + ".tmp", "wb") as f:
        torch.save(outcome, f)
    os.replace(result_path + ".tmp", result_path)  # the parent never reads half a file
    if dist.is_initialized():
        dist.destroy_process_group()  # gloo aborts at interpreter exit otherwise
    os._exit(1 if "error_type" in outcome else 0)


def _run_once(
    fn, world_size, args, env, timeout, init_process_group, pg_timeout, grace_after_failure, workdir
) -> list[RankResult]:
    context = multiprocessing.get_context("spawn")
    port = free_port("127.0.0.1")
    start = time.monotonic()
    processes, paths = [], []
    for rank in range(world_size):
        path = os.path.join(workdir, f"rank{rank}.pt")
        process = context.Process(
            target=_child,
            args=(fn, rank, world_size, port, args, env, path, init_process_group, pg_timeout),
            daemon=True,
        )
        process.start()
        processes.append(process)
        paths.append(path)
    seconds = [0.0] * world_size
    deadline = start + timeout
    failed = False
    while time.monotonic() < deadline and any(p.is_alive() for p in processes):
        for rank, process in enumerate(processes):
            if not process.is_alive() and not seconds[rank]:
                seconds[rank] = time.monotonic() - start
                if process.exitcode != 0 and not failed:
                    # the others may be blocked in a collective with the failed rank: do not wait for
                    # their collective timeout, the first failure is the story
                    failed = True
                    deadline = min(deadline, time.monotonic() + grace_after_failure)
        time.sleep(0.05)
    killed = set()
    for rank, process in enumerate(processes):
        if process.is_alive():
            process.kill()
            killed.add(rank)
        if not seconds[rank]:
            seconds[rank] = time.monotonic() - start
        process.join(5)
    return [
        _read_result(rank, processes[rank], paths[rank], seconds[rank], rank in killed) for rank in range(world_size)
    ]


def _read_result(rank: int, process, path: str, seconds: float, killed: bool) -> RankResult:
    import torch

    result = RankResult(rank, exitcode=None if killed else process.exitcode, seconds=seconds)
    if Path(path).exists():
        with open(path, "rb") as f:
            outcome = torch.load(f, weights_only=False)
        result.value = outcome.get("value")
        result.error_type, result.error = outcome.get("error_type"), outcome.get("error")
        result.traceback = outcome.get("traceback")
        if killed and result.error_type is None:
            result.error_type, result.error = "Killed", "returned a value, then hung until the deadline"
    elif killed:
        result.error_type, result.error = "Killed", f"still running at the deadline after {seconds:.1f} s"
    else:
        result.error_type, result.error = "Crashed", f"exited with code {process.exitcode} and left no result"
    return result


def _report(results: list[RankResult], timeout: float) -> str:
    lines = [f"distributed test failed (world size {len(results)}, deadline {timeout:g} s):"]
    for result in results:
        if result.ok:
            lines.append(f"  rank {result.rank}: ok in {result.seconds:.1f} s")
        else:
            lines.append(f"  rank {result.rank}: {result.error_type}: {result.error} ({result.seconds:.1f} s)")
    for result in results:
        if result.traceback and not result.ok:
            lines.append(f"--- rank {result.rank} traceback ---\n{result.traceback}")
    return "\n".join(lines)


def run_distributed(
    fn: Callable,
    world_size: int,
    args: tuple = (),
    *,
    timeout: float = 60.0,
    env: Optional[dict] = None,
    init_process_group: bool = True,
    pg_timeout: float = 30.0,
    raise_errors: bool = True,
    grace_after_failure: float = 15.0,
) -> list[RankResult]:
    """Call fn(rank, world_size, *args) on world_size spawned processes; return their results by rank.

    fn must be defined at module level. With init_process_group=True a gloo group is up before fn
    runs (collective timeout pg_timeout) and destroyed after; with False the function starts it itself
    (e.g. through mymoe.parallel.init_distributed, which reads the torchrun-style variables set here).
    `timeout` bounds the whole run, start-up included; once a rank fails, the others get
    `grace_after_failure` seconds to finish before they are killed. `env` adds environment variables.
    """
    for attempt in range(2):  # another test may grab the free port between our check and rank 0's bind
        with tempfile.TemporaryDirectory(prefix="dist_test_") as workdir:
            results = _run_once(
                fn,
                world_size,
                args,
                dict(env or {}),
                timeout,
                init_process_group,
                pg_timeout,
                grace_after_failure,
                workdir,
            )
        port_clash = any(any(s in (r.error or "").lower() for s in PORT_IN_USE) for r in results)
        if not (port_clash and attempt == 0):
            break
    if raise_errors and not all(r.ok for r in results):
        raise DistributedTestError(_report(results, timeout))
    return results
