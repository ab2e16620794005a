"""msmoe-plan's step-time model: what the census counts per call, the cluster's rates, and the check against a run.

The counts are checked by hand on small calls and against the real optimiser step; the rates' arithmetic by
hand; `msmoe-bench plan-check` end to end at one rank (its figures are wall-clock: no threshold here; the
comparison at 1, 2 and 4 ranks is in docs/planning.md).
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from msmoe_dist.config import load_config
from msmoe_dist.models.build import build_model
from msmoe_dist.parallel.layout import ParallelLayout
from msmoe_dist.plan.census import _OpCounter, gemm_bucket, take_census
from msmoe_dist.plan.cluster import load_cluster
from msmoe_dist.plan.memory import Setting
from msmoe_dist.plan.step_time import (
    DEEPSPEED_STEP_WORK,
    elementwise_seconds,
    gemm_seconds,
    optimizer_seconds,
    overhead_seconds,
    plan_step,
)
from msmoe_dist.train.optim import build_optimizer, param_groups

QUICKSTART = "configs/quickstart.yaml"


def test_the_counter_sorts_each_call_into_matmul_flops_by_size_class_bytes_and_random_numbers():
    a, w, x = torch.randn(64, 32), torch.randn(32, 16), torch.randn(8, 256, 16)
    counter = _OpCounter()
    with counter:
        y = a @ w  # mm [64, 32] x [32, 16]: smallest side 16
        torch.bmm(x, x.transpose(1, 2))  # bmm [8, 256, 16] x [8, 16, 256]: the batch is not a side
        z = torch.relu(y)  # element-wise: reads and writes 64 x 16 fp32
        torch.empty(64, 16).bernoulli_(0.9)  # an allocation (no traffic), then 1,024 random numbers
        z.view(-1)  # a view: no traffic
    assert counter.work == {
        "other.gemm16": 2 * 64 * 32 * 16 + 2 * 8 * 256 * 16 * 256,
        "other.bytes": 2 * 64 * 16 * 4,
        "other.rng": 64 * 16,
    }
    assert counter.calls == 7  # mm, transpose, bmm, relu, empty, bernoulli_, view
    assert [gemm_bucket(d) for d in (1, 15, 16, 17, 100, 5000)] == [1, 8, 16, 16, 64, 1024]


def test_the_census_counts_the_real_optimiser_step():
    """Calls and bytes per parameter of the census's stand-in step equal those of the real optimiser on the real
    model (AdamW with clipping, the second step: the first allocates the state)."""
    cfg = load_config(QUICKSTART, ["model.num_layers=2"])
    work = take_census(cfg, 200, ParallelLayout(1, 1), 1).work
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.moe, cfg.momentum, cfg.vision, 200)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.ones_like(p)
    opt = build_optimizer(param_groups(model, cfg.optim.weight_decay), cfg.optim)
    counter = _OpCounter()
    for counted in (False, True):
        with counter if counted else torch.no_grad():
            torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
            opt.step()
    assert cfg.optim.grad_clip > 0 and work["optim.params"] == sum(p.numel() for p in params)
    assert work["optim.calls"] == counter.calls
    # The clipping's norm reads each gradient once more per tensor; the stand-ins have their own sizes, so the
    # bytes agree per element to the small per-tensor terms (the norm's partial results).
    assert work["optim.bytes"] == pytest.approx(counter.work["other.bytes"], rel=0.01)


def _cluster(**changes):
    return replace(load_cluster("h100-ib400"), **changes)


def test_rates_turn_counts_into_seconds_by_hand():
    c = _cluster(sustained_tflops=1.0, gemm_efficiency={16: 0.25, 64: 0.75}, elementwise_gbps=8.0, rng_gelems=0.5)
    assert [c.gemm_fraction(b) for b in (8, 16, 32, 64, 1024)] == [0.25, 0.25, 0.5, 0.75, 0.75]
    assert replace(c, gemm_efficiency={}).gemm_fraction(16) == 1.0
    work = {"other.gemm16": 1e12, "expert.gemm64": 3e12, "other.bytes": 8e9, "expert.bytes": 4e9, "other.rng": 1e9}
    # imbalance f = 2 doubles the experts' part only
    assert gemm_seconds(work, c, 2.0) == pytest.approx((1e12 / 0.25e12 + 2 * 3e12 / 0.75e12, 1e12 + 6e12))
    assert elementwise_seconds(work, c, 2.0) == pytest.approx(1.0 + 2 * 0.5 + 2.0)
    no_rng_rate = replace(c, rng_gelems=0.0)  # random numbers as 4-byte writes at the element-wise bandwidth
    assert elementwise_seconds({"other.rng": 2e9}, no_rng_rate, 1.0) == pytest.approx(1.0)
    opt = {"optim.bytes": 80e9, "optim.params": 1e9, "optim.calls": 1000}
    cpu = replace(c, device="cpu", op_overhead_us=10.0)
    assert optimizer_seconds(opt, 0.5e9, cpu) == pytest.approx(80 * 0.5e9 / 8e9 + 1000 * 10e-6)
    assert optimizer_seconds(opt, 0.5e9, c) == pytest.approx(28 * 0.5e9 / (1e9 * c.mem_gbps))  # fused on GPU


def test_per_call_overhead_adds_on_a_cpu_and_hides_behind_the_math_on_a_gpu():
    cfg = load_config(QUICKSTART, ["model.num_layers=1"])
    c = take_census(cfg, 200, ParallelLayout(1, 1), 1)
    s = Setting(1, 1, 0, 1, "none", "fp32", "native", cfg.optim.name)
    cpu, gpu = _cluster(device="cpu", op_overhead_us=10.0), _cluster(op_overhead_us=10.0)
    assert overhead_seconds(c, s, cpu, 123.0) == pytest.approx(c.ops * 10e-6)
    grouped = c.ops - c.expert_ops + 40 * c.num_moe_layers  # the GPU runs each layer's experts as one grouped GEMM
    assert c.expert_ops > 40 and overhead_seconds(c, s, gpu, 0.0) == pytest.approx(grouped * 10e-6)
    assert overhead_seconds(c, s, gpu, 1.0) == 0.0  # asynchronous launches hide behind a second of math
    without = plan_step(c, s, replace(cpu, op_overhead_us=0.0), cfg.data.batch_size, 1)
    with_it = plan_step(c, s, cpu, cfg.data.batch_size, 1)
    assert with_it.memory_ops - without.memory_ops == pytest.approx(cfg.data.batch_size * c.ops * 10e-6)


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_deepspeed_adds_its_own_step_work_by_hand(stage):
    """Under DeepSpeed the optimiser part grows by DEEPSPEED_STEP_WORK (tests/distributed/test_deepspeed_step_work.py
    counts it on real engines): its bytes per parameter of the rank, and on a CPU its calls per parameter tensor."""
    cfg = load_config(QUICKSTART, ["model.num_layers=1"])
    c = take_census(cfg, 200, ParallelLayout(2, 2), 1)
    cpu, gpu = _cluster(device="cpu", op_overhead_us=10.0, elementwise_gbps=8.0), _cluster(op_overhead_us=10.0)
    per_param, per_tensor = DEEPSPEED_STEP_WORK[stage]
    params, tensors = c.dense_params + c.expert_params_rank, c.dense_tensors + c.expert_tensors
    for cluster, expected in (
        (cpu, per_param * params / 8e9 + per_tensor * tensors * 10e-6),
        (gpu, per_param * params / (1e9 * gpu.mem_gbps)),  # a GPU overlaps the launches
    ):
        ds = plan_step(c, Setting(2, 2, stage, 1, "none", "fp32", "deepspeed", cfg.optim.name), cluster, 4, 1)
        # the same partition without DeepSpeed's work: its optimiser step alone
        held = c.dense_params / (2 if stage else 1) + c.expert_params_rank
        assert ds.optimizer - optimizer_seconds(c.work, held, cluster) == pytest.approx(expected)


@pytest.mark.parametrize(
    "config, overrides",
    [
        (QUICKSTART, ["model.num_layers=1"]),
        # a V-MoE: its synthetic images, images/s (a test that the census runs its patches, not data.seq_len:
        # test_plan.py test_the_experts_run_the_routed_rows)
        ("configs/imagenet/tiny_synthetic.yaml", ["model.num_layers=2", "vision.synthetic_train_per_class=8"]),
    ],
)
def test_plan_check_runs_the_real_trainer_and_the_planner(cli, tmp_path, config, overrides):
    """One rank, a small model: the calibration file, the run's metrics and a prediction all exist."""
    out = tmp_path / "check"
    res = cli(
        "bench", "plan-check", "--config", config, *overrides, "--ranks", "1",
        "--steps", "6", "--log-every", "2", "--out", str(out), "--json", timeout=600,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    row = json.loads(res.stdout.strip().splitlines()[-1])["rows"][0]
    assert row["ranks"] == 1 and row["measured_s"] > 0 and row["predicted"]["serial"] > 0
    assert row["error"] == pytest.approx((row["predicted"]["serial"] - row["measured_s"]) / row["measured_s"])
    assert load_cluster(str(out / "cpu-local-1.yaml")).gemm_efficiency  # calibrated size classes
    assert (out / "run-1" / "metrics.jsonl").is_file()


@pytest.mark.parametrize("argv", [["--ranks", "one"], ["--ranks", "0"], ["--steps", "4", "--log-every", "2"]])
def test_plan_check_bad_input_is_one_line_exit_2(cli, tmp_path, argv):
    res = cli("bench", "plan-check", "--config", QUICKSTART, "--out", str(tmp_path / "o"), *argv, timeout=120)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert not (tmp_path / "o").exists()
