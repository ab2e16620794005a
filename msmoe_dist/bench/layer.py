"""Forward+backward time of one MoELayer against the floor of its expert FFN work.

The floor pushes exactly T*K/E rows through every expert (a perfectly balanced routing)
with no router and no dispatch, once as batched matmuls (bmm over [E, T*K/E, D]) and once
as a per-expert loop; the faster is the floor.  Ours, floor-bmm and floor-loop are timed in
turn inside one loop so that drift in machine load hits all three alike; medians reported.
``experts_only_ms`` times our expert path alone on the floor's balanced rows, so that
ours - experts_only is what routing and dispatch cost.

``deepspeed_ms`` (``--deepspeed``, the default) times DeepSpeed's own MoE layer
(deepspeed.moe.layer.MoE, top-2 GShard gate, capacity factor 1.25 with token dropping,
Linear-ReLU-Linear experts) in the same rounds, at ep_size=1 in a process group of one on
loopback that is created for the run and torn down after it.

Under torchrun (WORLD_SIZE > 1) the same command runs the expert-parallel comparison in
``msmoe_dist/bench/layer_dist.py`` instead.

Legend: T tokens, D model dim, E experts, K top-k, F ffn dim, C = T*K/E rows per expert.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
from contextlib import ExitStack, nullcontext

import torch

from msmoe_dist.config.schema import MoEConfig
from msmoe_dist.moe import ACTIVATIONS, MoELayer


def add_layer_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--tokens", type=int, default=4096, help="tokens T per step")
    parser.add_argument("--d-model", type=int, default=256, help="model dim D")
    parser.add_argument("--ffn", type=int, default=1024, help="expert ffn dim F")
    parser.add_argument("--experts", type=int, default=8, help="experts E")
    parser.add_argument("--top-k", type=int, default=2, help="experts per token K")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed rounds, each timing every case once (default 15; 10 under torchrun)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds first")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="bf16 = autocast, fp32 weights")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--deepspeed", action=argparse.BooleanOptionalAction, default=True,
                        help="also time DeepSpeed-MoE (deepspeed.moe.layer.MoE) at the same shapes")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(device: torch.device) -> dict:
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }
    if hasattr(os, "getloadavg"):
        # The per-expert paths pay a scheduling delay per parallel op when other processes
        # compete for the cores, the bmm floor much less: a loaded machine inflates ratio.
        info["load_avg_1min_before"] = round(os.getloadavg()[0], 2)
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def floor_cases(ex, act, x_ECD: torch.Tensor, g_ECD: torch.Tensor) -> dict:
    """The floor's two candidates on the weights of ``ex`` (an Experts bank of E experts) and E
    equal row blocks x_ECD: batched matmuls, and a per-expert loop.  Forward+backward each."""
    E = x_ECD.shape[0]
    if E != ex.num_experts:
        raise ValueError(f"{E} row blocks for {ex.num_experts} experts")

    def floor_bmm():
        h = act(torch.baddbmm(ex.b1.unsqueeze(1), x_ECD, ex.w1))
        torch.baddbmm(ex.b2.unsqueeze(1), h, ex.w2).backward(g_ECD)

    def floor_loop():
        ys = [torch.addmm(ex.b2[e], act(torch.addmm(ex.b1[e], x_ECD[e], ex.w1[e])), ex.w2[e]) for e in range(E)]
        torch.autograd.backward(ys, list(g_ECD.unbind(0)))

    return {"floor_bmm": floor_bmm, "floor_loop": floor_loop}


def run_layer_bench(args) -> dict:
    from msmoe_dist.bench import layer_dist

    if layer_dist.world_size_from_env() > 1:
        return layer_dist.run_layer_bench_dist(args)
    T, D, F, E, K = args.tokens, args.d_model, args.ffn, args.experts, args.top_k
    repeats = args.repeats if args.repeats is not None else 15
    use_ds = getattr(args, "deepspeed", False)
    if (T * K) % E:
        raise ValueError(f"tokens*top_k={T * K} must be divisible by experts={E} for the balanced floor")
    C = T * K // E
    device = torch.device(args.device)
    machine = machine_info(device)
    autocast = (
        torch.autocast(device_type=device.type, dtype=torch.bfloat16) if args.dtype == "bf16" else nullcontext()
    )
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    gen = torch.Generator(device="cpu").manual_seed(0)
    torch.manual_seed(0)

    cfg = MoEConfig(num_experts=E, top_k=K, expert_ffn_dim=F, capacity_factor=0.0, expert_impl="grouped")
    layer = MoELayer(D, cfg).to(device)
    ex = layer.experts
    act = ACTIVATIONS[cfg.activation]
    params = list(layer.parameters())

    x_TD = torch.randn(T, D, generator=gen).to(device).requires_grad_()
    g_TD = torch.randn(T, D, generator=gen).to(device)
    x_ECD = torch.randn(E, C, D, generator=gen).to(device).requires_grad_()
    g_ECD = torch.randn(E, C, D, generator=gen).to(device)

    def ours():
        layer(x_TD).out.backward(g_TD)

    x_RD = x_ECD.detach().view(E * C, D).requires_grad_()
    g_RD = g_ECD.view(E * C, D)

    def experts_only():
        # our expert path on the floor's balanced rows: ours minus this is router + dispatch
        ex(x_RD, [C] * E).backward(g_RD)

    cases = {"ours": ours, **floor_cases(ex, act, x_ECD, g_ECD), "experts_only": experts_only}
    grads_of = [x_TD, x_ECD, x_RD]
    times: dict[str, list[float]] = {}
    ds_note = None
    with ExitStack() as stack:
        if use_ds:
            # DeepSpeed logs to stdout and prints while it builds its groups and CPU comm op.
            stack.enter_context(layer_dist.stdout_to_stderr())
            try:
                stack.enter_context(layer_dist.deepspeed_world_of_one(device))
                torch.manual_seed(0)
                moe = layer_dist.build_deepspeed_moe(D, F, E, K, 1, device)
            except Exception as exc:  # noqa: BLE001 - an optional comparison; say why it is missing
                ds_note = "skipped: " + " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
            else:
                x_ds = x_TD.detach().clone().requires_grad_()
                params += list(moe.parameters())
                grads_of.append(x_ds)

                def deepspeed_case():
                    moe(x_ds)[0].backward(g_TD)

                cases["deepspeed"] = deepspeed_case
        else:
            ds_note = "skipped (--no-deepspeed)"
        times = {name: [] for name in cases}
        with autocast:
            for rnd in range(args.warmup + repeats):
                for name, fn in cases.items():
                    # A training step starts from cleared gradients; accumulating into old ones
                    # would add work that neither side needs.
                    for p in params + grads_of:
                        p.grad = None
                    sync()
                    t0 = time.perf_counter()
                    fn()
                    sync()
                    if rnd >= args.warmup:
                        times[name].append((time.perf_counter() - t0) * 1e3)

    med = {name: statistics.median(v) for name, v in times.items()}
    floor = min(med["floor_bmm"], med["floor_loop"])
    result = {
        "benchmark": "layer",
        "world_size": 1,
        "machine": machine,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "shapes": {"tokens": T, "d_model": D, "ffn": F, "experts": E, "top_k": K, "rows_per_expert": C,
                   "dtype": args.dtype, "device": device.type, "repeats": repeats, "warmup": args.warmup},
        "ours_ms": round(med["ours"], 3),
        "floor_ms": round(floor, 3),
        "floor_bmm_ms": round(med["floor_bmm"], 3),
        "floor_loop_ms": round(med["floor_loop"], 3),
        "ratio": round(med["ours"] / floor, 4),
        "experts_only_ms": round(med["experts_only"], 3),
    }
    if "deepspeed" in med:
        ds = med["deepspeed"]
        result.update({
            "deepspeed_ms": round(ds, 3),
            "deepspeed_ratio": round(ds / floor, 4),
            "speedup_vs_deepspeed": round(ds / med["ours"], 4),
            "deepspeed_settings": {"capacity_factor": layer_dist.DS_CAPACITY_FACTOR, "k": K, "drop_tokens": True,
                                   "min_capacity": 4, "ep_size": 1,
                                   "capacity_rows_per_expert": layer_dist.deepspeed_capacity(T, E, K)},
        })
    else:
        result["deepspeed"] = ds_note
    result["fairscale"] = layer_dist.fairscale_note()
    return result


def main(argv=None) -> None:
    args = add_layer_args(argparse.ArgumentParser(description=__doc__.splitlines()[0])).parse_args(argv)
    result = run_layer_bench(args)
    if args.json:
        print(json.dumps(result))
    else:
        for key in ("ours_ms", "floor_bmm_ms", "floor_loop_ms", "floor_ms", "ratio", "experts_only_ms",
                    "deepspeed_ms", "deepspeed_ratio", "speedup_vs_deepspeed"):
            if key in result:
                print(f"{key:>20}: {result[key]}")


if __name__ == "__main__":
    main()
