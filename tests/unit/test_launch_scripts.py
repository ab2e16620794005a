"""The launch scripts: clear errors for missing or bad variables, and the commands they build."""

import os
import subprocess
from pathlib import Path

import pytest

LAUNCH = Path(__file__).resolve().parents[2] / "launch"


def run(script, env, *args):
    base = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(
            (
                "SLURM_",
                "NPROC",
                "NNODES",
                "NODE_RANK",
                "RDZV_",
                "HOSTFILE",
                "INCLUDE",
                "EXCLUDE",
                "NUM_GPUS",
                "NUM_NODES",
            )
        )
    }
    return subprocess.run(
        ["bash", str(LAUNCH / script), *args],
        env={**base, "PYTHON": "python3", **env},
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.mark.parametrize(
    "script,env,needle",
    [
        ("torchrun.sh", {}, "NPROC is not set"),
        ("torchrun.sh", {"NPROC": "two"}, "NPROC=two is not a positive integer"),
        ("torchrun.sh", {"NPROC": "2", "NNODES": "2"}, "NODE_RANK is not set"),
        ("torchrun.sh", {"NPROC": "2", "NNODES": "2", "NODE_RANK": "2"}, "NODE_RANK=2 is not in 0..1"),
        ("torchrun.sh", {"NPROC": "2", "NNODES": "2", "NODE_RANK": "1"}, "RDZV_ENDPOINT is not set"),
        ("torchrun.sh", {"NPROC": "2", "NNODES": "2", "NODE_RANK": "1", "RDZV_ENDPOINT": "node0"}, "not host:port"),
        ("deepspeed.sh", {}, "none of HOSTFILE, INCLUDE or NUM_GPUS is set"),
        ("deepspeed.sh", {"HOSTFILE": "/nonexistent/hosts"}, "does not exist"),
        ("deepspeed.sh", {"INCLUDE": "a", "EXCLUDE": "b"}, "both set"),
        ("slurm.sbatch", {}, "SLURM_JOB_NODELIST is not set"),
    ],
)
def test_missing_or_bad_variables(script, env, needle):
    res = run(script, env, "--config", "configs/quickstart.yaml")
    assert res.returncode == 2 and needle in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_no_training_arguments():
    res = run("torchrun.sh", {"NPROC": "2"})
    assert res.returncode == 2 and "no training arguments" in res.stderr


def test_torchrun_commands():
    one = run("torchrun.sh", {"NPROC": "4", "DRY_RUN": "1"}, "--config", "c.yaml", "parallel.ep_size=4").stdout
    assert "--standalone" in one and "--nproc_per_node 4" in one and "msmoe_dist.cli train --config c.yaml" in one
    multi = run(
        "torchrun.sh",
        {
            "NPROC": "8",
            "NNODES": "2",
            "NODE_RANK": "1",
            "RDZV_ENDPOINT": "node0:29500",
            "MAX_RESTARTS": "3",
            "DRY_RUN": "1",
        },
        "--config",
        "c.yaml",
    ).stdout
    for part in (
        "--nnodes 2",
        "--node_rank 1",
        "--rdzv-backend c10d",
        "--rdzv-endpoint node0:29500",
        "--max-restarts 3",
    ):
        assert part in multi


def test_deepspeed_hostfile(tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("# two nodes\nnode0 slots=8\nnode1 slots=8\n")
    out = run(
        "deepspeed.sh", {"HOSTFILE": str(hosts), "INCLUDE": "node0:0,1@node1:0,1", "DRY_RUN": "1"}, "--config", "c.yaml"
    ).stdout
    assert (
        f"--hostfile {hosts}" in out and "--include node0:0\\,1@node1:0\\,1" in out and "--module msmoe_dist.cli" in out
    )
    hosts.write_text("node0 8\n")
    bad = run("deepspeed.sh", {"HOSTFILE": str(hosts)}, "--config", "c.yaml")
    assert bad.returncode == 2 and "not 'hostname slots=N'" in bad.stderr


def test_slurm_derives_rendezvous_from_allocation(tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "scontrol").write_text("#!/bin/sh\n[ \"$1 $2\" = 'show hostnames' ] && printf 'gpu-a17\\ngpu-a18\\n'\n")
    (fake / "scontrol").chmod(0o755)
    env = {
        "PATH": f"{fake}:{os.environ['PATH']}",
        "SLURM_JOB_NODELIST": "gpu-a[17-18]",
        "SLURM_NNODES": "2",
        "SLURM_JOB_ID": "4242",
        "SLURM_GPUS_ON_NODE": "4",
        "DRY_RUN": "1",
    }
    out = run("slurm.sbatch", env, "--config", "c.yaml").stdout
    for part in ("srun", "--nnodes 2", "--nproc_per_node 4", "--rdzv-id 4242", "--rdzv-endpoint gpu-a17:29500"):
        assert part in out, out
