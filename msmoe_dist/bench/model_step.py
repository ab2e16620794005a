"""Full-model training-step time of each momentum variant against plain SMoE, same run; tokens/s and
model FLOPs utilisation (MFU, bench/mfu.py) of each.

On ``--device cuda`` every step is timed by CUDA events (bench/common.timed_rounds), and the MFU is
taken against the GPU's published dense bf16 peak (H100/H200/A100) or ``--peak-tflops``.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from msmoe_dist.bench.common import header, machine_info, timed_rounds, train_step_fn
from msmoe_dist.bench.mfu import mfu_report
from msmoe_dist.config.schema import ModelConfig, MoEConfig, MomentumConfig
from msmoe_dist.models import MoELanguageModel

KINDS = ("none", "heavy_ball", "adam", "robust")


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--ffn", type=int, default=1024)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"), help="bf16: autocast (weights stay fp32)")
    p.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="peak TFLOP/s for the MFU (default: the published dense bf16 peak of an H100/H200/A100; "
        "no MFU on the CPU without it)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def run_model_bench(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    mcfg = ModelConfig(
        num_layers=args.layers, d_model=args.d_model, num_heads=max(1, args.d_model // 64), max_seq_len=args.seq
    )
    moe_cfg = MoEConfig(num_experts=args.experts, top_k=args.top_k, expert_ffn_dim=args.ffn)
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=g).to(device)
    x, y = idx[:, :-1], idx[:, 1:]
    steps = {}
    model = None
    bf16 = getattr(args, "dtype", "fp32") == "bf16"
    for kind in KINDS:
        torch.manual_seed(0)  # identical weights for every variant
        model = MoELanguageModel(mcfg, moe_cfg, MomentumConfig(kind=kind), args.vocab).to(device)
        steps[kind] = train_step_fn(model, x, y, device, bf16=bf16)
    rounds = timed_rounds(steps, args.repeats, args.warmup, device)
    ms = {k: statistics.median(v) for k, v in rounds.items()}
    base = ms["none"]
    tokens = args.batch * args.seq
    tokens_per_s = {k: tokens / (v / 1e3) for k, v in ms.items()}
    assert model is not None  # the momentum variants share the network's shape, so any one of them counts
    mfu_base = mfu_report(
        model,
        top_k=args.top_k,
        num_experts=args.experts,
        layers=args.layers,
        d_model=args.d_model,
        seq_len=args.seq,
        tokens_per_s=tokens_per_s["none"],
        device=device,
        peak_override=getattr(args, "peak_tflops", None),
        tied_output=mcfg.tie_embeddings,
    )
    peak = mfu_base["peak_tflops"]
    shapes = {
        "layers": args.layers,
        "d_model": args.d_model,
        "ffn": args.ffn,
        "experts": args.experts,
        "top_k": args.top_k,
        "tokens": tokens,
        "vocab": args.vocab,
        "dtype": "bf16" if bf16 else "fp32",
        "device": device.type,
    }
    fpt = mfu_base["flops_per_token"]
    return {
        **header("model_step", shapes, machine_info(device)),
        "step_ms": ms,
        "ratio_vs_smoe": {k: v / base for k, v in ms.items()},
        "tokens_per_s": tokens_per_s,
        "mfu": {k: (None if peak is None else t * fpt / (peak * 1e12)) for k, t in tokens_per_s.items()},
        "flops": {k: v for k, v in mfu_base.items() if k != "mfu" and k != "model_tflops_per_s"},
        "timing": "CUDA events" if device.type == "cuda" else "time.perf_counter",
    }
