#!/usr/bin/env bash
# Launch msmoe-train with the deepspeed launcher (it starts ranks on the hosts of a hostfile over ssh).
#
#   one node:    NUM_GPUS=4 launch/deepspeed.sh --config configs/quickstart.yaml parallel.ep_size=4
#   hostfile:    HOSTFILE=hosts.txt INCLUDE="node0:0,1@node1:0,1" launch/deepspeed.sh --config ...
#
# Environment: HOSTFILE (lines "hostname slots=N"; optional on one node), NUM_GPUS (per node),
# NUM_NODES, INCLUDE / EXCLUDE (deepspeed's host:slot selections, e.g. "node0:0,1@node1"),
# MASTER_ADDR, MASTER_PORT (default 29500), PYTHON, DRY_RUN=1. See launch/ENVIRONMENT.md.
set -euo pipefail
SCRIPT_NAME=launch/deepspeed.sh
source "$(dirname "$0")/common.sh"
cmd=("$PYTHON" -m deepspeed.launcher.runner --master_port "${MASTER_PORT:-29500}")
if [[ -n "${HOSTFILE:-}" ]]; then
    [[ -f "$HOSTFILE" ]] || die "HOSTFILE=$HOSTFILE does not exist (expected a file of lines 'hostname slots=N')"
    grep -Evq '^\s*(#.*)?$|^\s*\S+\s+slots=[0-9]+\s*$' "$HOSTFILE" \
        && die "HOSTFILE=$HOSTFILE has a line that is not 'hostname slots=N'"
    cmd+=(--hostfile "$HOSTFILE")
fi
[[ -z "${INCLUDE:-}" || -z "${EXCLUDE:-}" ]] || die "INCLUDE and EXCLUDE are both set (deepspeed accepts one of them)"
[[ -n "${INCLUDE:-}" && -n "${NUM_GPUS:-}" ]] && die "INCLUDE and NUM_GPUS are both set (INCLUDE already picks the slots)"
[[ -n "${INCLUDE:-}" ]] && cmd+=(--include "$INCLUDE")
[[ -n "${EXCLUDE:-}" ]] && cmd+=(--exclude "$EXCLUDE")
if [[ -n "${NUM_GPUS:-}" ]]; then positive_int NUM_GPUS; cmd+=(--num_gpus "$NUM_GPUS"); fi
if [[ -n "${NUM_NODES:-}" ]]; then positive_int NUM_NODES; cmd+=(--num_nodes "$NUM_NODES"); fi
[[ -n "${MASTER_ADDR:-}" ]] && cmd+=(--master_addr "$MASTER_ADDR")
[[ -n "${HOSTFILE:-}${INCLUDE:-}${NUM_GPUS:-}" ]] || die "none of HOSTFILE, INCLUDE or NUM_GPUS is set (expected e.g. NUM_GPUS=4)"
[[ $# -gt 0 ]] || die "no training arguments (expected e.g. --config configs/quickstart.yaml parallel.ep_size=2)"
run_or_print "${cmd[@]}" --module msmoe_dist.cli train "$@"
