"""V-MoE on 2 ranks with expert parallelism, under the real torchrun launcher and DeepSpeed.

On generated coloured-shape images: each momentum variant trains and its loss falls; a run that
stops mid-epoch and resumes reads the images the uninterrupted run would have read (the
metrics trace is identical to the last bit); msmoe-eval reads the 2-rank checkpoint in one process.
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
        "configs/imagenet/tiny_synthetic.yaml",
        f"train.run_dir={tmp_path / run}",
        f"data.path={tmp_path / 'images'}",
        "parallel.ep_size=2",
        "train.progress=false",
        "logging.log_every=1",
        "parallel.timeout_s=180",
        "vision.num_workers=1",
        "vision.synthetic_train_per_class=32",
        "vision.synthetic_val_per_class=8",
        "train.eval_every=0",
        *extra,
    ]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def trace(run_dir):
    return [(r["step"], r["loss"], r["grad_norm"]) for r in rows(run_dir) if "loss" in r]


@pytest.mark.parametrize("kind", ["heavy_ball", "adam", "robust"])
def test_each_momentum_variant_trains_with_expert_parallelism(tmp_path, kind):
    torchrun(
        tmp_path,
        kind,
        f"momentum.kind={kind}",
        "train.max_steps=30",
        "optim.warmup_steps=5",
        "checkpoint.every_steps=0",
    )
    losses = [loss for _, loss, _ in trace(tmp_path / kind)]
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.3, (first, last)
    final = [r for r in rows(tmp_path / kind) if "val.top1" in r][-1]
    assert final["val.top1"] > 0.2  # 10 classes: chance is 0.1


def test_resume_mid_epoch_is_bit_exact(tmp_path):
    # 320 training images / (32 per rank x 2 ranks) = 5 steps per epoch: step 7 is mid-epoch.
    common = (
        "train.max_steps=12",
        "checkpoint.every_steps=7",
        "optim.schedule=constant",
        "vision.mixup_alpha=0.2",
        "vision.randaugment_ops=1",
        "model.dropout=0.1",
    )
    torchrun(tmp_path, "full", *common)
    torchrun(tmp_path, "part", *common[1:], "train.max_steps=7")
    torchrun(tmp_path, "part", *common, "train.resume=true")
    full, part = trace(tmp_path / "full"), trace(tmp_path / "part")
    assert [s for s, _, _ in part] == list(range(1, 13))
    assert part == full
    ev = subprocess.run(
        [
            sys.executable,
            "-m",
            "msmoe_dist.cli",
            "eval",
            "--checkpoint",
            str(tmp_path / "full"),
            "--json",
            str(tmp_path / "eval.json"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ev.returncode == 0, ev.stdout[-2000:] + ev.stderr[-2000:]
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["val"]["num_images"] == 80 and 0.0 <= report["val"]["top1_acc"] <= 1.0
