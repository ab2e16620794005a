"""`msmoe-bench layer` under torchrun: our expert-parallel MoE layer against its floor and DeepSpeed-MoE.

Every rank holds T tokens and E/P of the E experts (P = world size = the expert-parallel degree).
Three things are timed in turn within each round, at the same shapes, forward+backward:

  ours       MoELayer + AllToAllDispatcher, dropless
  floor      this rank's expert GEMMs alone on the rows a perfectly balanced routing gives them
             (T*K*P/E rows per local expert): the faster of batched matmuls and a per-expert loop,
             no router, no dispatch, no communication
  deepspeed  deepspeed.moe.layer.MoE (GShard top-2 gate, capacity factor 1.25, token dropping,
             capacity-padded dispatch, its own all-to-alls), experts Linear-ReLU-Linear

Every call starts after a barrier; a round's time for a case is the maximum over ranks (a step
is as slow as its slowest rank); the reported figure is the median over rounds.  Only rank 0
writes to stdout (the result, printed by the bench CLI); library chatter goes to stderr.

Legend: T tokens per rank, D model dim, F expert ffn dim, E experts in total, K top-k,
P ranks, L = E/P local experts, C = T*K*P/E floor rows per local expert.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import statistics
import sys
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch import nn

COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=120)
DS_CAPACITY_FACTOR = 1.25


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


@contextlib.contextmanager
def stdout_to_stderr():
    """Sends everything written to file descriptor 1 (print, logging handlers bound to sys.stdout,
    compiler subprocesses) to stderr for the duration, so that `--json` keeps stdout to one line.

    DeepSpeed logs to stdout and prints while it sets up its groups and builds its CPU comm op.
    """
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def silence_stdout_for_good() -> None:
    """Non-zero ranks print nothing: point fd 1 and sys.stdout at /dev/null for the process."""
    sys.stdout.flush()
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.close(devnull)
    sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process


@contextlib.contextmanager
def _env_defaults(**values: str):
    """Sets environment variables that are unset, and removes them again afterwards."""
    added = [k for k in values if k not in os.environ]
    for k in added:
        os.environ[k] = values[k]
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


def _init_deepspeed_comm(backend: str) -> None:
    import deepspeed

    deepspeed.init_distributed(dist_backend=backend, timeout=COLLECTIVE_TIMEOUT)


@contextlib.contextmanager
def deepspeed_world_of_one(device: torch.device):
    """A process group of one rank on loopback for DeepSpeed-MoE with ep_size=1, torn down after.

    If the caller already has a process group it is used and left alone.  Otherwise one is
    created (MASTER_ADDR/MASTER_PORT etc. set only for the duration when unset) and destroyed
    through deepspeed.comm, which also drops DeepSpeed's cached expert groups, so the calling
    process is left as it was found.
    """
    from msmoe_dist.parallel.startup import _free_port

    backend = "nccl" if device.type == "cuda" else "gloo"
    created = False
    with _env_defaults(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1",
                       LOCAL_RANK="0"):
        if not dist.is_initialized():
            dist.init_process_group(backend=backend, rank=0, world_size=1, timeout=COLLECTIVE_TIMEOUT)
            created = True
        try:
            _init_deepspeed_comm(backend)
            yield
        finally:
            if created:
                import deepspeed.comm as ds_comm

                ds_comm.destroy_process_group()
                if dist.is_initialized():  # older DeepSpeed: its destroy may not reach torch's
                    dist.destroy_process_group()


def build_deepspeed_moe(d_model: int, ffn: int, num_experts: int, top_k: int, ep_size: int,
                        device: torch.device) -> nn.Module:
    """DeepSpeed's own MoE layer with the settings of the comparison; its groups are created here
    (all ranks must call this, in the same order).  Requires deepspeed.init_distributed first."""
    from deepspeed.moe.layer import MoE

    expert = nn.Sequential(nn.Linear(d_model, ffn), nn.ReLU(), nn.Linear(ffn, d_model))
    moe = MoE(hidden_size=d_model, expert=expert, num_experts=num_experts, ep_size=ep_size, k=top_k,
              capacity_factor=DS_CAPACITY_FACTOR, eval_capacity_factor=DS_CAPACITY_FACTOR, min_capacity=4,
              drop_tokens=True, use_residual=False)
    moe.set_deepspeed_parallelism()  # what deepspeed.initialize would do: expert + expert-data groups
    return moe.to(device).train()


def deepspeed_capacity(tokens: int, num_experts: int, top_k: int) -> int:
    """Rows per (rank, expert) slot DeepSpeed's top-k gate computes on (its _capacity, min 4)."""
    import math

    return max(4, math.ceil(tokens / num_experts * DS_CAPACITY_FACTOR * top_k))


def fairscale_note() -> str:
    try:
        import fairscale  # noqa: F401
    except ImportError:
        return "not installed"
    return "installed, not measured"


def _per_rank(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return [[round(float(v), 3) for v in o.cpu()] for o in out]


def run_layer_bench_dist(args) -> dict:
    from msmoe_dist.bench.layer import floor_cases, machine_info
    from msmoe_dist.config.schema import MoEConfig
    from msmoe_dist.moe import ACTIVATIONS, MoELayer
    from msmoe_dist.parallel import (AllToAllDispatcher, ParallelLayout, build_process_groups,
                                     env_rank_world)

    rank, world, local_rank = env_rank_world()
    if rank != 0:
        silence_stdout_for_good()
    T, D, F, E, K = args.tokens, args.d_model, args.ffn, args.experts, args.top_k
    P = world
    repeats = args.repeats if args.repeats is not None else 10
    if E % P:
        raise ValueError(f"experts={E} must be divisible by the world size {P} (ep_size = world size)")
    L = E // P
    if (T * K * P) % E:
        raise ValueError(f"tokens*top_k*world={T * K * P} must be divisible by experts={E} for the balanced floor")
    C = T * K * P // E

    if args.device == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
        threads = torch.get_num_threads()
    else:
        device = torch.device("cpu")
        backend = "gloo"
        threads = max(1, (os.cpu_count() or 1) // world)  # the ranks share the machine's cores
        torch.set_num_threads(threads)
    machine = machine_info(device)
    machine.update({"threads_per_rank": threads, "world_size": world, "backend": backend})
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    autocast = (
        torch.autocast(device_type=device.type, dtype=torch.bfloat16) if args.dtype == "bf16" else nullcontext()
    )

    created = False
    with stdout_to_stderr():
        if not dist.is_initialized():
            dist.init_process_group(backend=backend, timeout=COLLECTIVE_TIMEOUT)
            created = True
        try:
            pg = build_process_groups(ParallelLayout(world, P), rank)
            # Dense (router) weights are the same on every rank, as in training; inputs differ.
            torch.manual_seed(0)
            cfg = MoEConfig(num_experts=E, top_k=K, expert_ffn_dim=F, capacity_factor=0.0, expert_impl="grouped")
            layer = MoELayer(D, cfg, dispatcher=AllToAllDispatcher(E, pg.ep, P, pg.ep_rank)).to(device)
            gen = torch.Generator(device="cpu").manual_seed(1000 + rank)
            x_TD = torch.randn(T, D, generator=gen).to(device).requires_grad_()
            g_TD = torch.randn(T, D, generator=gen).to(device)
            x_LCD = torch.randn(L, C, D, generator=gen).to(device).requires_grad_()
            g_LCD = torch.randn(L, C, D, generator=gen).to(device)

            def ours():
                layer(x_TD).out.backward(g_TD)

            cases = {"ours": ours}
            cases.update(floor_cases(layer.experts, ACTIVATIONS[cfg.activation], x_LCD, g_LCD))
            params = list(layer.parameters())
            grads_of = [x_TD, x_LCD]

            ds_note = None
            if args.deepspeed:
                _init_deepspeed_comm(backend)
                torch.manual_seed(0)
                moe = build_deepspeed_moe(D, F, E, K, P, device)
                x_ds = x_TD.detach().clone().requires_grad_()
                params += list(moe.parameters())
                grads_of.append(x_ds)

                def deepspeed_case():
                    moe(x_ds)[0].backward(g_TD)

                cases["deepspeed"] = deepspeed_case
            else:
                ds_note = "skipped (--no-deepspeed)"

            names = list(cases)
            rounds: list[torch.Tensor] = []
            mine: list[list[float]] = []
            with autocast:
                for rnd in range(args.warmup + repeats):
                    row = []
                    for name in names:
                        for p in params + grads_of:
                            p.grad = None
                        sync()
                        dist.barrier()
                        t0 = time.perf_counter()
                        cases[name]()
                        sync()
                        row.append((time.perf_counter() - t0) * 1e3)
                    t = torch.tensor(row, dtype=torch.float64, device=device)
                    dist.all_reduce(t, op=dist.ReduceOp.MAX)  # the slowest rank sets the step time
                    if rnd >= args.warmup:
                        rounds.append(t.cpu())
                        mine.append(row)
            worst = torch.stack(rounds)  # [repeats, cases]
            med = {n: statistics.median(worst[:, i].tolist()) for i, n in enumerate(names)}
            own_med = [statistics.median(r[i] for r in mine) for i in range(len(names))]
            per_rank = _per_rank(own_med, device)  # [rank][case]
            dist.barrier()
        finally:
            if created:
                if args.deepspeed:
                    import deepspeed.comm as ds_comm

                    ds_comm.destroy_process_group()
                if dist.is_initialized():
                    dist.destroy_process_group()

    floor = min(med["floor_bmm"], med["floor_loop"])
    result = {
        "benchmark": "layer",
        "world_size": world,
        "ep_size": P,
        "machine": machine,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "shapes": {"tokens_per_rank": T, "d_model": D, "ffn": F, "experts": E, "local_experts": L, "top_k": K,
                   "floor_rows_per_local_expert": C, "dtype": args.dtype, "device": device.type,
                   "repeats": repeats, "warmup": args.warmup},
        "ours_ms": round(med["ours"], 3),
        "floor_ms": round(floor, 3),
        "floor_bmm_ms": round(med["floor_bmm"], 3),
        "floor_loop_ms": round(med["floor_loop"], 3),
        "ratio": round(med["ours"] / floor, 4),
        "per_rank_median_ms": {n: [r[i] for r in per_rank] for i, n in enumerate(names)},
        "timing": "per case and round: max over ranks after a barrier; then the median over rounds",
    }
    if "deepspeed" in med:
        ds = med["deepspeed"]
        result.update({
            "deepspeed_ms": round(ds, 3),
            "deepspeed_ratio": round(ds / floor, 4),
            "speedup_vs_deepspeed": round(ds / med["ours"], 4),
            "deepspeed_settings": {"capacity_factor": DS_CAPACITY_FACTOR, "k": K, "drop_tokens": True,
                                   "min_capacity": 4, "ep_size": P,
                                   "capacity_rows_per_expert_slot": deepspeed_capacity(T, E, K)},
        })
    else:
        result["deepspeed"] = ds_note
    result["fairscale"] = fairscale_note()
    return result
