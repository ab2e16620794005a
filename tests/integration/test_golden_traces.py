"""Golden loss traces: the per-step training loss of tiny runs, stored to full precision.

They guard refactors: a change that is meant to keep behaviour must reproduce every stored float
exactly (same machine kind: 2-core CPU, fp32, one intra-op thread per process). Regenerate them
only in a commit that says why the numbers changed:

    MSMOE_REGEN_GOLDEN=1 .venv/bin/python -m pytest -q tests/integration/test_golden_traces.py

Four runs, each through the real command line: the quickstart, the tiny StableMoE (both stages: the
switch falls inside the run) and the tiny V-MoE in one process, and the quickstart on 2 ranks
(torchrun, DeepSpeed, expert parallel 2, ZeRO-1).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ASSETS = REPO / "tests" / "assets" / "losses"
REGEN = os.environ.get("MSMOE_REGEN_GOLDEN") == "1"
pytestmark = pytest.mark.slow

COMMON = ["train.progress=false", "logging.log_every=1", "checkpoint.every_steps=0", "train.eval_every=0"]
RUNS = {
    "quickstart": (
        1,
        [
            "--config",
            "configs/quickstart.yaml",
            "data.synthetic_lines=3000",
            "train.max_steps=24",
            "train.eval_batches=4",
            "model.dropout=0.1",
        ],
    ),
    "stablemoe_tiny": (
        1,
        [
            "--config",
            "configs/stablemoe/tiny.yaml",
            "data.synthetic_lines=3000",
            "train.max_steps=24",
            "moe.stable_switch_step=12",
            "train.eval_batches=4",
            "logging.fluct_every=6",
        ],
    ),
    "vmoe_tiny": (
        1,
        [
            "--config",
            "configs/imagenet/tiny_synthetic.yaml",
            "vision.synthetic_train_per_class=16",
            "vision.synthetic_val_per_class=4",
            "vision.num_workers=0",
            "train.max_steps=16",
            "model.dropout=0.1",
        ],
    ),
    "quickstart_ep2_deepspeed": (
        2,
        [
            "--config",
            "configs/quickstart.yaml",
            "data.synthetic_lines=1500",
            "model.num_layers=2",
            "train.max_steps=12",
            "train.eval_batches=2",
            "parallel.ep_size=2",
            "parallel.zero_stage=1",
            "parallel.timeout_s=180",
            "model.dropout=0.1",
        ],
    ),
}


def _train(tmp_path: Path, name: str) -> list[dict]:
    ranks, args = RUNS[name]
    run_dir, data = tmp_path / name, tmp_path / f"data_{name}"
    launcher = (
        [sys.executable, "-m", "msmoe_dist.cli"]
        if ranks == 1
        else [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            str(ranks),
            "-m",
            "msmoe_dist.cli",
        ]
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(
        [*launcher, "train", *args, *COMMON, f"train.run_dir={run_dir}", f"data.path={data}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: r[k] for k in ("step", "loss", "aux_loss", "grad_norm", "val.loss") if k in r} for r in rows]


@pytest.mark.parametrize("name", list(RUNS))
def test_golden_loss_trace(tmp_path, name):
    trace = _train(tmp_path, name)
    path = ASSETS / f"{name}.json"
    if REGEN:
        ASSETS.mkdir(parents=True, exist_ok=True)
        path.write_text(
            json.dumps({"runs": RUNS[name][0], "args": RUNS[name][1] + COMMON, "trace": trace}, indent=1) + "\n"
        )
        pytest.skip(f"regenerated {path.relative_to(REPO)}")
    assert path.is_file(), f"{path} is missing: generate it with MSMOE_REGEN_GOLDEN=1"
    golden = json.loads(path.read_text())["trace"]
    assert [r["step"] for r in trace] == [r["step"] for r in golden]
    for got, want in zip(trace, golden):
        assert got == want, f"step {want['step']}: got {got}, golden {want} (bit-exact comparison)"
