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
