"""Cluster launch paths on one machine: two torchrun nodes, elastic restart after SIGKILL, a hung peer.

- Two torchrun agents as two nodes (--nnodes 2, one rank each, static rendezvous on loopback):
  expert-parallel training with experts on both nodes equals a single-node 2-rank run bit for bit.
- torchrun --max-restarts 1 with train.auto_resume: one rank is SIGKILLed mid-run; the job restarts,
  resumes from the last complete checkpoint, and metrics.jsonl has every step once, with the
  uninterrupted run's losses.
- A hung peer makes the waiting rank fail within parallel.timeout_s, naming the collective.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def train_args(tmp_path, run, *extra):
    return [
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
        "parallel.zero_stage=1",
        "train.progress=false",
        "logging.log_every=1",
        "train.eval_batches=2",
        "optim.schedule=constant",
        "model.dropout=0.1",
        "parallel.timeout_s=180",
        *extra,
    ]


def trace(run_dir):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


# torchrun sets OMP_NUM_THREADS=1 only with several processes per node; pin it so that one rank per
# node computes with the same thread count (and so the same float reduction order) as two per node.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run_ok(cmd, timeout=400):
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=ENV)
    assert res.returncode == 0, res.stdout[-2500:] + res.stderr[-2500:]


def test_two_nodes_equal_one_node(tmp_path, free_port):
    run_ok(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            *train_args(tmp_path, "single", "train.max_steps=6"),
        ]
    )
    port = str(free_port())
    nodes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes",
                "2",
                "--nproc_per_node",
                "1",
                "--node_rank",
                str(n),
                "--master_addr",
                "127.0.0.1",
                "--master_port",
                port,
                *train_args(tmp_path, "two_nodes", "train.max_steps=6"),
            ],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=ENV,
        )
        for n in (0, 1)
    ]
    outs = []
    for p in nodes:
        try:
            outs.append(p.communicate(timeout=400)[0])
        except subprocess.TimeoutExpired:
            for q in nodes:
                q.kill()
            raise
    assert all(p.returncode == 0 for p in nodes), "\n".join(o[-2000:] for o in outs)
    assert trace(tmp_path / "two_nodes") == trace(tmp_path / "single")
    seal = json.loads((tmp_path / "two_nodes" / "checkpoints" / "step_00000006" / "complete.json").read_text())
    assert (seal["world_size"], seal["ep_size"]) == (2, 2)


def _rank_pid(agent: psutil.Process, rank: int) -> int | None:
    for child in agent.children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank) and "msmoe_dist.cli" in " ".join(child.cmdline()):
                return child.pid
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return None


def test_elastic_restart_after_sigkill_loses_no_step(tmp_path):
    common = ["train.max_steps=14", "checkpoint.every_steps=3", "train.auto_resume=true"]
    run_ok(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            *train_args(tmp_path, "clean", *common),
        ]
    )
    agent = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "--max-restarts",
            "1",
            *train_args(tmp_path, "killed", *common),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=ENV,
    )
    metrics = tmp_path / "killed" / "metrics.jsonl"
    killed_at = None
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and killed_at is None:
            steps = [json.loads(x)["step"] for x in metrics.read_text().splitlines()] if metrics.exists() else []
            if steps and max(steps) >= 7:
                pid = _rank_pid(psutil.Process(agent.pid), 1)
                if pid is not None:
                    os.kill(pid, signal.SIGKILL)
                    killed_at = max(steps)
            time.sleep(0.05)
        out = agent.communicate(timeout=400)[0]
    finally:
        if agent.poll() is None:
            agent.kill()
    assert killed_at is not None, "never saw the run reach step 7"
    assert agent.returncode == 0, out[-3000:]
    assert "restart" in out.lower() or "Restarting" in out  # torchrun really restarted the workers
    killed = trace(tmp_path / "killed")
    assert [s for s, _ in killed] == list(range(1, 15))  # no step lost or repeated
    assert killed == trace(tmp_path / "clean")  # and the same losses as the uninterrupted run
    assert killed_at < 14


def _hung_peer(rank, world):
    from msmoe_dist.config.schema import MoEConfig
    from msmoe_dist.moe import MoELayer
    from msmoe_dist.parallel import ParallelLayout, apply_expert_parallel, build_process_groups
    from msmoe_dist.parallel.collectives import CollectiveError

    pg = build_process_groups(ParallelLayout(world, 2), rank, timeout_s=4)
    layer = MoELayer(8, MoEConfig(num_experts=4, top_k=1, expert_ffn_dim=8))
    apply_expert_parallel(layer, pg)
    if rank == 1:
        time.sleep(12)  # hung: never joins the all-to-all
        return "slept"
    t0 = time.monotonic()
    try:
        layer(torch.randn(6, 8))
    except CollectiveError as exc:
        return str(exc), time.monotonic() - t0
    return "no error", time.monotonic() - t0


def test_hung_peer_is_an_error_naming_the_collective(run_distributed):
    msg, waited = run_distributed(_hung_peer, 2, timeout_s=120, collective_timeout_s=4)[0]
    assert "all_to_all (MoE token counts)" in msg and "rank 0" in msg, msg
    assert waited < 11  # bounded by the timeout, not by the peer waking up
