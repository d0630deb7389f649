"""Who am I and where is rank 0: read from the environment each launcher sets.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT. mpirun sets only ranks (Open MPI:
OMPI_COMM_WORLD_*, MPICH and Intel MPI: PMI_*), so rank 0 picks a free port and broadcasts its address
over MPI. srun sets SLURM_PROCID, SLURM_STEP_NUM_TASKS and SLURM_LOCALID; rank 0 is the first host of the
step's node list and the port is derived from the job id, so every task computes the same pair without
talking. A process with none of these is a single process (world size 1).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
from dataclasses import dataclass
from typing import Mapping, Optional


@dataclass
class LaunchInfo:
    launcher: str  # "torchrun", "openmpi", "mpich", "slurm" or "single"
    rank: int
    world_size: int
    local_rank: int
    master_addr: Optional[str] = None  # None: still to be agreed (mpirun without MASTER_ADDR)
    master_port: Optional[int] = None


def _int(environ: Mapping[str, str], name: str) -> int:
    value = environ[name]
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} must be an integer (set by the launcher)") from None


def _first_int(environ: Mapping[str, str], names: tuple, default: int) -> int:
    for name in names:
        if name in environ:
            return _int(environ, name)
    return default


def _master_from_env(environ: Mapping[str, str]):
    port = _int(environ, "MASTER_PORT") if "MASTER_PORT" in environ else None
    return environ.get("MASTER_ADDR"), port


def detect_launch(environ: Optional[Mapping[str, str]] = None) -> LaunchInfo:
    """Rank, world size, local rank and (where the launcher gives it) the rendezvous address.

    torchrun wins when several launchers' variables are present (torchrun inside an srun allocation).
    """
    environ = os.environ if environ is None else environ
    addr, port = _master_from_env(environ)
    if "RANK" in environ and "WORLD_SIZE" in environ:
        local_rank = _first_int(environ, ("LOCAL_RANK",), 0)
        return LaunchInfo("torchrun", _int(environ, "RANK"), _int(environ, "WORLD_SIZE"), local_rank, addr, port)
    if "OMPI_COMM_WORLD_RANK" in environ:
        local_rank = _first_int(environ, ("OMPI_COMM_WORLD_LOCAL_RANK",), 0)
        return LaunchInfo(
            "openmpi",
            _int(environ, "OMPI_COMM_WORLD_RANK"),
            _int(environ, "OMPI_COMM_WORLD_SIZE"),
            local_rank,
            addr,
            port,
        )
    if "PMI_RANK" in environ:
        local_rank = _first_int(environ, ("MPI_LOCALRANKID", "PMI_LOCAL_RANK"), 0)
        return LaunchInfo("mpich", _int(environ, "PMI_RANK"), _int(environ, "PMI_SIZE"), local_rank, addr, port)
    # srun sets SLURM_STEP_NUM_TASKS; a batch script that runs python itself also sees SLURM_PROCID and the
    # allocation's SLURM_NTASKS, but it is one process and must not wait for the others
    if "SLURM_PROCID" in environ and "SLURM_STEP_NUM_TASKS" in environ:
        world_size = _int(environ, "SLURM_STEP_NUM_TASKS")
        if addr is None:
            nodelist = (
                environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
            )
            addr = first_slurm_host(nodelist) if nodelist else "127.0.0.1"
        if port is None:
            port = slurm_port(environ.get("SLURM_JOB_ID", environ.get("SLURM_JOBID", "0")))
        return LaunchInfo(
            "slurm", _int(environ, "SLURM_PROCID"), world_size, _first_int(environ, ("SLURM_LOCALID",), 0), addr, port
        )
    return LaunchInfo("single", 0, 1, 0, addr, port)


def slurm_port(job_id: str) -> int:
    """A port every task of a job derives alike; jobs sharing a node get different ones."""
    digits = re.sub(r"\D", "", str(job_id)) or "0"
    return 15000 + int(digits[-6:]) % 20000


def expand_slurm_nodelist(nodelist: str) -> list[str]:
    """'node[01-03,7],gpu5' -> ['node01', 'node02', 'node03', 'node7', 'gpu5'] (zero padding kept)."""
    hosts = []
    for item in _split_top_level(nodelist):
        hosts.extend(_expand_host(item))
    return hosts


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are outside brackets."""
    items, depth, current = [], 0, ""
    for char in text:
        depth += (char == "[") - (char == "]")
        if char == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += char
    items.append(current)
    return [item.strip() for item in items if item.strip()]


def _expand_host(pattern: str) -> list[str]:
    match = re.search(r"\[([^\]]*)\]", pattern)
    if match is None:
        return [pattern]
    head, tail = pattern[: match.start()], pattern[match.end() :]
    names = []
    for part in match.group(1).split(","):
        if "-" in part:
            low, high = part.split("-", 1)
            names.extend(str(i).zfill(len(low)) for i in range(int(low), int(high) + 1))
        else:
            names.append(part)
    return [head + name + rest for name in names for rest in _expand_host(tail)]


def first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM node list, through `scontrol show hostnames` when it exists."""
    if shutil.which("scontrol"):
        try:
            result = subprocess.run(
                ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30, check=True
            )
            hosts = result.stdout.split()
            if hosts:
                return hosts[0]
        except (subprocess.SubprocessError, OSError):
            pass  # the plain parser below reads the usual forms
    return expand_slurm_nodelist(nodelist)[0]


def free_port(host: str = "") -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def agree_master_over_mpi(launch: LaunchInfo) -> LaunchInfo:
    """mpirun gives no rendezvous address: rank 0 picks its host and a free port and broadcasts them."""
    if launch.master_addr is not None and launch.master_port is not None:
        return launch
    try:
        from mpi4py import MPI
    except ImportError:
        raise RuntimeError(
            f"launched by {launch.launcher} (rank {launch.rank} of {launch.world_size}) without MASTER_ADDR and "
            f"MASTER_PORT: install mpi4py (pip install mpi4py) so rank 0 can share its address, or export both "
            f"variables to every rank (mpirun -x MASTER_ADDR=host0 -x MASTER_PORT=29500 ...)"
        ) from None
    comm = MPI.COMM_WORLD
    if comm.Get_size() != launch.world_size:
        raise RuntimeError(f"MPI reports {comm.Get_size()} ranks but the environment says {launch.world_size}")
    chosen = None
    if comm.Get_rank() == 0:
        chosen = (launch.master_addr or socket.getfqdn(), launch.master_port or free_port())
    addr, port = comm.bcast(chosen, root=0)
    return LaunchInfo(launch.launcher, launch.rank, launch.world_size, launch.local_rank, addr, port)
