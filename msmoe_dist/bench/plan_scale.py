"""msmoe-bench plan-scale: msmoe-plan's best configuration at 8 ... 1,024 GPUs and each EP degree's best step.

The tables of docs/planning.md's "At scale" section: for each GPU count, the fastest fitting (ep_size,
zero_stage, micro-batch, checkpointing) with its step-time parts, peak memory, tokens/s, MFU and what bounds
it, then the best step time of every EP degree (or "no fit"). Planning only: nothing is trained.
"""

from __future__ import annotations

import argparse

SCALE_GPUS = (8, 16, 32, 64, 128, 256, 512, 1024)


def add_plan_scale_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="training config YAML (a language model or a V-MoE)")
    p.add_argument("overrides", nargs="*", help="config overrides section.key=value")
    p.add_argument("--cluster", default="h100-ib400", help="preset or cluster YAML (default h100-ib400)")
    p.add_argument("--vocab", type=int, default=None, help="vocabulary size (default: from the config or data)")
    p.add_argument("--imbalance", type=float, default=1.0, help="busiest rank's rows / mean (default 1)")


def run_plan_scale(args: argparse.Namespace) -> list[str]:
    from msmoe_dist.config.loader import load_config
    from msmoe_dist.plan.cluster import load_cluster
    from msmoe_dist.plan.report import bound_of
    from msmoe_dist.plan.search import GIB, CensusCache, divisors, resolve_vocab, search

    cfg = load_config(args.config, args.overrides)
    cluster = load_cluster(args.cluster)
    cache = CensusCache(cfg, resolve_vocab(cfg, args.vocab), cluster.device == "cuda")
    lines = []
    for world in SCALE_GPUS:
        per_ep, best = [], None
        for ep in [e for e in divisors(cfg.moe.num_experts) if world % e == 0]:
            fits = [c for c in search(cache, cfg, cluster, world, args.imbalance, ep) if c.fits]
            if not fits:
                per_ep.append(f"ep{ep}: no fit")
                continue
            c = fits[0]
            best = c if best is None or c.time.serial < best.time.serial else best
            per_ep.append(f"ep{ep}: {c.time.serial * 1e3:.0f} ms / {c.memory.peak / GIB:.1f} GiB")
        if best is None:
            lines.append(f"{world:5d} GPUs: nothing fits | " + "  ".join(per_ep))
            continue
        s, t = best.setting, best.time
        lines.append(
            f"{world:5d} GPUs: best ep{s.ep_size} zero{s.zero_stage} mb{s.micro_batch} {s.checkpointing}: step "
            f"{t.serial * 1e3:.0f} ms (overlap {t.overlapped * 1e3:.0f}); compute {t.compute * 1e3:.0f}, element-wise "
            f"+ overhead {t.memory_ops * 1e3:.0f}, all-to-all {t.all_to_all * 1e3:.0f}, gradients "
            f"{t.grad_reduce * 1e3:.0f}, optimiser {t.optimizer * 1e3:.1f} ms; peak {best.memory.peak / GIB:.1f} GiB; "
            f"{best.tokens_per_s / 1e6:.2f} M tokens/s; MFU {100 * best.mfu:.1f} %; {bound_of(best)}-bound | "
            + "  ".join(per_ep)
        )
    return lines
