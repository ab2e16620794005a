"""`msmoe-bench layer` end to end at tiny shapes: one process (the CLI starts DeepSpeed's world of one) and
two torchrun ranks (expert parallel, groups handed in by the CLI). Figures are printed, never asserted."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow

TINY = [
    "--tokens",
    "64",
    "--d-model",
    "16",
    "--ffn",
    "32",
    "--experts",
    "4",
    "--top-k",
    "2",
    "--repeats",
    "2",
    "--warmup",
    "1",
    "--json",
]


def _one_json_line(res: subprocess.CompletedProcess) -> dict:
    assert res.returncode == 0, res.stderr[-2000:]
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 1, res.stdout[-2000:]  # library chatter goes to stderr; other ranks print nothing
    return json.loads(lines[0])


def test_layer_bench_one_process_with_deepspeed(cli):
    r = _one_json_line(cli("bench", "layer", *TINY, timeout=300))
    assert r["world_size"] == 1 and r["shapes"]["rows_per_expert"] == 32
    assert r["floor_ms"] == min(r["floor_bmm_ms"], r["floor_loop_ms"]) and "experts_only_ms" in r
    assert r["deepspeed_settings"]["ep_size"] == 1 and r["deepspeed_settings"]["capacity_rows_per_expert"] == 40


def test_layer_bench_expert_parallel_under_torchrun():
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "msmoe_dist.cli",
            "bench",
            "layer",
            *TINY,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    r = _one_json_line(res)
    assert r["world_size"] == r["ep_size"] == 2 and r["machine"]["backend"] == "gloo"
    assert r["shapes"]["local_experts"] == 2 and r["shapes"]["floor_rows_per_local_expert"] == 64
    cases = {"ours", "floor_bmm", "floor_loop", "experts_only", "deepspeed", "ours_overlap"}
    assert set(r["per_rank_median_ms"]) == cases | ({"fairscale"} if "fairscale_ms" in r else set())
    # blocking vs overlapped (moe.overlap_chunks=2) in one run, and each one's time blocked in its collectives
    assert r["overlap_chunks"] == 2 and r["ours_overlap_ms"] > 0
    blocked = r["comm_blocked_ms_per_step_rank0"]
    assert "all_to_all (MoE token exchange, forward)" in blocked["ours"]
    assert "all_to_all (MoE token exchange, overlapped chunk, forward)" in blocked["ours_overlap"]
    assert all(len(v) == 2 for v in r["per_rank_median_ms"].values())
    # the figure is the max over ranks per round, so its median is at least every rank's own median
    assert r["ours_ms"] >= max(r["per_rank_median_ms"]["ours"]) - 1e-3
    assert r["deepspeed_settings"]["ep_size"] == 2 and r["deepspeed_settings"]["capacity_rows_per_expert_slot"] == 40
