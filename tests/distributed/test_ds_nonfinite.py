"""The DeepSpeed engine's NaN guard on gloo ranks (issue 'Nothing lost, nothing silent', item 5): a non-finite
gradient norm stops every rank before the step (ZeRO 0), and unusable weights on one rank make every rank
refuse to write checkpoint files (one all-reduce), so the Checkpointer never seals them."""

import math

import pytest
import torch

from msmoe_dist.data import train_batch
from msmoe_dist.moe import is_expert_param
from msmoe_dist.train.engine import NonFiniteLoss
from tests.distributed.test_ds_engine import STREAM, B, S, _cfg, _engine


def _worker(rank, world, stage, tmp):
    eng = _engine(_cfg("parallel.ep_size=2", f"parallel.zero_stage={stage}"), rank, world)
    got = []
    # 1. every weight finite: the files are written
    step_dir = f"{tmp}/s{stage}_ok"
    if rank == 0:
        import os

        os.makedirs(step_dir, exist_ok=True)
    eng.barrier()
    from pathlib import Path

    eng.save_files(Path(step_dir))
    got.append("saved")
    # 2. one expert weight of rank 1 overflows: every rank refuses, before writing anything
    bad_dir = Path(f"{tmp}/s{stage}_bad")
    if rank == 0:
        bad_dir.mkdir()
    eng.barrier()
    expert = next(p for p in eng.model.parameters() if is_expert_param(p))
    saved = expert.detach().clone()
    if rank == 1:
        with torch.no_grad():
            expert[0].fill_(3e28)
    try:
        eng.save_files(bad_dir)
        got.append("saved")
    except NonFiniteLoss:
        got.append("refused")
    got.append(sorted(p.name for p in bad_dir.iterdir()))
    with torch.no_grad():
        expert.copy_(saved)
    # 3. an infinite gradient with a finite loss (ZeRO 0: checked before the step; ZeRO 1/2: DeepSpeed
    # computes the norm inside its step, so the check comes after it)
    if True:
        dense = next(p for p in eng.model.parameters() if not is_expert_param(p))
        dense.register_hook(lambda g: g * math.inf)
        before = [p.detach().clone() for p in eng.model.parameters()]
        try:
            eng.train_step([train_batch(STREAM, 0, B, S, 0, rank, world)], collect_stats=False)
            got.append("stepped")
        except NonFiniteLoss as exc:
            got.append(str(exc).split(" (")[0].replace("nan", "inf"))
        got.append(stage > 0 or all(torch.equal(a, b) for a, b in zip(eng.model.parameters(), before, strict=True)))
    return got


@pytest.mark.parametrize("stage", [0, 2])
def test_ds_engine_refuses_nonfinite_grad_norm_and_weights(stage, tmp_path, run_distributed):
    results = run_distributed(_worker, 2, stage, str(tmp_path), timeout_s=300)
    for got in results:
        assert got == ["saved", "refused", [], "gradient norm became inf", True], got
