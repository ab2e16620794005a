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


def _fake_slurm(tmp_path, srun_body):
    """A bin/ with scontrol (hostnames; `requeue` recorded in requeued.txt), srun running `srun_body`, and
    scancel (arguments recorded in scancel.txt; `--signal=TERM` sends SIGTERM to the fake srun, as
    slurmstepd signals every process of the job's steps)."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "scontrol").write_text(
        "#!/bin/sh\n"
        "[ \"$1 $2\" = 'show hostnames' ] && printf 'gpu-a17\\n'\n"
        f'[ "$1" = requeue ] && echo "$2" >> {tmp_path / "requeued.txt"}\n'
        "exit 0\n"
    )
    (fake / "srun").write_text(
        f'#!/bin/bash\necho $$ > {tmp_path / "srun.pid"}\necho "$@" > {tmp_path / "srun_args.txt"}\n{srun_body}\n'
    )
    (fake / "scancel").write_text(
        f'#!/bin/sh\necho "$@" >> {tmp_path / "scancel.txt"}\n'
        f'[ "$1" = --signal=TERM ] && kill -TERM "$(cat {tmp_path / "srun.pid"})"\nexit 0\n'
    )
    for f in fake.iterdir():
        f.chmod(0o755)
    return {
        "PATH": f"{fake}:{os.environ['PATH']}",
        "SLURM_JOB_NODELIST": "gpu-a17",
        "SLURM_NNODES": "1",
        "SLURM_JOB_ID": "4242",
        "SLURM_GPUS_ON_NODE": "1",
    }


def test_slurm_asks_for_the_preemption_signal_and_requeue():
    text = (LAUNCH / "slurm.sbatch").read_text()
    assert "#SBATCH --signal=B:USR1@120" in text and "#SBATCH --requeue" in text


@pytest.mark.parametrize("code,requeued", [(0, False), (1, False), (5, True)])
def test_slurm_requeues_on_the_preempted_exit_code(tmp_path, code, requeued):
    res = run("slurm.sbatch", _fake_slurm(tmp_path, f"exit {code}"), "--config", "c.yaml")
    assert res.returncode == code, res.stderr
    assert (tmp_path / "requeued.txt").is_file() == requeued
    if requeued:
        assert (tmp_path / "requeued.txt").read_text().split() == ["4242"]


def test_slurm_forwards_usr1_as_sigterm_and_requeues(tmp_path):
    """USR1 to the batch script: SIGTERM to the job's steps through `scancel --signal=TERM JOB` (torchrun
    and every worker get it; a SIGTERM to srun itself would kill the step at once), then requeue."""
    import signal
    import time

    marker = tmp_path / "term.txt"
    env = _fake_slurm(tmp_path, f"trap 'echo term > {marker}; kill $!; exit 1' TERM\nsleep 30 & wait")
    base = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    proc = subprocess.Popen(
        ["bash", str(LAUNCH / "slurm.sbatch"), "--config", "c.yaml"],
        env={**base, "PYTHON": "python3", **env},
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        while not (tmp_path / "srun_args.txt").is_file():
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            time.sleep(0.05)
        time.sleep(0.2)  # the fake srun installs its trap
        proc.send_signal(signal.SIGUSR1)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert marker.is_file(), err
    assert (tmp_path / "scancel.txt").read_text().split() == ["--signal=TERM", "4242"], err
    assert (tmp_path / "requeued.txt").read_text().split() == ["4242"], err
    assert "requeueing job 4242" in err


def test_slurm_requeued_job_resumes(tmp_path):
    env = {**_fake_slurm(tmp_path, "exit 0"), "SLURM_RESTART_COUNT": "1"}
    assert run("slurm.sbatch", env, "--config", "c.yaml").returncode == 0
    assert (tmp_path / "srun_args.txt").read_text().split()[-1] == "train.auto_resume=true"
