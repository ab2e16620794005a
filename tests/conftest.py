"""Shared test helpers, as fixtures.

- ``cli(*args, timeout=600)``: run ``python -m msmoe_dist.cli *args`` from the repository root and
  return the ``subprocess.CompletedProcess`` (text output captured, never raises on a non-zero exit).
- ``run_distributed(fn, world_size, *args, timeout_s=180.0, collective_timeout_s=60.0)``: ``fn(rank,
  world_size, *args)`` on N gloo ranks in spawned processes (tests/dist_harness.py says how).
- ``free_port()``: a free TCP port on 127.0.0.1, for launchers that need a rendezvous port.

The fixtures return the functions themselves, so a module- or session-scoped fixture can use them too.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

# pytest puts this directory on sys.path before importing this file (rootdir conftest, no __init__.py).
from dist_harness import free_port as _free_port
from dist_harness import run_distributed as _run_distributed

REPO = Path(__file__).resolve().parents[1]


def tiny_lm_config(tmp_path: Path, *overrides: str):
    """A seconds-long language-model run under tmp_path (2 layers, d 32, 4 experts, generated data),
    checkpointing every 2 steps; tests add or override keys."""
    from msmoe_dist.config import load_config

    base = [
        f"train.run_dir={tmp_path / 'run'}",
        f"data.path={tmp_path / 'data'}",
        "data.synthetic_lines=400",
        "model.num_layers=2",
        "model.d_model=32",
        "model.num_heads=2",
        "model.max_seq_len=16",
        "data.seq_len=16",
        "data.batch_size=4",
        "moe.num_experts=4",
        "moe.expert_ffn_dim=32",
        "checkpoint.every_steps=2",
        "train.progress=false",
        "logging.log_every=1",
        "train.eval_batches=2",
    ]
    return load_config(None, [*base, *overrides])


def run_cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """``python -m msmoe_dist.cli *args`` in the repository root, so relative paths like configs/... resolve."""
    return subprocess.run(
        [sys.executable, "-m", "msmoe_dist.cli", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="session")
def cli():
    return run_cli


@pytest.fixture(scope="session")
def run_distributed():
    return _run_distributed


@pytest.fixture(scope="session")
def free_port():
    return _free_port
