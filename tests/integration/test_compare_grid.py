"""msmoe-bench compare end to end on a tiny config: 2 variants x 2 seeds of real msmoe-train runs, the
report's numbers recomputed by hand from the runs' own files, and a resumed grid that repeats only the
run that was cut short."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest

from msmoe_dist.bench.compare import CompareError, run_grid

TINY = """
model: {num_layers: 2, d_model: 32, num_heads: 2, max_seq_len: 16}
moe: {num_experts: 4, top_k: 2, expert_ffn_dim: 32}
data: {kind: synthetic, path: DATA, synthetic_lines: 400, seq_len: 16, batch_size: 4}
train: {max_steps: 4, eval_every: 2, eval_batches: 2, progress: false}
checkpoint: {every_steps: 2, keep_last: 2}
logging: {log_every: 1, tensorboard: false}
"""


def _args(tmp_path: Path, **kw) -> argparse.Namespace:
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY.replace("DATA", str(tmp_path / "data")))
    base = dict(
        config=str(cfg),
        variants="none,heavy_ball",
        seeds=2,
        out=str(tmp_path / "out"),
        sweep=None,
        eval_splits="valid,test",
        eval_batches=2,
        attack_rate=0.025,
        threads=1,
        report_only=False,
        no_plots=False,
        overrides=[],
    )
    base.update(kw)
    return argparse.Namespace(**base)


def _last_val(run: Path) -> tuple[float, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    vals = [r["val.ppl"] for r in rows if "val.ppl" in r]
    return vals[-1], min(vals)


def test_grid_report_and_resume(tmp_path):
    pytest.importorskip("matplotlib")
    quiet = lambda *a, **k: None  # noqa: E731
    first = run_grid(_args(tmp_path), log=quiet)
    out = tmp_path / "out"
    names = ["none-s0", "heavy_ball-s0", "none-s1", "heavy_ball-s1"]
    assert [c["name"] for c in first["cells"]] == names
    assert all(c["actions"] == ["train", "eval"] and "error" not in c for c in first["cells"])

    res = json.loads((out / "results.json").read_text())
    assert res["missing"] == []
    # Per run: the last and the smallest val.ppl of metrics.jsonl, and msmoe-eval's figures in eval.json.
    per = {}
    for name in names:
        run = out / "runs" / name
        final, best = _last_val(run)
        ev = json.loads((run / "eval.json").read_text())
        assert ev["step"] == 4 and ev["test_attack_replaced"] > 0
        got = res["cells"][name]["metrics"]
        assert got["final_valid_ppl"] == final and got["best_valid_ppl"] == best
        assert got["test_attacked_ppl"] == ev["test_attacked_ppl"] and got["valid_ppl"] == ev["valid_ppl"]
        per[name] = got
    # Paired difference heavy_ball - none over seeds 0 and 1, t interval with df 1 (t = 12.706).
    for metric in ("final_valid_ppl", "test_attacked_ppl"):
        d = [per[f"heavy_ball-s{s}"][metric] - per[f"none-s{s}"][metric] for s in (0, 1)]
        mean = (d[0] + d[1]) / 2
        sd = abs(d[0] - d[1]) / math.sqrt(2)
        half = 12.706 * sd / math.sqrt(2)
        vs = res["rows"]["heavy_ball"]["vs_baseline"][metric]
        assert vs["mean"] == pytest.approx(mean) and vs["ci95"] == pytest.approx([mean - half, mean + half])
        vals = [per[f"none-s{s}"][metric] for s in (0, 1)]
        assert res["rows"]["none"]["mean_std"][metric]["mean"] == pytest.approx(sum(vals) / 2)
        assert res["rows"]["none"]["mean_std"][metric]["std"] == pytest.approx(abs(vals[0] - vals[1]) / math.sqrt(2))
    md = (out / "results.md").read_text()
    hb = res["rows"]["heavy_ball"]["vs_baseline"]["final_valid_ppl"]
    assert f"{hb['mean']:.2f} [{hb['ci95'][0]:.2f}, {hb['ci95'][1]:.2f}]" in md
    for png in res["plots"]:
        assert (out / png).stat().st_size > 1000
    # The selection histogram: fractions per MoE layer that sum to 1, for both layers.
    sel = res["selection_fractions"]["heavy_ball"]
    assert sorted(sel) == ["0", "1"] and all(sum(f) == pytest.approx(1.0) for f in sel.values())

    # Cut one run short: its final checkpoint and its evaluation are gone, the step-2 checkpoint stays.
    cut = out / "runs" / "heavy_ball-s1"
    import shutil

    shutil.rmtree(cut / "checkpoints" / "step_00000004")
    (cut / "eval.json").unlink()
    stamps = {n: (out / "runs" / n / "metrics.jsonl").stat().st_mtime_ns for n in names if n != "heavy_ball-s1"}
    only = run_grid(_args(tmp_path, report_only=True), log=quiet)  # runs nothing, reports what is there
    assert only["cells"] == [] and only["report"]["missing"] == ["heavy_ball-s1"]
    assert "missing: heavy_ball-s1" in (out / "results.md").read_text()
    second = run_grid(_args(tmp_path), log=quiet)
    actions = {c["name"]: c["actions"] for c in second["cells"]}
    assert actions == {"none-s0": [], "heavy_ball-s0": [], "none-s1": [], "heavy_ball-s1": ["resume", "eval"]}
    assert {n: (out / "runs" / n / "metrics.jsonl").stat().st_mtime_ns for n in stamps} == stamps
    again = json.loads((out / "results.json").read_text())
    assert again["missing"] == []
    # The resumed run continued from step 2 and reads the same batches: the same final figures.
    assert again["cells"]["heavy_ball-s1"]["metrics"] == pytest.approx(per["heavy_ball-s1"], rel=1e-6)

    # A grid asked for something else in the same directory is refused before anything runs.
    with pytest.raises(CompareError, match="another request"):
        run_grid(_args(tmp_path, overrides=["optim.lr=0.01"]), log=quiet)
