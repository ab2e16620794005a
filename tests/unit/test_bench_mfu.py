"""MFU arithmetic (bench/mfu.py) on the CPU, with a given peak; the model benchmark's tokens/s and MFU."""

from __future__ import annotations

import argparse

import pytest
import torch

from msmoe_dist.bench import mfu
from msmoe_dist.bench.model_step import run_model_bench
from msmoe_dist.config.schema import ModelConfig, MoEConfig, MomentumConfig
from msmoe_dist.models import MoELanguageModel
from msmoe_dist.moe import is_expert_param


def test_flops_per_token_and_mfu():
    # 6 N + 12 L d S: N = 1e6, 2 layers, d 64, seq 128
    assert mfu.flops_per_token(1e6, 2, 64, 128) == 6e6 + 12 * 2 * 64 * 128
    # 1e4 tokens/s x 1e9 FLOPs/token = 1e13 FLOP/s = 10 TFLOP/s of a 100 TFLOP/s peak
    assert mfu.mfu(1e4, 1e9, 100.0) == pytest.approx(0.1)
    with pytest.raises(ValueError):
        mfu.mfu(1.0, 1.0, 0.0)


@pytest.mark.parametrize(
    "name,peak",
    [
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H200", 989.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
    ],
)
def test_peak_lookup(name, peak):
    assert mfu.lookup_peak_tflops(name) == peak


def test_unknown_gpu_and_cpu_need_a_given_peak():
    with pytest.raises(mfu.PeakUnknown, match="--peak-tflops"):
        mfu.lookup_peak_tflops("NVIDIA GeForce GTX 1080")
    assert mfu.peak_tflops("cpu")[0] is None
    assert mfu.peak_tflops("cpu", 123.0) == (123.0, "--peak-tflops")


def _model(tie: bool):
    mcfg = ModelConfig(num_layers=2, d_model=32, num_heads=2, max_seq_len=16, tie_embeddings=tie)
    moe = MoEConfig(num_experts=4, top_k=2, expert_ffn_dim=64)
    torch.manual_seed(0)
    return MoELanguageModel(mcfg, moe, MomentumConfig(kind="heavy_ball"), 100)


@pytest.mark.parametrize("tie", [False, True])
def test_active_params_count_a_top_k_share_of_the_experts(tie):
    model = _model(tie)
    params = {id(p): p for p in model.parameters()}.values()
    expert = sum(p.numel() for p in params if is_expert_param(p))
    emb = model.tok_emb.weight.numel() + (model.pos_emb.weight.numel() if model.pos_emb is not None else 0)
    total = sum(p.numel() for p in params)
    counts = mfu.active_params(model, top_k=2, num_experts=4, tied_output=tie)
    assert counts["expert"] == expert and counts["expert"] == 2 * (32 * 64 * 2 * 4 + 64 * 4 + 32 * 4)
    assert counts["embedding"] == emb and counts["total"] == total
    assert counts["dense"] == total - expert - emb
    want = counts["dense"] + expert * 2 / 4 + (model.tok_emb.weight.numel() if tie else 0)
    assert counts["active"] == want
    with pytest.raises(ValueError):
        mfu.active_params(model, top_k=5, num_experts=4)


def test_mfu_report_with_a_given_peak():
    model = _model(False)
    rep = mfu.mfu_report(
        model,
        top_k=2,
        num_experts=4,
        layers=2,
        d_model=32,
        seq_len=16,
        tokens_per_s=1000.0,
        device="cpu",
        peak_override=1.0,
    )
    fpt = 6 * rep["params"]["active"] + 12 * 2 * 32 * 16
    assert rep["flops_per_token"] == fpt
    assert rep["mfu"] == pytest.approx(1000.0 * fpt / 1e12)
    assert rep["peak_source"] == "--peak-tflops"


def test_model_bench_reports_tokens_per_s_and_mfu():
    args = argparse.Namespace(
        layers=1,
        d_model=32,
        ffn=64,
        experts=4,
        top_k=2,
        batch=2,
        seq=16,
        vocab=64,
        repeats=1,
        warmup=0,
        device="cpu",
        dtype="fp32",
        peak_tflops=1.0,
        json=True,
    )
    res = run_model_bench(args)
    for kind in ("none", "heavy_ball", "adam", "robust"):
        assert res["tokens_per_s"][kind] == pytest.approx(32 / (res["step_ms"][kind] / 1e3))
        assert res["mfu"][kind] == pytest.approx(res["tokens_per_s"][kind] * res["flops"]["flops_per_token"] / 1e12)
    args.peak_tflops = None
    assert all(v is None for v in run_model_bench(args)["mfu"].values())  # no peak for the CPU


def test_sweep_on_cuda_without_enough_gpus_launches_nothing(tmp_path, monkeypatch):
    from msmoe_dist.bench import sweep

    monkeypatch.setattr(sweep, "_cuda_device_count", lambda: 1)
    monkeypatch.setattr(sweep.subprocess, "run", lambda *a, **k: pytest.fail("launched"))
    args = argparse.Namespace(
        ep=[2],
        experts=[8],
        tokens=[256],
        momentum=["none"],
        seq=128,
        repeats=1,
        out=str(tmp_path),
        timeout=10.0,
        device="cuda",
        json=True,
    )
    res = sweep.run_sweep(args)
    assert res["points"] == 0 and res["failures"][0]["error"] == "needs 2 GPUs, 1 visible"


def test_analytic_flops_agree_with_torch_flop_counter():
    """One forward+backward counted by torch's FlopCounterMode (the math attention kernel, whose
    matmuls it sees) against tokens x (6 N_active + 12 L d S): within 2%, the gap being biases and
    norm weights, which are in N_active but do no GEMM. Counting all experts instead of the top-k
    share would be off by about 40% here."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    L, d, S, B = 2, 64, 128, 2
    mcfg = ModelConfig(num_layers=L, d_model=d, num_heads=2, max_seq_len=S, tie_embeddings=False, output_layer="full")
    torch.manual_seed(0)
    model = MoELanguageModel(mcfg, MoEConfig(num_experts=4, top_k=2, expert_ffn_dim=128), MomentumConfig(), 500)
    idx = torch.randint(0, 500, (B, S + 1), generator=torch.Generator().manual_seed(0))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        out = model(idx[:, :-1], idx[:, 1:])
        (out.loss + out.aux_loss).backward()
    analytic = B * S * mfu.flops_per_token(mfu.active_params(model, 2, 4)["active"], L, d, S)
    assert counter.get_total_flops() == pytest.approx(analytic, rel=0.02)
