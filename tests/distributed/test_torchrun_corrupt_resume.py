"""A corrupt checkpoint under torchrun: rank 0 checks every rank's files (here an expert file written
by rank 1), sets the checkpoint aside, and both ranks resume from the previous one together."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def torchrun(run_dir, data, *extra):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "msmoe_dist.cli",
        "train",
        "--config",
        "configs/quickstart.yaml",
        f"train.run_dir={run_dir}",
        f"data.path={data}",
        "data.synthetic_lines=1500",
        "model.num_layers=2",
        "parallel.ep_size=2",
        "parallel.zero_stage=1",
        "train.progress=false",
        "logging.log_every=1",
        "train.eval_batches=2",
        "checkpoint.every_steps=2",
        "parallel.timeout_s=180",
        *extra,
    ]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=400)


def test_two_ranks_fall_back_past_a_corrupt_expert_file(tmp_path):
    run_dir, data = tmp_path / "run", tmp_path / "data"
    first = torchrun(run_dir, data, "train.max_steps=4")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    bad = run_dir / "checkpoints" / "step_00000004" / "experts_ep001.pt"
    raw = bytearray(bad.read_bytes())
    raw[-200:-136] = bytes(b ^ 0x5A for b in raw[-200:-136])
    bad.write_bytes(bytes(raw))
    again = torchrun(run_dir, data, "train.max_steps=6", "train.resume=true")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "experts_ep001.pt" in again.stderr and "resuming from step_00000002" in again.stderr, again.stderr
    assert (run_dir / "checkpoints" / "step_00000004.corrupt" / "experts_ep001.pt").read_bytes() == bytes(raw)
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000006"
