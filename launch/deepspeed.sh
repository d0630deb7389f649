#!/usr/bin/env bash
# The DeepSpeed launcher; HOSTFILE lists "host slots=N" lines (omit it for one machine).
#   NPROC=2 bash launch/deepspeed.sh --config configs/tiny.yaml --deepspeed configs/ds_zero1.json
set -euo pipefail
NPROC="${NPROC:-2}"
PYTHON="${PYTHON:-python3}"
args=(--num_gpus="$NPROC")
if [ -n "${HOSTFILE:-}" ]; then args=(--hostfile="$HOSTFILE"); fi
cmd=("$PYTHON" -m deepspeed.launcher.runner "${args[@]}" --master_port="${MASTER_PORT:-29500}"
     --module mymoe.train "$@")
echo "[launch] ${cmd[*]}"
exec "${cmd[@]}"
