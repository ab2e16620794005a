"""msmoe-bench compare: the statistics (t quantiles, paired intervals), the command-line checks, cell claims."""

from __future__ import annotations

import argparse
import math

import pytest

from msmoe_dist.bench.compare import CompareError, build_grid, parse_sweep, parse_variants
from msmoe_dist.bench.compare_stats import mean_std, paired_difference, t975


def test_t_quantiles_match_the_printed_table_and_the_expansion_beyond():
    assert t975(1) == pytest.approx(12.706)
    assert t975(2) == pytest.approx(4.303)
    assert t975(30) == pytest.approx(2.042)
    # Beyond the table: published t_{0.975} values (R's qt(0.975, df)).
    assert t975(40) == pytest.approx(2.021075, abs=1e-3)
    assert t975(120) == pytest.approx(1.979930, abs=1e-3)
    assert t975(31) < t975(30)
    with pytest.raises(ValueError):
        t975(0)


def test_paired_difference_by_hand():
    base, var = [100.0, 110.0, 90.0], [98.0, 107.0, 89.0]
    d = [-2.0, -3.0, -1.0]
    m = sum(d) / 3
    sd = math.sqrt(sum((x - m) ** 2 for x in d) / 2)
    res = paired_difference(var, base)
    assert res["mean"] == pytest.approx(-2.0)
    assert res["std"] == pytest.approx(sd)
    half = 4.303 * sd / math.sqrt(3)
    assert res["ci95"] == pytest.approx([m - half, m + half])
    one = paired_difference([5.0], [4.0])
    assert one["ci95"] is None and one["mean"] == 1.0
    assert mean_std([2.0]) == (2.0, None)


@pytest.mark.parametrize("text", ["none,foo", "", "none,none", "SMoE"], ids=["unknown", "empty", "twice", "paper-name"])
def test_bad_variants_are_refused(text):
    with pytest.raises(CompareError, match="--variants"):
        parse_variants(text)


@pytest.mark.parametrize(
    "spec",
    [
        ["momentum.mu"],
        ["mu=0.3,0.5"],
        ["momentum.mu=0.3,,0.5"],
        ["momentum.mu=0.3,0.3"],
        ["momentum.mu=0.3,0.5", "momentum.mu=0.7,0.9"],
        ["train.seed=1,2"],
    ],
    ids=["no-values", "no-section", "empty-value", "repeated-value", "key-twice", "runner-key"],
)
def test_bad_sweep_specs_are_refused(spec):
    with pytest.raises(CompareError, match="--sweep"):
        parse_sweep(spec)


def test_grid_runs_seed_by_seed_and_does_not_sweep_the_baseline_over_momentum_keys():
    sweep = parse_sweep(["momentum.mu=0.3,0.5", "optim.lr=0.1,0.2"])
    cells = build_grid(["none", "heavy_ball"], 2, sweep, ["train.max_steps=3"])
    names = [c.name for c in cells]
    # Per seed: the baseline over the non-momentum key only, then heavy_ball over both keys.
    assert names[:6] == [
        "none-lr0.1-s0",
        "none-lr0.2-s0",
        "heavy_ball-mu0.3-lr0.1-s0",
        "heavy_ball-mu0.3-lr0.2-s0",
        "heavy_ball-mu0.5-lr0.1-s0",
        "heavy_ball-mu0.5-lr0.2-s0",
    ]
    assert len(cells) == 12 and all(n.endswith("-s1") for n in names[6:])
    hb = cells[2]
    assert hb.overrides == (
        "train.max_steps=3",
        "momentum.mu=0.3",
        "optim.lr=0.1",
        "momentum.kind=heavy_ball",
        "train.seed=0",
    )


def _args(tmp_path, **kw) -> argparse.Namespace:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  max_steps: 2\n")
    base = dict(
        config=str(cfg),
        variants="none,heavy_ball",
        seeds=1,
        out=str(tmp_path / "out"),
        sweep=None,
        eval_splits="valid,test",
        eval_batches=0,
        attack_rate=0.025,
        threads=0,
        report_only=False,
        no_plots=True,
        overrides=[],
    )
    base.update(kw)
    return argparse.Namespace(**base)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"variants": "none,momentum"}, "unknown variant momentum"),
        ({"seeds": 0}, "--seeds 0"),
        ({"sweep": ["momentum.mu=0.3,,0.5"]}, "--sweep"),
        ({"overrides": ["train.seed=3"]}, "set by the runner"),
        ({"overrides": ["model.num_layers=0"]}, "model.num_layers"),
        ({"eval_splits": "train"}, "--eval-splits"),
    ],
    ids=["variant", "seeds", "sweep", "runner-key", "bad-config", "splits"],
)
def test_bad_input_is_refused_before_anything_is_written(tmp_path, kw, match):
    from msmoe_dist.bench.compare import run_grid

    with pytest.raises(CompareError, match=match):
        run_grid(_args(tmp_path, **kw))
    assert not (tmp_path / "out").exists()


def test_cli_bad_input_is_one_line_exit_2(cli, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  max_steps: 2\n")
    res = cli("bench", "compare", "--config", str(cfg), "--variants", "none,foo", "--out", str(tmp_path / "o"))
    assert res.returncode == 2
    assert len(res.stderr.strip().splitlines()) == 1 and "unknown variant foo" in res.stderr
    assert not (tmp_path / "o").exists()


def test_a_cell_is_claimed_by_one_runner_and_a_stale_claim_is_taken_over(tmp_path):
    import json
    import platform
    import subprocess
    import sys

    from msmoe_dist.bench.compare import LOCK_FILE, claim

    run = tmp_path / "cell"
    lock = claim(run)
    assert lock == run / LOCK_FILE and json.loads(lock.read_text())["pid"] > 0
    assert claim(run) is None  # held by a live process (this one)
    lock.unlink()
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (run / LOCK_FILE).write_text(json.dumps({"host": platform.node(), "pid": int(gone.stdout)}))
    assert claim(run) == run / LOCK_FILE  # its process has exited: taken over
