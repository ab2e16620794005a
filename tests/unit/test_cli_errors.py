"""A configuration mistake reaches the user as one line on stderr and exit status 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_train_bad_config_is_one_line_exit_2(tmp_path):
    bad = tmp_path / "bad_cli_cfg.yaml"
    bad.write_text("model:\n  num_layers: 0\n", encoding="utf-8")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run(
        [sys.executable, "-m", "msmoe_dist.cli", "train", "--config", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=str(tmp_path),
    )
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].strip(), proc.stderr
    assert lines[0].startswith("msmoe-train: "), lines[0]
    assert "model.num_layers" in lines[0], lines[0]
    assert "bad_cli_cfg.yaml" in lines[0], lines[0]
