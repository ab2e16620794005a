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
    from msmoe_dist.bench.prepare import add_prepare_args

    add_prepare_args(sub.add_parser("prepare", help="msmoe-prepare on a synthetic WikiText-103-sized corpus"))
    from msmoe_dist.bench.ep_step import add_step_args
    from msmoe_dist.bench.sweep import add_sweep_args

    add_step_args(sub.add_parser("step", help="one expert-parallel LM training step (run under torchrun)"))
    add_sweep_args(sub.add_parser("sweep", help="grid of torchrun launches of `step`; JSON and PNG curves"))
    from msmoe_dist.bench.vit_step import add_vit_args

    add_vit_args(sub.add_parser("vit", help="V-MoE training-step images/s of each momentum variant vs V-MoE"))
    from msmoe_dist.bench.memory import add_memory_args

    add_memory_args(sub.add_parser("memory", help="peak memory of one WikiText-103 step per model.output_layer"))
    return parser


def _print_table(result: dict) -> None:
    print(f"{result.get('benchmark', 'layer')} benchmark, {result['date']}, {result['machine']}")
    print(f"shapes: {result['shapes']}")
    for key, val in result.items():
        if key.endswith("_ms") and isinstance(val, (int, float)):
            print(f"  {key:>16}: {val:9.2f} ms")
        elif isinstance(val, dict) and key in ("step_ms", "ratio_vs_smoe", "images_per_s"):
            for k, v in val.items():
                print(f"  {key}.{k:>10}: {v:9.3f}")
    if "ratio" in result:
        print(f"  ratio ours/floor: {result['ratio']:.3f}")


def bench_main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "memory":
        from msmoe_dist.bench.memory import print_table, run_memory_bench

        result = run_memory_bench(args)
        if args.json:
            print(json.dumps(result))
        else:
            print_table(result)
        return 0
    if args.command == "prepare":
        from msmoe_dist.bench.prepare import run_prepare_bench

        print(json.dumps(run_prepare_bench(args)))
        return 0
    if args.command in ("step", "sweep"):
        if args.command == "step":
            from msmoe_dist.bench.ep_step import run_step_bench

            result = run_step_bench(args)
            if result is None:  # ranks other than 0 print nothing
                return 0
        else:
            from msmoe_dist.bench.sweep import run_sweep

            result = run_sweep(args)
        print(json.dumps(result) if args.json else json.dumps(result, indent=1))
        return 0
    if args.command == "layer":
        from msmoe_dist.bench.layer import run_layer_bench

        result = run_layer_bench(args)
    elif args.command == "vit":
        from msmoe_dist.bench.vit_step import run_vit_bench

        result = run_vit_bench(args)
    else:
        from msmoe_dist.bench.model_step import run_model_bench

        result = run_model_bench(args)
    if args.json:
        print(json.dumps(result))
    else:
        _print_table(result)
    return 0
