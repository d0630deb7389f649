#!/usr/bin/env bash
# The DeepSpeed launcher: one process per slot of each host in HOSTFILE ("host slots=N" lines; several
# hosts need passwordless ssh and pdsh), or NPROC local processes without a hostfile.
#   HOSTFILE=hosts bash launch/deepspeed.sh --config configs/tiny.yaml --deepspeed configs/ds_zero1.json \
#       --parallel.expert_parallel_size=2
# A hostfile that names only this machine (localhost) needs no ssh. DRY_RUN=1 prints the command only.
set -euo pipefail
NPROC="${NPROC:-2}"
PYTHON="${PYTHON:-python3}"
args=(--master_port="${MASTER_PORT:-29500}")
if [ -n "${HOSTFILE:-}" ]; then
    args+=(--hostfile="$HOSTFILE")
    hosts=$(grep -v '^\s*#' "$HOSTFILE" | awk 'NF {print $1}' | sort -u)
    if [ "$hosts" = "localhost" ] || [ "$hosts" = "127.0.0.1" ]; then
        # deepspeed would ssh into the only host to check it and to find its address
        args+=(--no_ssh_check --master_addr=127.0.0.1)
    elif [ -n "${MASTER_ADDR:-}" ]; then
        args+=(--master_addr="$MASTER_ADDR")
    fi
else
    # without a hostfile deepspeed counts accelerators; on a CPU-only machine it would find none
    args+=(--num_gpus="$NPROC")
fi
cmd=("$PYTHON" -m deepspeed.launcher.runner "${args[@]}" --module mymoe.train "$@")
echo "[launch] ${cmd[*]}"
if [ -n "${DRY_RUN:-}" ]; then exit 0; fi
exec "${cmd[@]}"
