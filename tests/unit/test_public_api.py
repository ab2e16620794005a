"""The public API of `msmoe_dist` and the README's example that uses it (run from README.md itself, so
the README cannot drift from the code)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import msmoe_dist

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
MARKER = "<!-- readme-example: momentum-moe-stack"

# each public name and the subpackage whose own public API defines it
HOMES = {
    "MoEConfig": "msmoe_dist.config",
    "MomentumConfig": "msmoe_dist.config",
    "MoELayer": "msmoe_dist.moe",
    "MoEOutput": "msmoe_dist.moe",
    "Router": "msmoe_dist.moe",
    "Dispatcher": "msmoe_dist.moe",
    "LocalDispatcher": "msmoe_dist.moe",
    "MomentumUpdate": "msmoe_dist.momentum",
    "MomentumState": "msmoe_dist.momentum",
}


def readme_example() -> tuple[str, int]:
    """The python block right after the marker, and the README line it starts on (1-based)."""
    lines = README.read_text(encoding="utf-8").splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith(MARKER)]
    assert len(starts) == 1, f"expected one {MARKER!r} line in README.md, found {len(starts)}"
    fence = starts[0] + 1
    assert lines[fence] == "```python", f"README.md:{fence + 1}: the marker must be followed by a ```python block"
    end = lines.index("```", fence + 1)
    return "\n".join(lines[fence + 1 : end]) + "\n", fence + 2


def test_all_lists_exactly_the_public_names_and_each_is_its_subpackages_object():
    import importlib

    assert sorted(msmoe_dist.__all__) == sorted(HOMES)
    for name, home in HOMES.items():
        assert getattr(msmoe_dist, name) is getattr(importlib.import_module(home), name), name
        assert name in dir(msmoe_dist)
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        msmoe_dist.Nope  # noqa: B018


def test_star_import_in_a_fresh_interpreter():
    # A fresh process: every name must resolve whatever was (not) imported before it.
    code = "from msmoe_dist import *; import msmoe_dist; g = globals(); print(sorted(set(msmoe_dist.__all__) & set(g)))"
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip() == str(sorted(HOMES))


def test_readme_example_runs():
    code, first_line = readme_example()
    # Line numbers in a traceback point into README.md.
    namespace: dict = {"__name__": "readme_example"}
    torch.manual_seed(0)
    exec(compile("\n" * (first_line - 1) + code, str(README), "exec"), namespace)
    x, aux_loss, model = namespace["x"], namespace["aux_loss"], namespace["model"]
    assert x.shape == (2, 16, 64) and torch.isfinite(x).all()
    assert aux_loss.ndim == 0 and torch.isfinite(aux_loss)
    assert all(p.grad is not None for p in model.moes.parameters())
