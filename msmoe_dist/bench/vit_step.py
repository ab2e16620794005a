"""Training-step throughput (images/s) of V-MoE and its momentum variants, same run, same weights.

The model comes from an ImageNet config (default: ViT-S/32 V-MoE, configs/imagenet/vmoe_s32.yaml);
each variant changes only momentum.kind (and its coefficients, from the matching config file).
Random images of the configured size; one AdamW step per measurement.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
from pathlib import Path

import torch

from msmoe_dist.bench.common import header, machine_info, timed_rounds, train_step_fn

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "imagenet"
VARIANTS = {
    "none": "vmoe_s32.yaml",
    "heavy_ball": "momentum_vmoe_s32.yaml",
    "adam": "adam_vmoe_s32.yaml",
    "robust": "robust_vmoe_s32.yaml",
}


def add_vit_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        default=str(CONFIGS / "vmoe_s32.yaml"),
        help="model config (default: the ViT-S/32 V-MoE of configs/imagenet)",
    )
    p.add_argument("--batch", type=int, default=32, help="images per step (default 32)")
    p.add_argument(
        "--variants",
        default="none,heavy_ball,adam,robust",
        help="comma-separated momentum.kind values to time (default all four)",
    )
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"), help="bf16: autocast (weights stay fp32)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def _momentum_of(kind: str):
    from msmoe_dist.config.loader import load_config

    path = CONFIGS / VARIANTS[kind]
    return load_config(path, []).momentum if path.exists() else None


def run_vit_bench(args: argparse.Namespace) -> dict:
    from msmoe_dist.config.loader import load_config
    from msmoe_dist.models import VisionMoE

    cfg = load_config(args.config, [])
    device = torch.device(args.device)
    kinds = [k.strip() for k in args.variants.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in VARIANTS]
    if unknown or "none" not in kinds:
        raise SystemExit(
            f"msmoe-bench vit: --variants must include none (the baseline) and only "
            f"{', '.join(VARIANTS)}; got {args.variants}"
        )
    g = torch.Generator().manual_seed(0)
    v = cfg.vision
    x = torch.randn(args.batch, 3, v.image_size, v.image_size, generator=g).to(device)
    y = torch.randint(0, v.num_classes, (args.batch,), generator=g).to(device)
    steps = {}
    for kind in kinds:
        mom = _momentum_of(kind) or dataclasses.replace(cfg.momentum, kind=kind)
        torch.manual_seed(0)  # identical weights for every variant
        model = VisionMoE(cfg.model, cfg.moe, mom, v).to(device)
        steps[kind] = train_step_fn(model, x, y, device, bf16=args.dtype == "bf16")
    rounds = timed_rounds(steps, args.repeats, args.warmup, device)
    ms = {k: statistics.median(v) for k, v in rounds.items()}
    base = ms["none"]
    shapes = {
        "config": str(args.config),
        "layers": cfg.model.num_layers,
        "d_model": cfg.model.d_model,
        "experts": cfg.moe.num_experts,
        "top_k": cfg.moe.top_k,
        "image_size": v.image_size,
        "patch": v.patch_size,
        "batch": args.batch,
        "dtype": args.dtype,
    }
    return {
        **header("vit_step", shapes, machine_info(device)),
        "step_ms": ms,
        "images_per_s": {k: args.batch / (t / 1e3) for k, t in ms.items()},
        "ratio_vs_smoe": {k: t / base for k, t in ms.items()},
    }
