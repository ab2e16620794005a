#!/usr/bin/env bash
# Launch msmoe-train with torchrun, on one node or as one node of many.
#
#   one node:    NPROC=4 launch/torchrun.sh --config configs/quickstart.yaml parallel.ep_size=4
#   many nodes:  run on every node, with the same RDZV_ENDPOINT (host:port of any one node):
#                NNODES=2 NODE_RANK=0 RDZV_ENDPOINT=node0:29500 NPROC=8 launch/torchrun.sh --config ...
#
# Environment: NPROC (processes per node; required), NNODES (default 1), NODE_RANK (0..NNODES-1;
# required when NNODES > 1), RDZV_ENDPOINT (host:port of the c10d rendezvous; required when
# NNODES > 1), RDZV_ID (job id shared by all nodes; default msmoe), MAX_RESTARTS (elastic restarts,
# default 0; combine with train.auto_resume=true), PYTHON, DRY_RUN=1 (print the command only).
# NCCL/gloo settings you may need on a cluster: launch/ENVIRONMENT.md.
set -euo pipefail
SCRIPT_NAME=launch/torchrun.sh
source "$(dirname "$0")/common.sh"
need NPROC "the number of processes per node, e.g. NPROC=4"
positive_int NPROC
NNODES=${NNODES:-1}
positive_int NNODES
MAX_RESTARTS=${MAX_RESTARTS:-0}
[[ "$MAX_RESTARTS" =~ ^[0-9]+$ ]] || die "MAX_RESTARTS=$MAX_RESTARTS is not a non-negative integer"
cmd=("$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --nproc_per_node "$NPROC" --max-restarts "$MAX_RESTARTS")
if [[ "$NNODES" == 1 ]]; then
    cmd+=(--standalone)
else
    need NODE_RANK "this node's index, 0..$((NNODES - 1))"
    [[ "$NODE_RANK" =~ ^[0-9]+$ && "$NODE_RANK" -lt "$NNODES" ]] || die "NODE_RANK=$NODE_RANK is not in 0..$((NNODES - 1))"
    need RDZV_ENDPOINT "host:port of the rendezvous, the same on every node, e.g. node0:29500"
    [[ "$RDZV_ENDPOINT" =~ ^[^:]+:[0-9]+$ ]] || die "RDZV_ENDPOINT=$RDZV_ENDPOINT is not host:port"
    cmd+=(--node_rank "$NODE_RANK" --rdzv-backend c10d --rdzv-endpoint "$RDZV_ENDPOINT" --rdzv-id "${RDZV_ID:-msmoe}")
fi
[[ $# -gt 0 ]] || die "no training arguments (expected e.g. --config configs/quickstart.yaml parallel.ep_size=2)"
run_or_print "${cmd[@]}" -m msmoe_dist.cli train "$@"
