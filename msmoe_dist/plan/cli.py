"""msmoe-plan: will a configuration fit, and how fast will it run, on N GPUs of a cluster (docs/planning.md).

    msmoe-plan --config FILE [key=value ...] --gpus N [--gpus-per-node 8] [--cluster PRESET|FILE.yaml]
               [--json] [--plot DIR]

Every user error is one line and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys

SCALING_GPUS = (8, 16, 32, 64, 128, 256, 512, 1024)


def build_parser() -> argparse.ArgumentParser:
    p = _OneLineParser(
        prog="msmoe-plan",
        description="Memory per rank and step time of a training configuration on a GPU cluster, from the real "
        "model built on fake tensors; lists which (ep_size, zero_stage, micro-batch, activation checkpointing) "
        "fit and run fastest.",
    )
    p.add_argument("--config", required=True, help="training config YAML")
    p.add_argument("overrides", nargs="*", help="config overrides section.key=value")
    p.add_argument("--gpus", type=int, required=True, help="number of GPUs (ranks)")
    p.add_argument("--gpus-per-node", type=int, default=None, help="default: the cluster's")
    p.add_argument("--cluster", default="h100-ib400", help="preset (h100-ib400, h200-ib400, a100-ib200) or YAML file")
    p.add_argument("--vocab", type=int, default=None, help="vocabulary size (default: from the config or data)")
    p.add_argument("--ep-size", type=int, default=None, help="plan only this expert-parallel degree")
    p.add_argument("--zero-stage", type=int, choices=(0, 1, 2), default=None, help="plan only this ZeRO stage")
    p.add_argument("--micro-batch", type=int, default=None, help="plan only this micro-batch size")
    p.add_argument("--checkpointing", choices=("none", "block", "selective"), default=None, help="plan only this mode")
    p.add_argument(
        "--imbalance",
        type=float,
        default=1.0,
        help="rows on the busiest rank / mean (dropless MoE); 1 = balanced (default)",
    )
    p.add_argument("--top", type=int, default=10, help="configurations listed (default 10)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--plot", default=None, help="write PNGs of step time and memory against 8..1,024 GPUs here")
    return p


def _plan(args) -> dict:
    from dataclasses import replace

    from msmoe_dist.config.loader import load_config
    from msmoe_dist.plan.cluster import load_cluster
    from msmoe_dist.plan.memory import MODES
    from msmoe_dist.plan.report import candidate_row, census_row, print_plan
    from msmoe_dist.plan.search import CensusCache, PlanError, check_degrees, no_fit_message, resolve_vocab, search

    cluster = load_cluster(args.cluster)
    if args.gpus_per_node is not None:
        cluster = replace(cluster, gpus_per_node=args.gpus_per_node)
    if args.imbalance < 1:
        raise PlanError(f"--imbalance must be >= 1 (busiest rank / mean), got {args.imbalance}")
    cfg = load_config(args.config, args.overrides)
    ep = args.ep_size
    check_degrees(args.gpus, cluster.gpus_per_node, ep, cfg.moe.num_experts)
    vocab = resolve_vocab(cfg, args.vocab)
    if args.plot:
        from msmoe_dist.plan.plots import check_plotting

        check_plotting(args.plot)
    cache = CensusCache(cfg, vocab, flash_attention=cluster.device == "cuda")
    modes = (args.checkpointing,) if args.checkpointing else MODES
    if args.micro_batch is not None and (args.micro_batch < 1 or cfg.data.batch_size % args.micro_batch):
        raise PlanError(f"--micro-batch {args.micro_batch} must divide data.batch_size={cfg.data.batch_size}")
    cands = [
        c
        for c in search(cache, cfg, cluster, args.gpus, args.imbalance, ep, modes)
        if (args.zero_stage is None or c.setting.zero_stage == args.zero_stage)
        and (args.micro_batch is None or c.setting.micro_batch == args.micro_batch)
    ]
    if not cands:
        raise PlanError(
            f"no candidate: no expert-parallel degree divides both --gpus {args.gpus} and moe.num_experts, "
            "or --zero-stage does not apply (one process runs the native engine: zero_stage 0)"
        )
    if not cands[0].fits:
        msg = no_fit_message(cands, cluster, args.gpus)
        for world in (args.gpus * 2**k for k in range(1, 12)):
            more = search(cache, cfg, cluster, world, args.imbalance, ep)
            if more and more[0].fits:
                s = more[0].setting
                msg += f"; it fits from {world} GPUs (ep_size={s.ep_size}, zero_stage={s.zero_stage})"
                break
        raise PlanError(msg)
    census = cache.get(cands[0].setting.micro_batch, cands[0].setting.ep_size)
    result = {
        "config": args.config,
        "overrides": args.overrides,
        "gpus": args.gpus,
        "cluster": cluster.name,
        "gpus_per_node": cluster.gpus_per_node,
        "census": census_row(census),
        "best": candidate_row(cands[0]),
        "candidates": [candidate_row(c) for c in cands],
    }
    if args.plot:
        from msmoe_dist.plan.plots import write_plots

        result["plots"] = write_plots(args.plot, cache, cfg, cluster, args.imbalance, SCALING_GPUS)
    if not args.json:
        print_plan(cands, census, cluster, args.gpus, args.top)
        for path in result.get("plots", []):
            print(f"wrote {path}")
    return result


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):  # a bad command line: one line, exit code 2
        print(f"{self.prog}: error: {' '.join(message.split())} (see --help)", file=sys.stderr)
        sys.exit(2)


def main(argv: list[str] | None = None) -> int:
    from msmoe_dist.errors import UserError

    args = build_parser().parse_args(argv)
    try:
        result = _plan(args)
    except UserError as exc:
        print(f"msmoe-plan: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
