"""The scaling sweep runner on a tiny grid: separate torchrun launches, their JSON, and the PNG curves."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def test_tiny_sweep_writes_json_and_png(tmp_path):
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "msmoe_dist.cli",
            "bench",
            "sweep",
            "--ep",
            "1,2",
            "--experts",
            "4",
            "--tokens",
            "128",
            "--momentum",
            "heavy_ball",
            "--seq",
            "64",
            "--repeats",
            "2",
            "--out",
            str(tmp_path),
            "--json",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["points"] == 2 and summary["failures"] == []
    rows = [json.loads(x) for x in (tmp_path / "sweep.jsonl").read_text().splitlines()]
    assert sorted(r["world_size"] for r in rows) == [1, 2]
    for r in rows:
        assert r["tokens_per_s"] > 0 and 0 <= r["all_to_all_share"] <= 1 and r["momentum"] == "heavy_ball"
    assert next(r for r in rows if r["world_size"] == 1)["all_to_all_ms"] == 0  # one rank: no all-to-all
    for png in ("throughput.png", "all_to_all_share.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_grid_is_a_usage_error(tmp_path):
    res = subprocess.run(
        [sys.executable, "-m", "msmoe_dist.cli", "bench", "sweep", "--ep", "1,two", "--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 2 and "expected comma-separated integers" in res.stderr
