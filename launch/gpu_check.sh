#!/usr/bin/env bash
# One-GPU acceptance check: msmoe-bench gpu-check (msmoe_dist/bench/gpu_check.py holds the checks).
#
#   launch/gpu_check.sh                      # every check; writes gpu_check.json and prints a table
#   launch/gpu_check.sh --dry-run            # list the checks and their commands; runs nothing
#   launch/gpu_check.sh --only a,d --out results/gpu_check.json --peak-tflops 989
#
# Checks: (a) grouped experts == per-expert loop (fp32, bf16); (b) MoE layer vs its floor, bf16, 16k
# tokens; (c) WikiText-103 medium step per output layer: tokens/s, MFU, peak memory; (d) DeepSpeed
# NCCL ZeRO-2 bf16 and fp16: checkpoint at 10, resume reproduces 11-20, fp16 overflow step skipped;
# (e) native engine bf16; (f) V-MoE ViT-S/32 images/s; with >= 2 GPUs (d) and (b) at EP 2 under torchrun
# ((b) at EP 2: blocking all-to-all vs moe.overlap_chunks=2).
# Each check runs in its own process with a time limit; the one-GPU checks all within --budget-s
# (450 s); the EP-2 check has its own limit on top.
# Exit status: 0 all passed, 1 a check failed, 2 no CUDA device (one line says so).
# Environment: PYTHON (default: the repository's .venv, else python3).
set -euo pipefail
SCRIPT_NAME=launch/gpu_check.sh
source "$(dirname "$0")/common.sh"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" -m msmoe_dist.cli bench gpu-check "$@"
