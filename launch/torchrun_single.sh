#!/usr/bin/env bash
# One machine, NPROC processes (one per GPU, or CPU processes with gloo).
#   NPROC=2 bash launch/torchrun_single.sh --config configs/tiny.yaml --parallel.expert_parallel_size=2
# DRY_RUN=1 prints the command only.
set -euo pipefail
NPROC="${NPROC:-2}"
PYTHON="${PYTHON:-python3}"
cmd=("$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$NPROC"
     --max-restarts="${MAX_RESTARTS:-0}" -m mymoe.train "$@")
echo "[launch] ${cmd[*]}"
if [ -n "${DRY_RUN:-}" ]; then exit 0; fi
exec "${cmd[@]}"
