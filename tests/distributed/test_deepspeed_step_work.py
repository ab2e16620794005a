"""The planner against real DeepSpeed engines at 2 ranks (EP 2), ZeRO 0, 1 and 2, counted by
bench/deepspeed_work.py: DeepSpeed's own per-step work (plan/step_time.DEEPSPEED_STEP_WORK, counted with the
planner's op counter: a DeepSpeed upgrade or an engine change that moves it fails here) and the weights,
gradients and optimiser state the engine holds (plan/memory.model_state_bytes: exact)."""

from __future__ import annotations

import pytest

from msmoe_dist.config import load_config
from msmoe_dist.plan.memory import Setting, model_state_bytes
from msmoe_dist.plan.search import CensusCache
from msmoe_dist.plan.step_time import DEEPSPEED_STEP_WORK

pytest.importorskip("deepspeed")

QUICKSTART = "configs/quickstart.yaml"
TINY = ["model.num_layers=2", "model.d_model=64", "moe.expert_ffn_dim=128", "model.vocab_size=500", "data.batch_size=4"]


def _count(rank, world, tmp):
    from msmoe_dist.bench.deepspeed_work import count_step_work

    return [count_step_work(QUICKSTART, stage, TINY, f"{tmp}/r{rank}s{stage}") for stage in (0, 1, 2)]


@pytest.fixture(scope="module")
def counts(tmp_path_factory):
    from dist_harness import run_distributed

    return run_distributed(_count, 2, str(tmp_path_factory.mktemp("ds")), timeout_s=300.0)


def test_counted_deepspeed_work_matches_the_planners_figures(counts):
    for got in counts[0]:
        per_param, per_tensor = DEEPSPEED_STEP_WORK[got["zero_stage"]]
        assert got["bytes_per_param"] == pytest.approx(per_param, rel=0.2), got
        assert got["calls_per_tensor"] == pytest.approx(per_tensor, rel=0.25), got
    # ZeRO 1/2 copy every gradient into a bucket and the fp32 master back into the weights; ZeRO 0 only buckets
    assert counts[0][1]["bytes_per_param"] > 2 * counts[0][0]["bytes_per_param"]


def test_planned_weights_gradients_and_optimiser_state_equal_what_deepspeed_holds(counts):
    """Weights and optimiser state on every rank; the gradients on the rank that keeps most (ZeRO 1/2 keep the
    whole gradient of every tensor reaching into the rank's partition)."""
    cfg = load_config(QUICKSTART, TINY)
    census = CensusCache(cfg, 500, flash_attention=False).get(4, 2)  # what msmoe-plan uses
    for stage in (0, 1, 2):
        setting = Setting(2, 2, stage, 4, "none", "fp32", "deepspeed", cfg.optim.name)
        params, grads, optimizer = model_state_bytes(census, setting)
        ranks = [rank_counts[stage] for rank_counts in counts]
        for got in ranks:
            assert (params, optimizer) == (got["param_bytes"], got["optimizer_bytes"]), got
        assert grads == max(got["grad_bytes"] for got in ranks), ranks
    # ZeRO 1 partitions the gradients here, as ZeRO 2 does (DeepSpeed 0.19 with contiguous_gradients)
    assert counts[0][1]["grad_bytes"] < counts[0][0]["grad_bytes"]


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--config", "no/such.yaml"], "config file not found"),
        (["--config", QUICKSTART, "moe.top_k=banana"], "moe.top_k"),
    ],
)
def test_bad_config_is_one_line_exit_2(capsys, argv, needle):
    from msmoe_dist.bench.deepspeed_work import main

    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1
