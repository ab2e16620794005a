"""The quickstart end to end through the real command line (tiny step count)."""

import json

import pytest

pytestmark = pytest.mark.slow


def small(tmp_path, run="run", *extra):
    return [
        "--config",
        "configs/quickstart.yaml",
        f"train.run_dir={tmp_path / run}",
        f"data.path={tmp_path / 'data'}",
        "data.synthetic_lines=3000",
        "train.progress=false",
        "logging.log_every=5",
        *extra,
    ]


def losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def test_quickstart_trains_writes_files_and_evaluates(tmp_path, cli):
    res = cli(
        "train", *small(tmp_path, "run", "train.max_steps=60", "train.eval_every=30", "checkpoint.every_steps=30")
    )
    assert res.returncode == 0, res.stderr[-2000:]
    run_dir = tmp_path / "run"
    assert "run directory" in res.stdout and str(run_dir) in res.stdout
    trace = losses(run_dir)
    assert [s for s, _ in trace] == list(range(5, 61, 5))
    first, last = trace[0][1], trace[-1][1]
    assert last < first - 0.5, f"loss did not fall: {trace}"
    assert (run_dir / "config.yaml").is_file()
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000060"
    assert (run_dir / "checkpoints" / "step_00000030" / "state.pt").is_file()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("val.ppl" in r for r in rows) and any("moe.layer0.load_imbalance" in r for r in rows)
    assert any("momentum.layer1.norm" in r for r in rows)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in (
        "loss",
        "ppl",
        "lr",
        "tokens_per_s",
        "aux_loss",
        "grad_norm",
        "moe/layer0/load_imbalance",
        "moe/layer0/drop_fraction",
        "moe/layer3/router_entropy",
        "momentum/layer2/norm",
        "val/ppl",
    ):
        assert tag in tags, (tag, sorted(tags))
    assert [e.step for e in acc.Scalars("loss")] == list(range(5, 61, 5))

    ev = cli("eval", "--checkpoint", str(run_dir), "--batches", "3", "--device", "cpu")
    assert ev.returncode == 0, ev.stderr[-2000:]
    out = json.loads(ev.stdout.strip().splitlines()[-1])
    assert out["step"] == 60 and 1.0 < out["ppl"] < out["valid_ppl"] * 1.0001 + 1e9
    assert out["ppl"] == out["valid_ppl"] and "test_ppl" in out


def test_resume_reproduces_the_uninterrupted_loss_trace(tmp_path, cli):
    common = ["optim.schedule=constant", "model.dropout=0.1", "checkpoint.every_steps=10", "train.eval_batches=2"]
    full = cli("train", *small(tmp_path, "full", "train.max_steps=20", *common))
    assert full.returncode == 0, full.stderr[-2000:]
    part = cli("train", *small(tmp_path, "part", "train.max_steps=10", *common))
    assert part.returncode == 0, part.stderr[-2000:]
    resumed = cli("train", *small(tmp_path, "part", "train.max_steps=20", "train.resume=true", *common))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert losses(tmp_path / "part") == losses(tmp_path / "full")  # bit-exact floats from JSON
    # TensorBoard holds the same steps as metrics.jsonl after the resume (step 10's validation point included)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rows = [json.loads(line) for line in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    acc = EventAccumulator(str(tmp_path / "part" / "tensorboard"))
    acc.Reload()
    for key in ("loss", "val.ppl"):
        want = [r["step"] for r in rows if key in r]
        assert [e.step for e in acc.Scalars(key.replace(".", "/"))] == want, key
    assert 10 in [r["step"] for r in rows if "val.ppl" in r]


def test_running_the_readme_command_twice_keeps_the_first_run(tmp_path, cli):
    # The README's first command, twice: configs/quickstart.yaml itself must not set train.overwrite.
    args = small(tmp_path, "run", "train.max_steps=5")
    assert cli("train", *args).returncode == 0
    run_dir = tmp_path / "run"
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and "tensorboard" not in p.parts}
    again = cli("train", *args)
    assert again.returncode == 2 and "Traceback" not in again.stderr, again.stderr
    line = again.stderr.strip()
    assert "\n" not in line and "already holds a run" in line, line
    for hint in ("train.resume=true", "train.overwrite=true", "train.run_dir"):  # what continues / starts over
        assert hint in line, (hint, line)
    assert {p: p.read_bytes() for p in before} == before  # nothing of the first run changed
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))


def test_refuses_to_clobber_or_resume_wrongly(tmp_path, cli):
    args = small(tmp_path, "run", "train.max_steps=5")
    assert cli("train", *args).returncode == 0
    not_a_dir = tmp_path / "a_file"
    not_a_dir.write_text("x")
    as_file = cli("train", *small(tmp_path, "a_file"))
    assert as_file.returncode == 2 and len(as_file.stderr.strip().splitlines()) == 1, as_file.stderr
    assert "is a file" in as_file.stderr
    other = cli("train", *small(tmp_path, "nothing_here", "train.resume=true"))
    assert other.returncode == 2 and "no complete checkpoint" in other.stderr
    changed = cli(
        "train",
        *small(tmp_path, "run", "train.max_steps=8", "train.resume=true", "model.d_model=64", "model.num_heads=4"),
    )
    assert changed.returncode == 2 and "model.d_model" in changed.stderr
    bad_eval = cli("eval", "--checkpoint", str(tmp_path / "missing"))
    assert bad_eval.returncode == 2 and len(bad_eval.stderr.strip().splitlines()) == 1
