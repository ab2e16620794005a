"""One expert-parallel training step of the language model, timed (for scaling sweeps).

Run under torchrun (world size = EP degree: every rank holds E/world experts); also runs in one
process. Reports the median step time (slowest rank), the global throughput, and the share of
the step spent inside the MoE all-to-alls.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import time

import torch
import torch.distributed as dist

from msmoe_dist.bench.timing import machine_info, now_iso
from msmoe_dist.config.schema import ModelConfig, MoEConfig, MomentumConfig
from msmoe_dist.models import MoELanguageModel
from msmoe_dist.parallel import AllToAllDispatcher, ParallelLayout, build_process_groups, shard_expert_state
from msmoe_dist.parallel.all_to_all import COMM_TIMER


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
    p.add_argument("--json", action="store_true")


def run_step_bench(args: argparse.Namespace) -> dict | None:
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    if world > 1 and not dist.is_initialized():
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    if args.tokens % args.seq:
        raise SystemExit(f"msmoe-bench step: --tokens {args.tokens} must be a multiple of --seq {args.seq}")
    mcfg = ModelConfig(num_layers=args.layers, d_model=args.d_model, num_heads=max(1, args.d_model // 64),
                       max_seq_len=args.seq)
    moe = MoEConfig(num_experts=args.experts, top_k=2, expert_ffn_dim=args.ffn)
    mom = MomentumConfig(kind=args.momentum)
    torch.manual_seed(0)
    model = MoELanguageModel(mcfg, moe, mom, args.vocab)
    if world > 1:
        lay = ParallelLayout(world, world)
        pg = build_process_groups(lay, rank, 120.0)
        full = model.state_dict()
        model = MoELanguageModel(mcfg, moe, mom, args.vocab,
                                 dispatcher=AllToAllDispatcher(args.experts, pg.ep, world, pg.ep_rank))
        model.load_state_dict(shard_expert_state(full, pg.ep_rank, world))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(rank)
    idx = torch.randint(0, args.vocab, (args.tokens // args.seq, args.seq + 1), generator=g)
    times, comm = [], []
    for i in range(args.warmup + args.repeats):
        COMM_TIMER.reset()
        if world > 1:
            dist.barrier()
        t0 = time.perf_counter()
        out = model(idx[:, :-1], idx[:, 1:])
        (out.loss + out.aux_loss).backward()
        if world > 1:  # what a data-parallel reduction would cost is not part of the MoE scaling question
            pass
        opt.step()
        opt.zero_grad(set_to_none=True)
        step, c = time.perf_counter() - t0, COMM_TIMER.seconds
        if world > 1:
            t = torch.tensor([step, c], dtype=torch.float64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)  # a step is as slow as its slowest rank
            step, c = t.tolist()
        if i >= args.warmup:
            times.append(step)
            comm.append(c)
    med = statistics.median(times)
    result = {"benchmark": "ep_step", "machine": machine_info(), "date": now_iso(), "world_size": world,
              "ep_size": world, "experts": args.experts, "tokens_per_rank": args.tokens, "momentum": args.momentum,
              "shapes": {"layers": args.layers, "d_model": args.d_model, "ffn": args.ffn, "seq": args.seq},
              "step_ms": med * 1e3, "all_to_all_ms": statistics.median(comm) * 1e3,
              "all_to_all_share": statistics.median(comm) / med if med > 0 else 0.0,
              "tokens_per_s": args.tokens * world / med}
    if world > 1:
        dist.destroy_process_group()
    return result if rank == 0 else None
