"""Trainer safety: a NaN/Inf loss stops the run and keeps the last good checkpoint intact."""

import json

import pytest
import torch
from conftest import tiny_lm_config

from msmoe_dist.checkpoint import latest_checkpoint, read_meta, torch_load
from msmoe_dist.train import tasks, trainer


def tiny_cfg(tmp_path, *extra):
    return tiny_lm_config(tmp_path, "train.max_steps=8", "momentum.kind=heavy_ball", *extra)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    real_build = tasks.build_model

    def poisoned(*args):
        model = real_build(*args)
        calls = {"n": 0}
        orig_forward = model.forward

        def forward(*args, **kwargs):
            out = orig_forward(*args, **kwargs)
            calls["n"] += 1
            if calls["n"] == 5:  # the 5th training step
                return type(out)(loss=out.loss * float("nan"), aux_loss=out.aux_loss, logits=None, stats=out.stats)
            return out

        model.forward = forward
        return model

    monkeypatch.setattr(tasks, "build_model", poisoned)
    cfg = tiny_cfg(tmp_path)
    with pytest.raises(trainer.NonFiniteLoss, match="step 5.*step_00000004"):
        trainer.run(cfg)
    ckpt = latest_checkpoint(tmp_path / "run" / "checkpoints")
    assert ckpt.name == "step_00000004"
    state = torch_load(ckpt / "state.pt")
    assert read_meta(ckpt).step == 4 and all(torch.isfinite(v).all() for v in state["model"].values())
    steps = [json.loads(x)["step"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 4


def test_ep_size_above_one_is_refused_on_one_process(tmp_path):
    with pytest.raises(trainer.TrainError, match="parallel.ep_size=2 needs several processes"):
        trainer.run(tiny_cfg(tmp_path, "parallel.ep_size=2"))


def test_vocab_size_smaller_than_data_is_refused(tmp_path):
    with pytest.raises(trainer.TrainError, match="model.vocab_size=10"):
        trainer.run(tiny_cfg(tmp_path, "model.vocab_size=10"))
