"""msmoe-bench: `layer` (one MoE layer against its expert-GEMM floor), `model` (momentum variants vs SMoE)."""

from __future__ import annotations

import argparse
import json


def build_parser() -> argparse.ArgumentParser:
    from msmoe_dist.bench.layer import add_layer_args
    from msmoe_dist.bench.model_step import add_model_args

    parser = argparse.ArgumentParser(prog="msmoe-bench", description="Benchmarks that print figures (never tests).")
    sub = parser.add_subparsers(dest="command", required=True)
    add_layer_args(sub.add_parser("layer", help="MoE layer forward+backward vs the expert-GEMM floor"))
    add_model_args(sub.add_parser("model", help="training-step time of MomentumSMoE/AdamSMoE/Robust vs SMoE"))
    return parser


def _print_table(result: dict) -> None:
    print(f"{result.get('benchmark', 'layer')} benchmark, {result['date']}, {result['machine']}")
    print(f"shapes: {result['shapes']}")
    for key, val in result.items():
        if key.endswith("_ms") and isinstance(val, (int, float)):
            print(f"  {key:>16}: {val:9.2f} ms")
        elif isinstance(val, dict) and key in ("step_ms", "ratio_vs_smoe"):
            for k, v in val.items():
                print(f"  {key}.{k:>10}: {v:9.3f}")
    if "ratio" in result:
        print(f"  ratio ours/floor: {result['ratio']:.3f}")


def bench_main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "layer":
        from msmoe_dist.bench.layer import run_layer_bench

        result = run_layer_bench(args)
    else:
        from msmoe_dist.bench.model_step import run_model_bench

        result = run_model_bench(args)
    if args.json:
        print(json.dumps(result))
    else:
        _print_table(result)
    return 0
