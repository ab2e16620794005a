"""The routing-fluctuation metric on scripted assignments, and its recorder around a real model."""

import json

import pytest
import torch

from msmoe_dist.config.schema import ModelConfig, MoEConfig, MomentumConfig
from msmoe_dist.models import MoELanguageModel
from msmoe_dist.moe.fluctuation import PLOT_FILE, SNAPSHOT_FILE, routing_fluctuation
from msmoe_dist.train.routing_fluctuation import FluctuationRecorder, fixed_windows

# Five tokens checked at steps 10..40; the last column is each token's final expert.
#   t0 0 0 0 0   never differs                    -> -1
#   t1 1 0 0 0   differs at 10                    -> 10
#   t2 0 1 0 1   differs at 10 and 30             -> 30
#   t3 2 2 3 3   differs at 10 and 20             -> 20
#   t4 1 2 1 2   differs at 10 and 30             -> 30
STEPS = [10, 20, 30, 40]
LAYER0 = [[0, 1, 0, 2, 1], [0, 0, 1, 2, 2], [0, 0, 0, 3, 1], [0, 0, 1, 3, 2]]


def scripted():
    # Layer 1 never changes, so every token's last fluctuation step is -1 there.
    return [torch.tensor([row, [4, 4, 4, 4, 4]]) for row in LAYER0]


def test_last_fluctuation_steps_and_curve_of_a_scripted_sequence():
    f = routing_fluctuation(STEPS, scripted())
    assert f.last_step_LN.tolist() == [[-1, 10, 30, 20, 30], [-1] * 5]
    assert f.total == 40
    # Still changing after x% = share of tokens whose last fluctuation step is >= x% of 40 steps.
    assert f.still_changing(25) == [0.8, 0.0]  # >= 10
    assert f.still_changing(50) == [0.6, 0.0]  # >= 20
    assert f.still_changing(75) == [0.4, 0.0]  # >= 30
    assert f.still_changing(90) == [0.0, 0.0]  # >= 36
    xs, ys = f.curve()
    assert xs == [0.0, 25.0, 50.0, 75.0, 100.0]
    assert ys == [[0.8, 0.8, 0.6, 0.4, 0.0], [0.0] * 5]
    # Changed since the previous check: t1 t2 t4, then t2 t3 t4, then t2 t4.
    torch.testing.assert_close(f.changed_LC[0], torch.tensor([0.0, 0.6, 0.6, 0.4], dtype=torch.float64))
    s = f.scalars()
    assert s["fluct.layer0.mean_last_step"] == pytest.approx((0 + 10 + 30 + 20 + 30) / 5)
    assert s["fluct.layer0.changing_after_50pct"] == 0.6 and s["fluct.layer1.changing_after_10pct"] == 0.0
    assert s["fluct.layer0.changed_last_check"] == pytest.approx(0.4)
    assert s["fluct.checks"] == 4 and s["fluct.tokens"] == 5


def test_single_layer_snapshots_and_bad_input():
    f = routing_fluctuation([1, 2], [torch.tensor([0, 1]), torch.tensor([0, 0])])
    assert f.last_step_LN.tolist() == [[-1, 1]]
    with pytest.raises(ValueError, match="increasing"):
        routing_fluctuation([2, 1], [torch.tensor([0]), torch.tensor([0])])
    with pytest.raises(ValueError, match="one snapshot per step"):
        routing_fluctuation([1], [])
    with pytest.raises(ValueError, match="shape"):
        routing_fluctuation([1, 2], [torch.tensor([0, 1]), torch.tensor([0])])


def test_fixed_windows_cover_exactly_the_leading_tokens():
    stream = torch.arange(100)
    w = fixed_windows(stream, 23, 5)
    assert [tuple(t.shape) for t in w] == [(4, 5), (1, 3)]
    assert torch.equal(torch.cat([t.reshape(-1) for t in w]), torch.arange(23))
    assert fixed_windows(torch.arange(7), 50, 5)[1].numel() == 2


class Rows:
    def __init__(self):
        self.rows = []

    def log(self, step, row):
        self.rows.append((step, row))


def _model():
    torch.manual_seed(0)
    mcfg = ModelConfig(num_layers=2, d_model=16, num_heads=2, max_seq_len=8)
    return MoELanguageModel(mcfg, MoEConfig(num_experts=4, expert_ffn_dim=16), MomentumConfig(), 20)


def _recorder(tmp_path, is_main=True, resume_step=None):
    stream = torch.randint(0, 20, (200,), generator=torch.Generator().manual_seed(1))
    return FluctuationRecorder(
        every=2,
        num_tokens=30,
        stream=stream,
        seq_len=8,
        batch_size=3,
        max_steps=5,
        run_dir=tmp_path,
        is_main=is_main,
        resume_step=resume_step,
    )


def test_recorder_records_eval_routing_writes_plot_and_resumes(tmp_path):
    model = _model()
    rec = _recorder(tmp_path)
    model.train()
    for step in range(1, 6):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        rec.maybe_record(step, model)
        assert model.training  # restored after the evaluation forwards
    assert rec.steps == [2, 4, 5]  # every 2 steps and after the last one
    a = rec.snapshots[-1]
    assert a.shape == (2, 30)
    # Equal to the top-1 choice of each router in an evaluation forward over the same tokens.
    model.eval()
    seen = [[], []]
    hooks = [
        b.moe.router.register_forward_hook(lambda m, i, o, k=k: seen[k].append(o.experts_TK[:, 0]))
        for k, b in enumerate(model.blocks)
    ]
    for w in rec.windows:
        model(w)
    for h in hooks:
        h.remove()
    assert torch.equal(a, torch.stack([torch.cat(s) for s in seen]))
    logger = Rows()
    result = rec.finish(logger)
    assert logger.rows[0][0] == 5 and "fluct.layer1.changing_after_50pct" in logger.rows[0][1]
    assert result.last_step_LN.shape == (2, 30)
    assert (tmp_path / PLOT_FILE).stat().st_size > 0
    lines = (tmp_path / SNAPSHOT_FILE).read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [2, 4, 5]
    # A resume at step 4 keeps the record up to 4 and drops what came after.
    again = _recorder(tmp_path, resume_step=4)
    assert again.steps == [2, 4] and torch.equal(again.snapshots[1], rec.snapshots[1])
    assert len((tmp_path / SNAPSHOT_FILE).read_text().splitlines()) == 2
    # A fresh run starts the record anew.
    _recorder(tmp_path)
    assert not (tmp_path / SNAPSHOT_FILE).exists()


def test_other_ranks_run_the_forwards_but_keep_and_write_nothing(tmp_path):
    model = _model()
    rec = _recorder(tmp_path, is_main=False)
    calls = []
    hook = model.blocks[0].moe.router.register_forward_hook(lambda *a: calls.append(1))
    rec.maybe_record(2, model)
    hook.remove()
    assert len(calls) == len([r for w in rec.windows for r in w.split(3)])
    assert rec.steps == [] and not (tmp_path / SNAPSHOT_FILE).exists() and rec.finish(Rows()) is None


def test_disabled_recorder_does_nothing(tmp_path):
    rec = FluctuationRecorder(
        every=0,
        num_tokens=30,
        stream=torch.arange(50),
        seq_len=8,
        batch_size=3,
        max_steps=5,
        run_dir=tmp_path,
        is_main=True,
    )
    rec.maybe_record(5, None)
    assert rec.finish(Rows()) is None and not list(tmp_path.iterdir())
