"""msmoe-bench build-memory and recompute at tiny sizes: they run, and the figures say what they should
(a rank's expert parameters halve with EP 2; every mode reports a peak and a time)."""

import json

import pytest

pytestmark = pytest.mark.slow  # seven child processes


def test_build_memory_and_recompute_run(cli):
    r = cli(
        "bench",
        "build-memory",
        "--experts",
        "4",
        "--d-model",
        "16",
        "--ffn",
        "32",
        "--moe-layers",
        "1",
        "--ep",
        "1,2",
        "--json",
    )
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)["rows"]
    assert set(rows) == {"ep1_local", "ep1_whole", "ep2_local", "ep2_whole"}
    assert rows["ep2_local"]["expert_param_gib"] * 2 == rows["ep1_local"]["expert_param_gib"]
    assert rows["ep2_whole"]["expert_param_gib"] == rows["ep2_local"]["expert_param_gib"]
    r = cli(
        "bench",
        "recompute",
        "--config",
        "configs/quickstart.yaml",
        "--vocab",
        "50",
        "--batch-size",
        "2",
        "--seq-len",
        "16",
        "--json",
    )
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)["rows"]
    assert set(rows) == {"none", "block", "selective"}
    assert all(row["step_s"] > 0 and row["peak_rss_gib"] > 0 for row in rows.values())
