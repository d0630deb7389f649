#!/usr/bin/env bash
# Several machines, each running this script with the same RDZV_ENDPOINT (host:port of any one of them).
#   node A: NNODES=2 NPROC=8 RDZV_ENDPOINT=nodeA:29400 bash launch/torchrun_multinode.sh --config ...
#   node B: the same command.
# The c10d rendezvous (served by the agent on the endpoint's host) assigns node ranks, so no NODE_RANK is
# needed; RDZV_ID must be unique per job. DRY_RUN=1 prints the command only.
set -euo pipefail
NNODES="${NNODES:?set NNODES (number of machines)}"
NPROC="${NPROC:-1}"
RDZV_ENDPOINT="${RDZV_ENDPOINT:?set RDZV_ENDPOINT=host:port reachable from every node}"
RDZV_ID="${RDZV_ID:-mymoe}"
PYTHON="${PYTHON:-python3}"
cmd=("$PYTHON" -m torch.distributed.run --nnodes="$NNODES" --nproc_per_node="$NPROC"
     --rdzv_backend=c10d --rdzv_endpoint="$RDZV_ENDPOINT" --rdzv_id="$RDZV_ID"
     --max-restarts="${MAX_RESTARTS:-0}" -m mymoe.train "$@")
echo "[launch] ${cmd[*]}"
if [ -n "${DRY_RUN:-}" ]; then exit 0; fi
exec "${cmd[@]}"
