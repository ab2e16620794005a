"""msmoe-plan: the census of the real model, the exact model-state bytes, and one-line refusals of bad input."""

from __future__ import annotations

import json

import pytest
import torch

from msmoe_dist.config import load_config
from msmoe_dist.models.build import build_model
from msmoe_dist.moe import MoELayer
from msmoe_dist.parallel.layout import ParallelLayout
from msmoe_dist.plan.census import take_census
from msmoe_dist.plan.cli import main
from msmoe_dist.plan.memory import DS_REDUCE_BUCKET, Setting, model_state_bytes, zero_bucket_bytes
from msmoe_dist.plan.search import CensusCache
from msmoe_dist.train.optim import build_optimizer, param_groups

QUICKSTART = "configs/quickstart.yaml"
SMALL = "configs/wikitext103/momentum_smoe_small.yaml"


def _real_state_bytes(cfg, vocab: int, layout: ParallelLayout, rank: int) -> int:
    """Build the real model on CPU, keep `rank`'s experts as expert parallelism does, give every parameter a
    gradient, take one optimiser step (Adam allocates its state there) and count every tensor's bytes."""
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.moe, cfg.momentum, cfg.vision, vocab)
    for layer in (m for m in model.modules() if isinstance(m, MoELayer)):
        layer.experts.keep_experts(layout.local_experts(rank, cfg.moe.num_experts))
    opt = build_optimizer(param_groups(model, cfg.optim.weight_decay), cfg.optim)
    params = {id(p): p for p in model.parameters() if p.requires_grad}
    for p in params.values():
        p.grad = torch.zeros_like(p)
    opt.step()
    total = sum(p.nbytes + p.grad.nbytes for p in params.values())
    for state in opt.state.values():
        total += sum(t.nbytes for t in state.values() if torch.is_tensor(t))
    return total


@pytest.mark.parametrize(
    ("path", "vocab", "overrides", "ep_size"),
    [
        (QUICKSTART, 500, [], 1),
        (SMALL, 267_735, [], 1),
        (SMALL, 267_735, [], 2),
        (QUICKSTART, 500, ["moe.num_experts=16", "optim.name=sgd"], 4),
        (QUICKSTART, 500, ["moe.num_experts=16", "momentum.learnable=per_layer"], 2),
        ("configs/imagenet/tiny_synthetic.yaml", 10, [], 2),  # a V-MoE (vocab: its classes)
    ],
)
def test_predicted_model_state_bytes_equal_the_real_ones(path, vocab, overrides, ep_size):
    cfg = load_config(path, overrides)
    layout = ParallelLayout(ep_size, ep_size)
    if ep_size == 1:
        census = take_census(cfg, vocab, layout, 1)
    else:  # the planner's path: the experts of an EP-1 census, sliced to rank 0's share by the layout
        census = CensusCache(cfg, vocab, flash_attention=True).get(1, ep_size)
    setting = Setting(ep_size, ep_size, 0, 1, "none", "fp32", "native", cfg.optim.name)
    predicted = sum(model_state_bytes(census, setting))
    for rank in range(ep_size):
        assert _real_state_bytes(cfg, vocab, layout, rank) == predicted


@pytest.mark.parametrize("overrides", [["moe.balance_loss_coef=0"], []])
def test_saved_activations_equal_the_real_forward(overrides):
    """Dropless routing saves T*K rows whatever the assignment: the census on fake tensors with a balanced
    router must save the bytes the real model saves on CPU with its own router. Not to the byte: the real
    dispatcher's sort leaves one or two [T*K] index tensors of its own (1.5 KB of 5.3 MB here)."""
    cfg = load_config(QUICKSTART, ["model.num_layers=2", "moe.num_experts=4", "model.dropout=0.1", *overrides])
    census = take_census(cfg, 300, ParallelLayout(1, 1), 3, flash_attention=False)
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.moe, cfg.momentum, cfg.vision, 300)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    idx = torch.randint(0, 300, (3, cfg.data.seq_len))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(idx, idx)
    assert sum(seen.values()) == pytest.approx(census.saved_bytes, rel=1e-3)
    assert census.routed_rows == 3 * cfg.data.seq_len * cfg.moe.top_k


def test_census_is_linear_in_the_micro_batch():
    """FLOPs, saved bytes, rows and calls grow linearly with the micro-batch; parameters do not change."""
    cfg = load_config(QUICKSTART, ["model.num_layers=2"])
    layout = ParallelLayout(1, 1)
    c1, c2, c4 = (take_census(cfg, 200, layout, mb) for mb in (1, 2, 4))

    def lerp(a, b):  # the value at micro-batch 4 from those at 1 and 2
        return a + 3 * (b - a)

    assert {k: lerp(c1.flops[k], c2.flops[k]) for k in c1.flops} == c4.flops
    assert lerp(c1.saved_bytes, c2.saved_bytes) == c4.saved_bytes
    assert lerp(c1.routed_rows, c2.routed_rows) == c4.routed_rows and lerp(c1.ops, c2.ops) == c4.ops
    assert (c1.dense_params, c1.expert_params_rank) == (c4.dense_params, c4.expert_params_rank)
    total_gemm = [sum(v for k, v in c.work.items() if ".gemm" in k) for c in (c1, c2, c4)]
    assert lerp(total_gemm[0], total_gemm[1]) == total_gemm[2]


@pytest.mark.parametrize(
    "path, vocab",
    [(QUICKSTART, 200), ("configs/imagenet/tiny_synthetic.yaml", 10)],  # an LM and a V-MoE
)
def test_the_experts_run_the_routed_rows(path, vocab):
    """Expert FLOPs = the routed rows' two matmuls, forward and twice in backward: 12 rows D F per MoE layer.
    (The V-MoE's experts once ran data.seq_len tokens per image instead of its patches: 7.5x too many here.)"""
    cfg = load_config(path, [])
    c = take_census(cfg, vocab, ParallelLayout(1, 1), 4)
    assert c.routed_rows == 4 * c.seq_len * cfg.moe.top_k
    assert c.flops["expert"] == 12 * c.routed_rows * cfg.model.d_model * cfg.moe.expert_ffn_dim * c.num_moe_layers


def test_capacity_rows_are_the_padded_all_to_all_under_ep():
    cfg = load_config(QUICKSTART, ["moe.capacity_factor=1.25", "model.num_layers=1"])
    c = take_census(cfg, 200, ParallelLayout(4, 4), 2)
    T, K, E = 2 * cfg.data.seq_len, cfg.moe.top_k, cfg.moe.num_experts
    C = -(-125 * T * K // (100 * E))  # ceil(1.25 T K / E)
    assert c.capacity_rows == E * C and c.routed_rows == E * C


def _run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_plan_json_and_plots(capsys, tmp_path):
    code, out, err = _run(
        capsys, "--config", QUICKSTART, "--gpus", "16", "--vocab", "500", "--json", "--plot", str(tmp_path)
    )
    assert code == 0, err
    result = json.loads(out)
    best = result["best"]
    assert best["fits"] and best["tokens_per_s"] > 0 and 16 % best["ep_size"] == 0
    assert sorted(p.rsplit("/", 1)[1] for p in result["plots"]) == ["breakdown.png", "memory.png", "step_time.png"]
    assert all((tmp_path / n).stat().st_size > 1000 for n in ("breakdown.png", "memory.png", "step_time.png"))


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--gpus", "8", "--cluster", "h900-ib9"], "unknown cluster preset 'h900-ib9'"),
        (["--gpus", "4", "--ep-size", "8"], "--gpus 4 is not divisible by parallel.ep_size=8"),
        (["--gpus", "12"], "--gpus 12 is not divisible by --gpus-per-node 8"),
        (["--gpus", "8", "--imbalance", "0.5"], "--imbalance must be >= 1"),
    ],
)
def test_bad_input_is_one_line_exit_2(capsys, argv, needle):
    code, out, err = _run(capsys, "--config", QUICKSTART, "--vocab", "500", *argv)
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1 and out == ""


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (lambda d: d.pop("net_a2a_gbps"), "missing key 'net_a2a_gbps'"),
        (lambda d: d.update(sustained_tflops="fast"), "key 'sustained_tflops' must be a number"),
        (lambda d: d.update(gpus_per_node=0), "key 'gpus_per_node' must be an integer >= 1"),
        (lambda d: d.update(nvlink_gbps=1.0), "unknown key 'nvlink_gbps'"),
    ],
)
def test_malformed_cluster_file_names_the_key(capsys, tmp_path, edit, needle):
    import yaml

    from msmoe_dist.plan.cluster import cluster_to_yaml, load_cluster

    data = yaml.safe_load(cluster_to_yaml(load_cluster("h100-ib400")))
    edit(data)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    code, _, err = _run(capsys, "--config", QUICKSTART, "--vocab", "500", "--gpus", "8", "--cluster", str(path))
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1


def test_a_config_that_fits_nowhere_says_by_how_much_and_what_would(capsys, tmp_path):
    from dataclasses import replace

    from msmoe_dist.plan.cluster import cluster_to_yaml, load_cluster

    tiny = replace(load_cluster("h100-ib400"), gpu_memory_gib=0.005)
    path = tmp_path / "tiny.yaml"
    path.write_text(cluster_to_yaml(tiny))
    code, _, err = _run(capsys, "--config", QUICKSTART, "--vocab", "500", "--gpus", "8", "--cluster", str(path))
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "no configuration fits on 8 x h100-ib400" in err and "GiB over" in err and "it would fit" in err


def test_presets_load_and_name_their_sources():
    from msmoe_dist.plan.cluster import load_cluster, preset_names

    assert {"h100-ib400", "h200-ib400", "a100-ib200"} <= set(preset_names())
    for name in ("h100-ib400", "h200-ib400", "a100-ib200"):
        assert "datasheet" in load_cluster(name).sources


def test_calibrate_writes_a_cluster_file_the_planner_uses(tmp_path, capsys):
    """msmoe-bench calibrate: measured figures (positive, finite) in a file that loads and plans."""
    import argparse
    import math

    from msmoe_dist.bench.calibrate import run_calibrate
    from msmoe_dist.plan.cluster import load_cluster

    out = tmp_path / "cpu-local.yaml"
    args = argparse.Namespace(output=str(out), ranks=2, repeats=1, cpu_time=True, threads=1, memory_gib=4.0)
    figures = run_calibrate(args)
    cluster = load_cluster(str(out))
    assert cluster.name == "cpu-local" and cluster.device == "cpu" and cluster.gpus_per_node == 2
    for key in ("gemm_tflops", "mem_gbps", "a2a_gbps", "op_overhead_us"):
        assert 0 < figures[key] < math.inf
    assert cluster.sustained_tflops == figures["gemm_tflops"] and cluster.net_a2a_gbps == figures["a2a_gbps"]
    code, _, err = _run(capsys, "--config", QUICKSTART, "--vocab", "500", "--gpus", "2", "--cluster", str(out))
    assert code == 0, err


@pytest.mark.parametrize("dtype, w", [("fp32", 4), ("bf16", 2)])
def test_zero_1_and_2_hold_deepspeeds_whole_reduce_bucket_on_a_gpu(dtype, w):
    """DeepSpeed allocates reduce_bucket_size elements of the gradient dtype at ZeRO 1 as at ZeRO 2
    (stage_1_and_2.py setup_buckets, with contiguous_gradients), whatever the model's size; a CPU commits
    only the pages its gradients write."""
    c = take_census(load_config(QUICKSTART, ["model.num_layers=1"]), 200, ParallelLayout(2, 2), 1)
    rank_params = c.dense_params + c.expert_params_rank
    for stage, expected in ((0, 0), (1, DS_REDUCE_BUCKET * w), (2, DS_REDUCE_BUCKET * w)):
        s = Setting(2, 2, stage, 1, "none", dtype, "deepspeed", "adamw")
        assert zero_bucket_bytes(c, s) == expected
        assert zero_bucket_bytes(c, s, "cpu") == min(expected, rank_params * w)
    assert zero_bucket_bytes(c, Setting(1, 1, 0, 1, "none", dtype, "native", "adamw")) == 0
