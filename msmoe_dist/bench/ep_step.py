"""One expert-parallel training step of the language model, timed (for scaling sweeps).

Run under torchrun (world size = EP degree: every rank holds E/world experts); also runs in one
process. Reports the median step time (slowest rank), the global throughput, and the share of
the step spent inside the MoE all-to-alls (slowest rank as well).
"""

from __future__ import annotations

import argparse
import statistics

import torch

from msmoe_dist.bench.common import (
    header,
    machine_info,
    max_over_ranks,
    timed_rounds,
    train_step_fn,
)
from msmoe_dist.config.schema import ModelConfig, MoEConfig, MomentumConfig
from msmoe_dist.models import MoELanguageModel
from msmoe_dist.parallel import CommStats, ProcessGroups, apply_expert_parallel
from msmoe_dist.parallel.all_to_all import COUNTS, TOKENS_BACKWARD, TOKENS_FORWARD

# What `all_to_all_ms` sums: the token exchanges both ways and the count exchange (dropless mode)
ALL_TO_ALLS = (TOKENS_FORWARD, TOKENS_BACKWARD, COUNTS)


def add_step_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--experts", type=int, default=8, help="experts in total")
    p.add_argument("--tokens", type=int, default=2048, help="tokens per rank per step")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--momentum", default="heavy_ball", choices=("none", "heavy_ball", "adam", "robust"))
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--ffn", type=int, default=512)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="cuda: each rank on its LOCAL_RANK's GPU, NCCL, steps timed by CUDA events",
    )
    p.add_argument("--json", action="store_true")


def run_step_bench(args: argparse.Namespace, device: torch.device, pg: ProcessGroups | None = None) -> dict:
    """``pg`` None: one process, no all-to-all. Otherwise every rank of ``pg`` holds E/world experts
    (ep_size = world size) and torch.distributed must be started."""
    world = pg.layout.world_size if pg is not None else 1
    rank = pg.rank if pg is not None else 0
    if pg is not None and pg.layout.ep_size != world:
        raise ValueError(f"the step benchmark runs with ep_size = world size, got {pg.layout}")
    if args.tokens % args.seq:
        raise SystemExit(f"msmoe-bench step: --tokens {args.tokens} must be a multiple of --seq {args.seq}")
    mcfg = ModelConfig(
        num_layers=args.layers, d_model=args.d_model, num_heads=max(1, args.d_model // 64), max_seq_len=args.seq
    )
    moe = MoEConfig(num_experts=args.experts, top_k=2, expert_ffn_dim=args.ffn)
    mom = MomentumConfig(kind=args.momentum)
    torch.manual_seed(0)
    local = pg.layout.local_experts(rank, args.experts) if pg is not None else None  # only this rank's experts
    model = MoELanguageModel(mcfg, moe, mom, args.vocab, local)
    comm = CommStats()  # stays empty in one process: no collectives
    if pg is not None:
        apply_expert_parallel(model, pg, comm)
    model.to(device)
    g = torch.Generator().manual_seed(rank)
    idx = torch.randint(0, args.vocab, (args.tokens // args.seq, args.seq + 1), generator=g).to(device)
    train_step = train_step_fn(model, idx[:, :-1], idx[:, 1:], device)
    comm_ms: list[float] = []  # all-to-all time of every call, warm-up included

    def step() -> None:
        train_step()
        comm_ms.append(sum(comm[name].seconds for name in ALL_TO_ALLS) * 1e3)

    group = pg.dp if pg is not None else None
    step_ms = timed_rounds({"step": step}, args.repeats, args.warmup, device, group, reset=comm.reset)["step"]
    slowest_comm_ms = max_over_ranks(comm_ms[args.warmup :], group, device)  # as step_ms: the slowest rank
    med, med_comm = statistics.median(step_ms), statistics.median(slowest_comm_ms)
    shapes = {"layers": args.layers, "d_model": args.d_model, "ffn": args.ffn, "seq": args.seq}
    result = {
        **header("ep_step", shapes, machine_info(device)),
        "world_size": world,
        "ep_size": world,
        "experts": args.experts,
        "tokens_per_rank": args.tokens,
        "momentum": args.momentum,
        "step_ms": med,
        "all_to_all_ms": med_comm,
        "all_to_all_share": med_comm / med if med > 0 else 0.0,
        "tokens_per_s": args.tokens * world / (med / 1e3),
        "timing": "CUDA events" if device.type == "cuda" else "time.perf_counter",
    }
    if device.type == "cuda" and world > 1:
        # CommStats times the all-to-all calls on the host: with NCCL that is the launch plus whatever
        # host synchronisation the dispatcher does (it reads the exchanged counts), not the transfer.
        result["all_to_all_note"] = "host-side time of the NCCL calls (launch and host syncs), not the transfer"
    return result
