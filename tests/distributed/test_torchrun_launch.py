"""msmoe-train under the real torchrun launcher: 2 ranks, expert parallel, DeepSpeed ZeRO-2, bf16.

Save at step N, stop, resume: the metrics.jsonl loss trace equals the uninterrupted run's to the
last bit. msmoe-eval reads the 2-rank checkpoint in one process.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def torchrun(tmp_path, run, *extra, timeout=400):
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
        f"train.run_dir={tmp_path / run}",
        f"data.path={tmp_path / 'data'}",
        "data.synthetic_lines=1500",
        "model.num_layers=2",
        "parallel.ep_size=2",
        "parallel.zero_stage=2",
        "train.dtype=bf16",
        "train.progress=false",
        "logging.log_every=1",
        "train.eval_batches=2",
        "optim.schedule=constant",
        "model.dropout=0.1",
        "checkpoint.every_steps=4",
        "parallel.timeout_s=180",
        *extra,
    ]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def trace(run_dir):
    return [
        (r["step"], r["loss"], r["grad_norm"])
        for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
        if "loss" in r
    ]


def test_zero2_bf16_two_ranks_resume_is_bit_exact(tmp_path):
    torchrun(tmp_path, "full", "train.max_steps=8")
    torchrun(tmp_path, "part", "train.max_steps=4")
    torchrun(tmp_path, "part", "train.max_steps=8", "train.resume=true")
    full, part = trace(tmp_path / "full"), trace(tmp_path / "part")
    assert [s for s, _, _ in full] == list(range(1, 9))
    assert part == full
    ckpt = tmp_path / "full" / "checkpoints" / "step_00000008"
    seal = json.loads((ckpt / "complete.json").read_text())
    assert (seal["world_size"], seal["ep_size"], seal["zero_stage"], seal["dtype"]) == (2, 2, 2, "bf16")
    assert (ckpt / "experts_ep000.pt").is_file() and (ckpt / "experts_ep001.pt").is_file()
    ev = subprocess.run(
        [
            sys.executable,
            "-m",
            "msmoe_dist.cli",
            "eval",
            "--checkpoint",
            str(tmp_path / "full"),
            "--batches",
            "2",
            "--device",
            "cpu",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ev.returncode == 0, ev.stderr[-2000:]
    assert json.loads(ev.stdout.strip().splitlines()[-1])["step"] == 8


def _small(tmp_path, run):
    return [
        "--config",
        "configs/quickstart.yaml",
        f"train.run_dir={tmp_path / run}",
        f"data.path={tmp_path / 'data'}",
        "data.synthetic_lines=1500",
        "model.num_layers=2",
        "train.max_steps=3",
        "train.progress=false",
        "train.eval_batches=2",
    ]


def test_deepspeed_launcher_and_plain_python(tmp_path, free_port):
    # the deepspeed launcher (it appends --local_rank=N, which the CLI accepts)
    ds = subprocess.run(
        [
            sys.executable,
            "-m",
            "deepspeed.launcher.runner",
            "--num_gpus",
            "2",
            "--master_port",
            str(free_port()),
            "--module",
            "msmoe_dist.cli",
            "train",
            *_small(tmp_path, "ds"),
            "parallel.ep_size=2",
            "parallel.zero_stage=1",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert ds.returncode == 0, ds.stdout[-3000:] + ds.stderr[-3000:]
    seal = json.loads((tmp_path / "ds" / "checkpoints" / "step_00000003" / "complete.json").read_text())
    assert (seal["engine"], seal["world_size"], seal["ep_size"]) == ("deepspeed", 2, 2)
    # plain python, world size 1, DeepSpeed engine
    one = subprocess.run(
        [sys.executable, "-m", "msmoe_dist.cli", "train", *_small(tmp_path, "one"), "parallel.engine=deepspeed"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    seal = json.loads((tmp_path / "one" / "checkpoints" / "step_00000003" / "complete.json").read_text())
    assert (seal["engine"], seal["world_size"]) == ("deepspeed", 1)
