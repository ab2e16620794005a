"""Real text end to end: train on WikiText-2, prepare it, resume sequential sampling, evaluate under attack.

WikiText-2's train split is not shipped with the shared data, so its valid.txt stands in for
train and test.txt for valid (and test): "train on valid.txt, evaluate on test.txt".
"""

import json
from pathlib import Path

import pytest

WIKITEXT2 = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "wikitext-2"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wt2(tmp_path_factory):
    if not (WIKITEXT2 / "valid.txt").is_file() or not (WIKITEXT2 / "test.txt").is_file():
        pytest.skip(f"WikiText-2 not found at {WIKITEXT2} (valid.txt and test.txt are needed)")
    d = tmp_path_factory.mktemp("wt2")
    for name, target in (("train.txt", "valid.txt"), ("valid.txt", "test.txt"), ("test.txt", "test.txt")):
        (d / name).symlink_to(WIKITEXT2 / target)
    return d


def rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


COMMON = [
    "--config",
    "configs/quickstart.yaml",
    "train.progress=false",
    "logging.tensorboard=false",
    "optim.schedule=constant",
    "optim.warmup_steps=5",
]


@pytest.fixture(scope="module")
def trained(wt2, tmp_path_factory, cli):
    run_dir = tmp_path_factory.mktemp("runs") / "wt2"
    res = cli(
        "train",
        *COMMON,
        "data.kind=text",
        f"data.path={wt2}",
        f"train.run_dir={run_dir}",
        "train.max_steps=40",
        "train.eval_every=10",
        "train.eval_batches=8",
        "logging.log_every=10",
        "model.num_layers=2",
        "data.batch_size=8",
    )
    assert res.returncode == 0, res.stderr[-2000:]
    return run_dir


def test_validation_perplexity_falls_on_real_text(trained):
    val = [(r["step"], r["val.ppl"]) for r in rows(trained) if "val.ppl" in r]
    assert [s for s, _ in val] == [10, 20, 30, 40]
    assert val[-1][1] < 0.8 * val[0][1], val


def test_eval_reports_clean_and_attacked_perplexity(trained, cli):
    res = cli("eval", "--checkpoint", str(trained), "--attack", "--batches", "6", "--device", "cpu")
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    for key in ("ppl", "valid_ppl", "test_ppl", "valid_attacked_ppl", "test_attacked_ppl"):
        assert key in out and 1.0 < out[key] < 1e6, (key, out)
    assert out["ppl"] == out["valid_ppl"] and out["valid_attacked_ppl"] != out["valid_ppl"]
    assert out["test_attack_replaced"] > 0.02 * out["test_attack_candidates"]
    assert "attacked ppl" in res.stderr and "valid" in res.stderr and "test" in res.stderr
    plain = cli("eval", "--checkpoint", str(trained), "--batches", "2", "--device", "cpu", "--splits", "valid")
    assert plain.returncode == 0 and "valid_attacked_ppl" not in plain.stdout


def test_prepared_sequential_resume_equals_the_uninterrupted_run(wt2, tmp_path, cli):
    prep = tmp_path / "prep"
    res = cli("prepare", str(wt2), str(prep), "--no-progress")
    assert res.returncode == 0, res.stderr[-2000:]
    args = [
        *COMMON,
        "data.kind=prepared",
        f"data.path={prep}",
        "data.sampler=sequential",
        "model.dropout=0.1",
        "logging.log_every=1",
        "checkpoint.every_steps=4",
        "train.eval_batches=2",
        "model.num_layers=2",
    ]
    full = cli("train", *args, f"train.run_dir={tmp_path / 'full'}", "train.max_steps=8")
    assert full.returncode == 0, full.stderr[-2000:]
    part = cli("train", *args, f"train.run_dir={tmp_path / 'part'}", "train.max_steps=4")
    assert part.returncode == 0, part.stderr[-2000:]
    resumed = cli("train", *args, f"train.run_dir={tmp_path / 'part'}", "train.max_steps=8", "train.resume=true")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    losses = [[(r["step"], r["loss"]) for r in rows(tmp_path / d) if "loss" in r] for d in ("full", "part")]
    assert losses[0] == losses[1] and [s for s, _ in losses[0]] == list(range(1, 9))
    # the attack needs the text: a prepared corpus finds it where meta.json says it was prepared from
    ev = cli("eval", "--checkpoint", str(tmp_path / "full"), "--attack", "--batches", "2", "--device", "cpu")
    assert ev.returncode == 0, ev.stderr[-2000:]
    assert "test_attacked_ppl" in json.loads(ev.stdout.strip().splitlines()[-1])
