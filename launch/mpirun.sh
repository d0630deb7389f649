#!/usr/bin/env bash
# Open MPI or MPICH: NP=2 bash launch/mpirun.sh --config configs/tiny.yaml --parallel.expert_parallel_size=2
# MyMoE reads OMPI_COMM_WORLD_* / PMI_* and agrees on a master address and port through mpi4py.
# Add a hostfile for several machines: MPIRUN_ARGS="--hostfile hosts" bash launch/mpirun.sh ...
# (Open MPI refuses to run as root unless OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1.)
# DRY_RUN=1 prints the command only.
set -euo pipefail
NP="${NP:-2}"
PYTHON="${PYTHON:-python3}"
MPIEXEC="${MPIEXEC:-mpiexec}"
# shellcheck disable=SC2206
extra=(${MPIRUN_ARGS:-})
cmd=("$MPIEXEC" -n "$NP" "${extra[@]}" "$PYTHON" -m mymoe.train "$@")
echo "[launch] ${cmd[*]}"
if [ -n "${DRY_RUN:-}" ]; then exit 0; fi
exec "${cmd[@]}"
