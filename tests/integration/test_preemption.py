"""Preemption: SIGUSR1 (SLURM's --signal) mid-run finishes the step, writes a sealed checkpoint, exits
with code 5, and train.resume=true then reproduces the uninterrupted loss trace bit for bit."""

import json
import signal
import subprocess
import sys
import time

import pytest

from msmoe_dist.checkpoint.manager import is_complete
from msmoe_dist.cli import EXIT_PREEMPTED

pytestmark = pytest.mark.slow

STEPS = 40


def args(tmp_path, run, *extra, progress=False, log_every=1):
    return [
        "--config",
        "configs/quickstart.yaml",
        f"train.progress={str(progress).lower()}",
        f"logging.log_every={log_every}",
        "data.synthetic_lines=1500",
        "model.num_layers=2",
        f"train.max_steps={STEPS}",
        f"train.run_dir={tmp_path / run}",
        f"data.path={tmp_path / 'data'}",
        *extra,
    ]


def losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def test_signal_writes_checkpoint_exits_5_and_resume_is_exact(tmp_path, cli):
    ref = cli("train", *args(tmp_path, "ref", progress=True))
    assert ref.returncode == 0, ref.stderr[-2000:]
    # logs: the start-up banner, and (stderr is a pipe, not a terminal) progress as plain lines
    assert "msmoe-train: engine native, world size 1" in ref.stderr and "active per token" in ref.stderr
    assert f"train: step 10/{STEPS}" in ref.stderr and "\r" not in ref.stderr

    from conftest import REPO

    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "msmoe_dist.cli", "train", *args(tmp_path, "run")],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        metrics = run_dir / "metrics.jsonl"
        while proc.poll() is None and (not metrics.is_file() or len(metrics.read_text().splitlines()) < 3):
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be signalled"
        proc.send_signal(signal.SIGUSR1)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == EXIT_PREEMPTED, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("msmoe-train: preempted") and "train.resume=true" in last, err[-2000:]
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    step = int(latest.split("_")[1])
    assert 3 <= step < STEPS
    assert is_complete(run_dir / "checkpoints" / latest)  # sealed
    assert losses(run_dir)[-1][0] == step  # the checkpoint is at the last finished step

    resumed = cli("train", *args(tmp_path, "run", "train.resume=true"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming from step {step} ({run_dir / 'checkpoints' / latest})" in resumed.stderr
    assert losses(run_dir) == losses(tmp_path / "ref")  # bit for bit (floats from JSON, exact equality)

    # the run record: every row has its wall-clock time; training rows the peak memory; one run_info entry per start
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(isinstance(r["time"], float) for r in rows)
    assert all(r["peak_rss_gib"] > 0 for r in rows if "loss" in r)
    info = json.loads((run_dir / "run_info.json").read_text())
    assert [i["resume_step"] for i in info] == [None, step]
    import torch

    assert info[0]["torch"] == torch.__version__ and "deepspeed" in info[0] and "git_commit" in info[0]
