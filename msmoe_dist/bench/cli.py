"""msmoe-bench: the benchmark subcommands (they print figures; timing goals are never tests).

Process groups are started here, once, and handed to the benchmarks: under a launcher (torchrun)
`layer` and `step` run expert parallel with ep_size = world size; in one process `layer` starts a
world of one only for the DeepSpeed-MoE comparison. No benchmark starts a process group itself.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

# Collectives of a benchmark finish in seconds; a peer that is gone should fail the run quickly.
BENCH_TIMEOUT_S = 120.0


def build_parser() -> argparse.ArgumentParser:
    from msmoe_dist.bench.layer import add_layer_args
    from msmoe_dist.bench.model_step import add_model_args

    parser = argparse.ArgumentParser(prog="msmoe-bench", description="Benchmarks that print figures (never tests).")
    sub = parser.add_subparsers(dest="command", required=True)
    layer_help = "MoE layer forward+backward vs the expert-GEMM floor (expert parallel under torchrun)"
    add_layer_args(sub.add_parser("layer", help=layer_help))
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
    from msmoe_dist.bench.scaling import add_build_memory_args, add_recompute_args

    add_build_memory_args(sub.add_parser("build-memory", help="peak RSS of one rank's model build at EP 1, 2, 4"))
    add_recompute_args(sub.add_parser("recompute", help="step memory/time per train.activation_checkpointing"))
    from msmoe_dist.bench.gpu_check import add_gpu_check_args

    add_gpu_check_args(sub.add_parser("gpu-check", help="one-GPU acceptance checks (launch/gpu_check.sh)"))
    from msmoe_dist.bench.calibrate import add_calibrate_args

    add_calibrate_args(sub.add_parser("calibrate", help="write a cpu-local cluster file for msmoe-plan"))
    from msmoe_dist.bench.plan_check import add_plan_check_args

    check_help = "msmoe-plan's step time beside real msmoe-train runs at 1, 2, 4 ranks (calibrated here)"
    add_plan_check_args(sub.add_parser("plan-check", help=check_help))
    from msmoe_dist.bench.plan_scale import add_plan_scale_args

    scale_help = "msmoe-plan's best configuration and each EP degree's step at 8 ... 1,024 GPUs"
    add_plan_scale_args(sub.add_parser("plan-scale", help=scale_help))

    from msmoe_dist.bench.compare import add_compare_args

    compare_help = "train each momentum variant x seed (x sweep point), compare perplexities; results.md/json, PNGs"
    add_compare_args(sub.add_parser("compare", help=compare_help))
    return parser


def _print_table(result: dict) -> None:
    print(f"{result.get('benchmark', 'layer')} benchmark, {result['date']}, {result['machine']}")
    print(f"shapes: {result['shapes']}")
    for key, val in result.items():
        if key.endswith("_ms") and isinstance(val, (int, float)):
            print(f"  {key:>16}: {val:9.2f} ms")
        elif isinstance(val, dict) and key in ("step_ms", "ratio_vs_smoe", "images_per_s", "tokens_per_s", "mfu"):
            for k, v in val.items():
                print(f"  {key}.{k:>10}: " + ("-" if v is None else f"{v:9.3f}"))
    if "ratio" in result:
        print(f"  ratio ours/floor: {result['ratio']:.3f}")


def _start(device: str, deepspeed_in_one_process: bool = False):
    """(device, process groups or None) for a benchmark that can run expert parallel.

    Decided once from the launcher's environment: with a world of more than one, torch.distributed
    and DeepSpeed's comm are started and the EP groups (ep_size = world size) built; other ranks
    than 0 print nothing. In one process nothing is started unless the DeepSpeed-MoE comparison
    needs its world of one; if that fails, the comparison is skipped and says why.
    """
    import torch

    from msmoe_dist.bench.common import silence_stdout_for_good, stdout_to_stderr
    from msmoe_dist.config.schema import ParallelConfig
    from msmoe_dist.parallel import ParallelLayout, build_process_groups
    from msmoe_dist.parallel.runtime import Runtime

    runtime = Runtime.from_env(device)
    world = runtime.world_size
    if world == 1 and not deepspeed_in_one_process:
        return runtime.device, None
    if not runtime.is_main:
        silence_stdout_for_good()
    if world > 1 and runtime.device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))  # the ranks share the machine's cores
    with stdout_to_stderr():  # DeepSpeed logs to stdout while it starts
        try:
            runtime.start_distributed(ParallelConfig(ep_size=world, timeout_s=BENCH_TIMEOUT_S))
        except Exception as exc:  # in one process only the optional comparison needs it
            if world > 1:
                raise
            print(f"msmoe-bench: DeepSpeed-MoE comparison unavailable: {type(exc).__name__}: {exc}", file=sys.stderr)
    if world == 1:
        return runtime.device, None
    return runtime.device, build_process_groups(ParallelLayout(world, world), runtime.rank, BENCH_TIMEOUT_S)


def _stop() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def _run_parallel(args) -> dict:
    """`layer` and `step`: the benchmarks that run expert parallel under a launcher."""
    from msmoe_dist.bench.common import stdout_to_stderr
    from msmoe_dist.bench.ep_step import run_step_bench
    from msmoe_dist.bench.layer import run_layer_bench

    layer = args.command == "layer"
    device, pg = _start(args.device, deepspeed_in_one_process=args.deepspeed) if layer else _start(args.device)
    try:
        with stdout_to_stderr():  # library chatter (DeepSpeed's MoE build) must not mix with the result
            return run_layer_bench(args, device, pg) if layer else run_step_bench(args, device, pg)
    finally:
        _stop()


def bench_main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "compare":
        from msmoe_dist.bench.compare import compare_main

        return compare_main(args)
    if args.command == "gpu-check":
        from msmoe_dist.bench.gpu_check import run_gpu_check

        return run_gpu_check(args)
    if args.command == "plan-scale":
        from msmoe_dist.bench.plan_scale import run_plan_scale

        print(f"plan-scale {args.config} {' '.join(args.overrides)} on {args.cluster}", flush=True)
        for line in run_plan_scale(args):
            print(line, flush=True)
        return 0
    if args.command == "plan-check":
        from msmoe_dist.bench.plan_check import print_plan_check, run_plan_check

        result = run_plan_check(args)
        print(json.dumps(result)) if args.json else print_plan_check(result)
        return 0
    if args.command == "calibrate":
        from msmoe_dist.bench.calibrate import run_calibrate

        print(json.dumps(run_calibrate(args)))
        return 0
    if args.command == "memory":
        if args.ep_size is not None:  # the parameter/gradient/optimiser/activation split (bench/memory_split.py)
            from msmoe_dist.bench.memory_split import print_split_table as print_table
            from msmoe_dist.bench.memory_split import run_split as run_memory_bench
        else:
            from msmoe_dist.bench.memory import print_table, run_memory_bench

        result = run_memory_bench(args)
        if args.json:
            print(json.dumps(result))
        else:
            print_table(result)
        return 0
    if args.command in ("build-memory", "recompute"):
        from msmoe_dist.bench import scaling

        result = scaling.run_build_memory(args) if args.command == "build-memory" else scaling.run_recompute(args)
        print(json.dumps(result) if args.json else "", end="\n" if args.json else "")
        if not args.json:
            scaling.print_table(result)
        return 0
    if args.command == "prepare":
        from msmoe_dist.bench.prepare import run_prepare_bench

        print(json.dumps(run_prepare_bench(args)))
        return 0
    if args.command in ("step", "sweep"):
        if args.command == "step":
            result = _run_parallel(args)
        else:
            from msmoe_dist.bench.sweep import run_sweep

            result = run_sweep(args)
        print(json.dumps(result) if args.json else json.dumps(result, indent=1))
        return 0
    if args.command == "layer":
        result = _run_parallel(args)
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
