"""msmoe-plot: curves of several runs on one plot, the expert-load heatmap's numbers, and bad run dirs."""

import json

import pytest

from msmoe_dist.plots import PlotError, load_shares, plot_runs, series


def write_run(path, rows):
    path.mkdir(parents=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


ROWS = [
    {
        "step": 1,
        "loss": 5.0,
        "moe.layer0.tokens_per_expert": [6, 2, 0, 0],
        "moe.layer1.tokens_per_expert": [2, 2, 2, 2],
    },
    {"step": 2, "loss": 4.0, "val.ppl": 60.0, "time": 1.0},
    {"step": 2, "val.loss": 4.1},
]


def test_two_runs_give_shared_curves_and_one_heatmap_each(tmp_path, cli):
    a = write_run(tmp_path / "a", ROWS)
    b = write_run(tmp_path / "b", [{"step": 1, "loss": 6.0}, {"step": 3, "loss": 3.0, "val.ppl": 50.0}])
    out = tmp_path / "plots"
    res = cli("plot", str(a), str(b), "--out", str(out))
    assert res.returncode == 0, res.stderr
    names = sorted(p.name for p in out.iterdir())
    assert names == ["expert_load_a.png", "loss.png", "val_loss.png", "val_ppl.png"]  # run b logged no loads
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in out.iterdir())
    assert res.stdout.split() == [
        str(out / n) for n in ("loss.png", "val_loss.png", "val_ppl.png", "expert_load_a.png")
    ]


def test_heatmap_numbers_are_each_experts_share_over_the_uniform_share():
    layers = load_shares(ROWS)
    assert layers == {0: ([1], [[3.0, 1.0, 0.0, 0.0]]), 1: ([1], [[1.0, 1.0, 1.0, 1.0]])}
    assert series(ROWS, "loss") == ([1, 2], [5.0, 4.0])


def test_bad_run_dirs_are_refused_before_writing(tmp_path, cli):
    good = write_run(tmp_path / "good", ROWS)
    corrupt = write_run(tmp_path / "corrupt", ROWS)
    with (corrupt / "metrics.jsonl").open("a") as fh:
        fh.write('{"step": 3, "loss"\n')
    for bad, msg in ((tmp_path / "missing", "has no metrics.jsonl"), (corrupt, "line 4 is not JSON")):
        res = cli("plot", str(good), str(bad), "--out", str(tmp_path / "out"))
        assert res.returncode == 2 and msg in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
        assert not (tmp_path / "out").exists()
    with pytest.raises(PlotError, match="no logged step"):
        plot_runs([write_run(tmp_path / "empty", [])], tmp_path / "out")
