"""msmoe-bench memory --ep-size: the parameter, gradient and optimiser-state bytes of a tiny language model
against hand-computed numbers (exactly), at EP 1 (in process) and EP 2 (the command, two gloo ranks)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from msmoe_dist.bench.memory_split import KEYS, measure_rank

REPO_ROOT = Path(__file__).resolve().parents[2]
V, S, D, LAYERS, E, F = 50, 8, 16, 2, 4, 32
TINY = f"""model:
  num_layers: {LAYERS}
  d_model: {D}
  num_heads: 2
  max_seq_len: {S}
  vocab_size: {V}
data:
  seq_len: {S}
  batch_size: 2
moe:
  num_experts: {E}
  expert_ffn_dim: {F}
"""

# By hand, fp32 (4 bytes). Dense: token embedding (tied with the output), positions; per block qkv (3D x D
# + 3D), projection (D x D + D), two layer norms (2 x 2D), router (E x D); the final norm (2D).
DENSE = 4 * (V * D + S * D + LAYERS * (3 * D * D + 3 * D + D * D + D + 4 * D + E * D) + 2 * D)
EXPERTS_ALL = 4 * LAYERS * E * (D * F + F + F * D + D)  # w1, b1, w2, b2 of every expert
TENSORS = 2 + 9 * LAYERS + 2 + 4 * LAYERS  # parameter tensors: embeddings, 9 per block, final norm, experts


def _expected(ep: int) -> dict:
    params = DENSE + EXPERTS_ALL // ep
    # AdamW: exp_avg and exp_avg_sq like the parameter, and a 4-byte fp32 step count per parameter tensor.
    return {
        "param_bytes": params,
        "dense_param_bytes": DENSE,
        "expert_param_bytes": EXPERTS_ALL // ep,
        "grad_bytes": params,
        "optim_bytes": 2 * params + 4 * TENSORS,
    }


def test_hand_computed_sizes():
    assert DENSE == 13_568 and EXPERTS_ALL == 34_304 and TENSORS == 30  # the numbers the tests below use


def test_one_rank_split_is_exact(tmp_path):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY)
    r = measure_rank({"config": str(cfg), "overrides": [], "device": "cpu", "vocab": V})
    assert {k: r[k] for k in _expected(1)} == _expected(1)
    assert set(KEYS) <= set(r)
    assert r["activation_bytes"] == max(0, r["fwd_bwd_peak_bytes"] - r["param_bytes"] - r["grad_bytes"])
    assert r["step_peak_bytes"] >= r["fwd_bwd_peak_bytes"] >= r["param_bytes"]


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    return subprocess.run(
        [sys.executable, "-m", "msmoe_dist.cli", "bench", "memory", *args],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
        cwd=str(cwd),
    )


def test_two_ranks_hold_half_the_experts_each(tmp_path):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY)
    proc = _cli("--ep-size", "2", "--config", str(cfg), "data.batch_size=3", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    assert result["ep_size"] == 2 and result["batch_size"] == 3 and len(result["ranks"]) == 2
    for r in result["ranks"]:
        assert {k: r[k] for k in _expected(2)} == _expected(2), r["rank"]
    assert {k: result[k] for k in KEYS} == {k: result["ranks"][0][k] for k in KEYS}


def test_an_ep_degree_that_does_not_divide_the_experts_is_one_line_exit_2(tmp_path):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY)
    proc = _cli("--ep-size", "3", "--config", str(cfg), cwd=tmp_path)
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and "parallel.ep_size" in lines[0], proc.stderr
