"""StableMoE through the real command line: a run split across the stage switch, once before it and
once after it, reproduces the uninterrupted run's loss trace and routing-fluctuation record exactly."""

import json

import pytest

pytestmark = pytest.mark.slow


def tiny(tmp_path, run, *extra):
    # The switch is at step 5; checkpoints every 4 steps, so the split points 4 and 8 lie on both sides.
    # A constant schedule, because the parts change train.max_steps; dropout exercises the RNG state.
    return [
        "train",
        "--config",
        "configs/stablemoe/tiny.yaml",
        f"train.run_dir={tmp_path / run}",
        f"data.path={tmp_path / 'data'}",
        "data.synthetic_lines=1500",
        "train.progress=false",
        "logging.log_every=1",
        "logging.fluct_every=2",
        "logging.fluct_tokens=256",
        "moe.stable_switch_step=5",
        "optim.schedule=constant",
        "optim.warmup_steps=2",
        "model.dropout=0.1",
        "checkpoint.every_steps=4",
        "train.eval_batches=2",
        "train.eval_every=0",
        *extra,
    ]


def rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_resume_before_and_after_the_switch_reproduces_the_uninterrupted_run(tmp_path, cli):
    full = cli(*tiny(tmp_path, "full", "train.max_steps=12"))
    assert full.returncode == 0, full.stderr[-2000:]
    for steps, resume in [(4, "false"), (8, "true"), (12, "true")]:
        part = cli(*tiny(tmp_path, "part", f"train.max_steps={steps}", f"train.resume={resume}"))
        assert part.returncode == 0, part.stderr[-2000:]
    want, got = rows(tmp_path / "full"), rows(tmp_path / "part")
    trace = [(r["step"], r["loss"], r["aux_loss"]) for r in want if "loss" in r]
    assert [s for s, _, _ in trace] == list(range(1, 13))
    assert trace == [(r["step"], r["loss"], r["aux_loss"]) for r in got if "loss" in r]  # bit-exact
    # Stage 1 (steps 0..4, logged as 1..5) has the balance and distillation losses; stage 2 has none.
    assert all(aux > 0 for s, _, aux in trace if s <= 5) and all(aux == 0 for s, _, aux in trace if s > 5)
    fluct = [r for r in want if "fluct.checks" in r]
    assert len(fluct) == 1 and fluct[0]["fluct.checks"] == 6  # steps 2, 4, ..., 12
    assert fluct == [r for r in got if "fluct.checks" in r][-1:]
    assert fluct[0]["fluct.layer0.changing_after_50pct"] == 0.0  # frozen from step 5 on
    val_loss = [r["val.loss"] for r in want if "val.loss" in r][-1]
    assert val_loss == [r["val.loss"] for r in got if "val.loss" in r][-1]
    assert (tmp_path / "part" / "routing_fluctuation.png").is_file()
    # msmoe-eval rebuilds the stage-2 model (frozen routing table included) from the checkpoint.
    ev = cli("eval", "--checkpoint", str(tmp_path / "full"), "--splits", "valid", "--batches", "2")
    assert ev.returncode == 0, ev.stderr[-2000:]
    assert json.loads(ev.stdout)["valid_loss"] == pytest.approx(val_loss, rel=1e-6)
