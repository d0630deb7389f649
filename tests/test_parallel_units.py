"""Expert-parallel pieces that need no processes: the rank layout, launcher detection, backend choice,
and the errors collectives raise."""

import sys
import types
import typing

import pytest
import torch

from mymoe.config import Config, ConfigError, DispatcherName, validate
from mymoe.model.moe.dispatch import Dispatcher, LocalDispatcher
from mymoe.parallel.collectives import CollectiveError, named_collective
from mymoe.parallel.dispatch import chunk_rows
from mymoe.parallel.env import agree_master_over_mpi, detect_launch, expand_slurm_nodelist, slurm_port
from mymoe.parallel.groups import ParallelContext, expert_data_parallel_ranks, expert_parallel_ranks
from mymoe.parallel.parallelize import DISPATCHERS
from mymoe.parallel.startup import resolve_backend


# ---------------------------------------------------------------------------------------------------
# layout


@pytest.mark.parametrize(
    "world_size, expert_parallel_size, ep_groups, edp_groups",
    [
        (1, 1, [[0]], [[0]]),
        (4, 1, [[0], [1], [2], [3]], [[0, 1, 2, 3]]),
        (4, 2, [[0, 1], [2, 3]], [[0, 2], [1, 3]]),
        (4, 4, [[0, 1, 2, 3]], [[0], [1], [2], [3]]),
        (8, 2, [[0, 1], [2, 3], [4, 5], [6, 7]], [[0, 2, 4, 6], [1, 3, 5, 7]]),
    ],
)
def test_groups_layout(world_size, expert_parallel_size, ep_groups, edp_groups):
    assert expert_parallel_ranks(world_size, expert_parallel_size) == ep_groups
    assert expert_data_parallel_ranks(world_size, expert_parallel_size) == edp_groups
    # every rank is in exactly one group of each kind, and an ep group meets an edp group in one rank
    for groups in (ep_groups, edp_groups):
        assert sorted(rank for group in groups for rank in group) == list(range(world_size))
    assert all(len(set(ep) & set(edp)) == 1 for ep in ep_groups for edp in edp_groups)


def test_every_dispatcher_name_has_a_dispatcher_of_the_one_interface():
    assert set(DISPATCHERS) == set(typing.get_args(DispatcherName))
    assert isinstance(LocalDispatcher(4), Dispatcher)
    for dispatcher_class in DISPATCHERS.values():
        assert callable(dispatcher_class.dispatch) and callable(dispatcher_class.combine)


def test_local_experts_split_contiguously():
    held = [ParallelContext(expert_parallel_size=4, expert_parallel_rank=r).local_experts(16) for r in range(4)]
    assert held == [(0, 4), (4, 4), (8, 4), (12, 4)]


@pytest.mark.parametrize(
    "experts, ep, world_size, fragment",
    [
        (8, 3, 6, "parallel.expert_parallel_size=3 must divide model.moe.n_routed_experts=8 (try 1, 2, 4, 8)"),
        (8, 2, 3, "parallel.expert_parallel_size=2 must divide the world size"),
    ],
)
def test_bad_layout_is_a_config_error(experts, ep, world_size, fragment):
    config = Config()
    config.model.moe.n_routed_experts = experts
    config.parallel.expert_parallel_size = ep
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        validate(config, world_size)


# ---------------------------------------------------------------------------------------------------
# launcher detection


def test_detect_torchrun():
    env = {
        "RANK": "3",
        "WORLD_SIZE": "8",
        "LOCAL_RANK": "1",
        "MASTER_ADDR": "node0",
        "MASTER_PORT": "29500",
        "SLURM_PROCID": "0",
        "SLURM_STEP_NUM_TASKS": "2",
    }  # torchrun inside an allocation: torchrun wins
    launch = detect_launch(env)
    assert (launch.launcher, launch.rank, launch.world_size, launch.local_rank) == ("torchrun", 3, 8, 1)
    assert (launch.master_addr, launch.master_port) == ("node0", 29500)


def test_detect_openmpi_leaves_the_address_to_agree():
    env = {"OMPI_COMM_WORLD_RANK": "5", "OMPI_COMM_WORLD_SIZE": "6", "OMPI_COMM_WORLD_LOCAL_RANK": "2"}
    launch = detect_launch(env)
    assert (launch.launcher, launch.rank, launch.world_size, launch.local_rank) == ("openmpi", 5, 6, 2)
    assert (launch.master_addr, launch.master_port) == (None, None)  # rank 0 broadcasts them over MPI


def test_detect_mpich_and_intel_mpi():
    mpich = detect_launch({"PMI_RANK": "1", "PMI_SIZE": "4", "PMI_LOCAL_RANK": "1"})
    intel = detect_launch(
        {"PMI_RANK": "2", "PMI_SIZE": "4", "MPI_LOCALRANKID": "0", "MASTER_ADDR": "h", "MASTER_PORT": "1234"}
    )
    assert (mpich.launcher, mpich.rank, mpich.world_size, mpich.local_rank) == ("mpich", 1, 4, 1)
    assert (intel.rank, intel.local_rank, intel.master_addr, intel.master_port) == (2, 0, "h", 1234)


def test_detect_slurm_srun(monkeypatch):
    monkeypatch.setattr("shutil.which", lambda name: None)  # no scontrol here: the plain parser reads the list
    env = {
        "SLURM_PROCID": "7",
        "SLURM_STEP_NUM_TASKS": "8",
        "SLURM_LOCALID": "3",
        "SLURM_JOB_ID": "123456",
        "SLURM_STEP_NODELIST": "gpu[07-08],cpu1",
    }
    launch = detect_launch(env)
    assert (launch.launcher, launch.rank, launch.world_size, launch.local_rank) == ("slurm", 7, 8, 3)
    assert launch.master_addr == "gpu07"
    assert launch.master_port == slurm_port("123456") == 15000 + 123456 % 20000


def test_slurm_batch_script_is_a_single_process():
    # python run straight from sbatch sees SLURM_PROCID and SLURM_NTASKS, but no step of its own
    launch = detect_launch({"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_JOB_ID": "9"})
    assert (launch.launcher, launch.rank, launch.world_size) == ("single", 0, 1)


def test_detect_nothing_is_single_process():
    launch = detect_launch({})
    assert (launch.launcher, launch.rank, launch.world_size, launch.local_rank) == ("single", 0, 1, 0)


def test_bad_launcher_variable_names_itself():
    with pytest.raises(ValueError, match="RANK='zero' must be an integer"):
        detect_launch({"RANK": "zero", "WORLD_SIZE": "2"})


@pytest.mark.parametrize(
    "nodelist, hosts",
    [
        ("node1", ["node1"]),
        ("node[01-03,7],gpu5", ["node01", "node02", "node03", "node7", "gpu5"]),
        ("rack[1-2]-n[1-2]", ["rack1-n1", "rack1-n2", "rack2-n1", "rack2-n2"]),
    ],
)
def test_expand_slurm_nodelist(nodelist, hosts):
    assert expand_slurm_nodelist(nodelist) == hosts


# ---------------------------------------------------------------------------------------------------
# backend and errors


def test_backend_choice():
    assert resolve_backend("gloo") == "gloo"
    assert resolve_backend("auto") == ("nccl" if torch.cuda.is_available() else "gloo")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="parallel.backend='nccl' needs CUDA"):
            resolve_backend("nccl")


def test_named_collective_says_what_timed_out():
    with pytest.raises(CollectiveError, match=r"all_to_all_single \(MoE dispatch, layer 3\) timed out after 5 s"):
        with named_collective("all_to_all_single (MoE dispatch, layer 3)", 5):
            raise RuntimeError("[../gloo/transport/tcp/pair.cc:534] Timed out waiting 5000ms for recv operation")
    with pytest.raises(CollectiveError, match=r"all_reduce \(x\) failed: a rank probably died"):
        with named_collective("all_reduce (x)", 5):
            raise RuntimeError("Connection closed by peer [127.0.0.1]:1234")


class FakeComm:
    """The two calls agree_master_over_mpi makes on MPI.COMM_WORLD, as rank `rank` of `size` sees them."""

    def __init__(self, rank: int, size: int, from_rank0=None):
        self.rank, self.size, self.from_rank0 = rank, size, from_rank0

    def Get_rank(self):
        return self.rank

    def Get_size(self):
        return self.size

    def bcast(self, value, root):
        assert root == 0
        return value if self.rank == 0 else self.from_rank0


def fake_mpi4py(monkeypatch, comm):
    module = types.ModuleType("mpi4py")
    module.MPI = types.SimpleNamespace(COMM_WORLD=comm)
    monkeypatch.setitem(sys.modules, "mpi4py", module)


def test_mpirun_rank0_picks_and_broadcasts_the_rendezvous(monkeypatch):
    fake_mpi4py(monkeypatch, FakeComm(0, 2))
    chosen = agree_master_over_mpi(detect_launch({"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2"}))
    assert chosen.master_addr and 0 < chosen.master_port < 65536

    fake_mpi4py(monkeypatch, FakeComm(1, 2, from_rank0=(chosen.master_addr, chosen.master_port)))
    heard = agree_master_over_mpi(detect_launch({"PMI_RANK": "1", "PMI_SIZE": "2"}))
    assert (heard.launcher, heard.rank, heard.master_addr, heard.master_port) == (
        "mpich",
        1,
        chosen.master_addr,
        chosen.master_port,
    )


def test_mpirun_without_mpi4py_says_how_to_fix_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # import fails as if it were not installed
    with pytest.raises(RuntimeError, match="install mpi4py .* or export both variables"):
        agree_master_over_mpi(detect_launch({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2"}))


def test_mpirun_with_exported_address_needs_no_mpi(monkeypatch):
    monkeypatch.setitem(sys.modules, "mpi4py", None)
    launch = detect_launch({"PMI_RANK": "0", "PMI_SIZE": "2", "MASTER_ADDR": "h0", "MASTER_PORT": "29500"})
    assert agree_master_over_mpi(launch) is launch


def test_chunk_rows_cuts_every_ranks_block_into_consecutive_parts():
    from_rank = chunk_rows([5, 0, 3], 2, torch.device("cpu"))  # blocks [0, 5), [5, 5), [5, 8)
    assert [splits for splits, _ in from_rank] == [[2, 0, 1], [3, 0, 2]]
    assert [positions.tolist() for _, positions in from_rank] == [[0, 1, 5], [2, 3, 4, 6, 7]]
    assert chunk_rows([5, 0, 3], 1, torch.device("cpu")) == [([5, 0, 3], None)]  # one chunk: rows in place
