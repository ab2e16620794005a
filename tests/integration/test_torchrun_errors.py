"""Under torchrun a worker's documented exit code becomes torchrun's 1; the failing rank's one-line
message still reaches the user through torch.distributed.elastic's error file (its failure summary)."""

import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_torchrun_summary_shows_the_one_line_error(tmp_path):
    from conftest import REPO

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
            "train",
            "--config",
            "configs/quickstart.yaml",
            "parallel.engine=native",  # refused on 2 processes: TrainError, exit code 2 on each rank
            f"train.run_dir={tmp_path / 'run'}",
            f"data.path={tmp_path / 'data'}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 1  # torchrun's own code when a worker fails
    out = res.stdout + res.stderr
    expected = "traceback : msmoe-train: parallel.engine=native runs one process, but WORLD_SIZE=2"
    assert expected in out and "(exit code 2)" in out, out[-3000:]
    assert "msmoe_dist/train/trainer.py" not in out  # a user error: no traceback of ours (torchrun prints its own)
