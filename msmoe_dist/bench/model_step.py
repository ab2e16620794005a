"""Full-model training-step time of each momentum variant against plain SMoE, same run."""

from __future__ import annotations

import argparse
import statistics

import torch

from msmoe_dist.bench.common import header, machine_info, timed_rounds, train_step_fn
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
    for kind in KINDS:
        torch.manual_seed(0)  # identical weights for every variant
        model = MoELanguageModel(mcfg, moe_cfg, MomentumConfig(kind=kind), args.vocab).to(device)
        steps[kind] = train_step_fn(model, x, y, device)
    rounds = timed_rounds(steps, args.repeats, args.warmup, device)
    ms = {k: statistics.median(v) for k, v in rounds.items()}
    base = ms["none"]
    shapes = {
        "layers": args.layers,
        "d_model": args.d_model,
        "ffn": args.ffn,
        "experts": args.experts,
        "top_k": args.top_k,
        "tokens": args.batch * args.seq,
        "vocab": args.vocab,
    }
    return {
        **header("model_step", shapes, machine_info(device)),
        "step_ms": ms,
        "ratio_vs_smoe": {k: v / base for k, v in ms.items()},
    }
