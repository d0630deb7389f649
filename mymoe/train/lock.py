"""One job per out_dir: `<out_dir>/train.lock` names the job that holds it (pid, host, start time, launcher
job id), so a second job started on the same folder refuses at once, before it reads a checkpoint or
writes a line, instead of deleting the first one's saves and interleaving its metrics.

A lock is stale, and taken over with a note, when its pid is gone on this host, when it is this very
process's (an earlier run in the same interpreter), or when it carries this launcher job's id (torchrun
restarting its workers after a failure, a SLURM requeue). A lock from another host that is still alive
cannot be checked from here: the message says which file to delete if that job is gone.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from pathlib import Path

import torch.distributed as dist

from mymoe.parallel.collectives import named_collective
from mymoe.train.errors import TrainingError

LOCK_NAME = "train.lock"


def job_id() -> str:
    """The launcher's id of this job, the same for every restart of its workers ("" when there is none)."""
    for name in ("TORCHELASTIC_RUN_ID", "SLURM_JOB_ID"):
        if os.environ.get(name):
            return f"{name}={os.environ[name]}"
    return ""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def stale_reason(holder: dict) -> str:
    """Why the job recorded in a lock no longer holds it, or "" when it may still be running."""
    same_host = holder.get("host") == socket.gethostname()
    if same_host and holder.get("pid") == os.getpid():
        return "left by this process"
    if holder.get("job") and holder.get("job") == job_id():
        return f"left by an earlier attempt of this job ({holder['job']})"
    if same_host and not _pid_alive(int(holder.get("pid", -1))):
        return f"its process {holder.get('pid')} is gone"
    return ""


def describe(holder: dict) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(holder.get("started", 0)))
    job = f", {holder['job']}" if holder.get("job") else ""
    return f"pid {holder.get('pid')} on {holder.get('host')}, started {started}{job}"


def try_lock(out_dir: Path) -> tuple[bool, str]:
    """(True, note) once this process holds out_dir's lock, else (False, why not): rank 0's part."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / LOCK_NAME
    record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "job": job_id()})
    note = ""
    for _ in range(2):
        try:
            descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = json.loads(path.read_text() or "{}")
            except (OSError, ValueError):
                holder = {}  # half-written by a job that died at once
            reason = stale_reason(holder) if holder else "it is unreadable"
            if not reason:
                return False, (
                    f"train.out_dir={out_dir} is in use by another job ({describe(holder)}): wait for it "
                    f"to end, or pass another --train.out_dir (if that job is gone, delete {path})"
                )
            note = f"taking over the stale lock {path} ({reason})"
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            continue
        with os.fdopen(descriptor, "w") as f:
            f.write(record)
        return True, note
    return False, f"train.out_dir={out_dir}: another job took {path} at the same moment; pass another --train.out_dir"


@contextlib.contextmanager
def out_dir_lock(out_dir: str, ctx):
    """Hold out_dir's lock for the block (collective: rank 0 locks, every rank hears the verdict)."""
    path = Path(out_dir)
    verdict = try_lock(path) if ctx.rank == 0 else None
    if ctx.is_distributed:
        box = [verdict]
        with named_collective("broadcast_object_list (out_dir lock)", ctx.timeout_seconds):
            dist.broadcast_object_list(box, src=0)
        verdict = box[0]
    locked, message = verdict
    if not locked:
        raise TrainingError(message)
    if message and ctx.rank == 0:
        print(f"lock: {message}", flush=True)
    try:
        yield
    finally:
        if ctx.rank == 0:
            release(path / LOCK_NAME)


def release(path: Path) -> None:
    """Remove the lock if this process still holds it."""
    with contextlib.suppress(OSError, ValueError):
        if json.loads(path.read_text()).get("pid") == os.getpid():
            path.unlink()
