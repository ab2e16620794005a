"""Forward+backward time of one MoELayer against the floor of its expert FFN work, in one process
or expert-parallel (the CLI hands in the process groups when it runs under a launcher).

Every rank holds T tokens and L = E/P of the E experts (P = ranks = the expert-parallel degree; in
one process P = 1 and L = E). The cases, timed in turn within each round at the same shapes:

  ours          MoELayer, dropless: the local dispatcher in one process, the AllToAllDispatcher
                over the EP group otherwise
  floor_bmm     this rank's expert GEMMs alone on the rows a perfectly balanced routing gives them
                (C = T*K*P/E rows per local expert) as batched matmuls: no router, no dispatch, no
                communication
  floor_loop    the same as a per-expert loop; the faster of the two is the floor
  experts_only  our expert path alone on the floor's rows, so that ours - experts_only is what
                routing and dispatch (and, with P > 1, the all-to-alls) cost
  deepspeed     (``--deepspeed``, the default) DeepSpeed's own MoE layer, bench/deepspeed_moe.py,
                at ep_size = P in the process group the CLI started
  ours_overlap  (P > 1, ``--overlap-chunks`` N > 1, default 2) ours with moe.overlap_chunks = N: the
                all-to-alls pipelined with the expert GEMMs (parallel/overlap.py), same weights and inputs
  fairscale     (``--fairscale``, when the optional [bench] extra is installed) fairscale's MOELayer with
                its Top2Gate (capacity 2T/E per expert slot, overflow dropped) and L local experts

With P > 1 the result also has, for rank 0, the host milliseconds per step spent inside or waiting for each
MoE collective (CommStats), blocking vs overlapped: the communication the overlap is meant to hide.

Timing is bench/common.timed_rounds: rotating order; with P > 1 a barrier before every call and
the maximum over ranks per (round, case). Figures are medians over rounds.

Legend: T tokens per rank, D model dim, F expert ffn dim, E experts in total, K top-k, P ranks,
L = E/P local experts, C = T*K*P/E floor rows per local expert.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
from contextlib import nullcontext

import torch
import torch.distributed as dist

from msmoe_dist.bench.common import header, machine_info, timed_rounds
from msmoe_dist.bench.deepspeed_moe import (
    build_deepspeed_moe,
    build_fairscale_moe,
    deepspeed_capacity,
    deepspeed_settings,
    fairscale_capacity,
    fairscale_note,
)
from msmoe_dist.config.schema import MoEConfig
from msmoe_dist.moe import ACTIVATIONS, MoELayer
from msmoe_dist.parallel import AllToAllDispatcher, CommStats, ProcessGroups
from msmoe_dist.parallel import comm as collective

DEFAULT_REPEATS = 15  # one process
DEFAULT_REPEATS_EP = 10  # expert-parallel: every call also waits for a barrier


def add_layer_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--tokens", type=int, default=4096, help="tokens T per step (per rank under a launcher)")
    parser.add_argument("--d-model", type=int, default=256, help="model dim D")
    parser.add_argument("--ffn", type=int, default=1024, help="expert ffn dim F")
    parser.add_argument("--experts", type=int, default=8, help="experts E in total")
    parser.add_argument("--top-k", type=int, default=2, help="experts per token K")
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help=f"timed rounds, each timing every case once (default {DEFAULT_REPEATS}; "
        f"{DEFAULT_REPEATS_EP} under torchrun)",
    )
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds first")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="bf16 = autocast, fp32 weights")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--deepspeed",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time DeepSpeed-MoE (deepspeed.moe.layer.MoE) at the same shapes",
    )
    parser.add_argument(
        "--overlap-chunks",
        type=int,
        default=2,
        help="expert parallel only: also time `ours_overlap`, the same layer with moe.overlap_chunks=N (the "
        "all-to-all pipelined with the expert GEMMs); 1 = skip it (default 2)",
    )
    parser.add_argument(
        "--fairscale",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time fairscale's MOELayer (Top2Gate, top-2 only) when the optional [bench] extra is installed",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def floor_cases(ex, act, x_LCD: torch.Tensor, g_LCD: torch.Tensor) -> dict:
    """The floor's two candidates on the weights of ``ex`` (an Experts bank of L experts) and L
    equal row blocks x_LCD: batched matmuls, and a per-expert loop. Forward+backward each."""
    L = x_LCD.shape[0]
    if L != ex.num_experts:
        raise ValueError(f"{L} row blocks for {ex.num_experts} experts")

    def floor_bmm():
        h = act(torch.baddbmm(ex.b1.unsqueeze(1), x_LCD, ex.w1))
        torch.baddbmm(ex.b2.unsqueeze(1), h, ex.w2).backward(g_LCD)

    def floor_loop():
        ys = [torch.addmm(ex.b2[e], act(torch.addmm(ex.b1[e], x_LCD[e], ex.w1[e])), ex.w2[e]) for e in range(L)]
        torch.autograd.backward(ys, list(g_LCD.unbind(0)))

    return {"floor_bmm": floor_bmm, "floor_loop": floor_loop}


def _per_rank(values: list[float], device: torch.device) -> list[list[float]]:
    """Every rank's ``values``, gathered: [rank][i]."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    out = collective.all_gather(t, name="all_gather (benchmark times per rank)")
    return [[round(float(v), 3) for v in o.cpu()] for o in out]


def run_layer_bench(args, device: torch.device | None = None, pg: ProcessGroups | None = None) -> dict:
    """``pg`` None: one process, the local dispatcher. Otherwise expert parallel over ``pg.ep``
    (ep_size = world size), and torch.distributed must be started. ``device`` defaults to --device.

    The DeepSpeed case needs torch.distributed and DeepSpeed's comm layer started by the caller
    (msmoe-bench's CLI does, also for one process); without them it is skipped, and says so.
    """
    T, D, F, E, K = args.tokens, args.d_model, args.ffn, args.experts, args.top_k
    device = device if device is not None else torch.device(args.device)
    P = pg.layout.ep_size if pg is not None else 1
    rank = pg.rank if pg is not None else 0
    repeats = args.repeats if args.repeats is not None else (DEFAULT_REPEATS if pg is None else DEFAULT_REPEATS_EP)
    if pg is not None and pg.layout.world_size != P:
        raise ValueError(f"the layer benchmark runs with ep_size = world size, got {pg.layout}")
    if E % P:
        raise ValueError(f"experts={E} must be divisible by the world size {P} (ep_size = world size)")
    L = E // P
    if (T * K * P) % E:
        raise ValueError(f"tokens*top_k*world={T * K * P} must be divisible by experts={E} for the balanced floor")
    C = T * K * P // E
    machine = machine_info(device)
    if pg is not None:
        machine.update({"threads_per_rank": torch.get_num_threads(), "world_size": P, "backend": dist.get_backend()})
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16) if args.dtype == "bf16" else nullcontext()

    # Dense (router) weights are the same on every rank, as in training; inputs differ per rank.
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=E, top_k=K, expert_ffn_dim=F, capacity_factor=0.0, expert_impl="grouped")
    comm = {"ours": CommStats(), "ours_overlap": CommStats()}  # host time blocked in the collectives
    dispatcher = AllToAllDispatcher(E, pg.ep, P, pg.ep_rank, comm["ours"]) if pg is not None else None
    layer = MoELayer(D, cfg, dispatcher=dispatcher).to(device)
    ex = layer.experts
    gen = torch.Generator(device="cpu").manual_seed(0 if pg is None else 1000 + rank)
    x_TD = torch.randn(T, D, generator=gen).to(device).requires_grad_()
    g_TD = torch.randn(T, D, generator=gen).to(device)
    x_LCD = torch.randn(L, C, D, generator=gen).to(device).requires_grad_()
    g_LCD = torch.randn(L, C, D, generator=gen).to(device)
    x_RD = x_LCD.detach().view(L * C, D).requires_grad_()
    g_RD = g_LCD.view(L * C, D)

    def ours():
        layer(x_TD).out.backward(g_TD)

    def experts_only():
        ex(x_RD, [C] * L).backward(g_RD)

    cases = {"ours": ours, **floor_cases(ex, ACTIVATIONS[cfg.activation], x_LCD, g_LCD), "experts_only": experts_only}
    cleared = list(layer.parameters()) + [x_TD, x_LCD, x_RD]
    chunks = args.overlap_chunks
    if pg is not None and chunks > 1:
        # The same weights and inputs; only the exchange differs (pipelined in `chunks` pieces).
        overlapped = MoELayer(
            D,
            dataclasses.replace(cfg, overlap_chunks=chunks),
            dispatcher=AllToAllDispatcher(E, pg.ep, P, pg.ep_rank, comm["ours_overlap"]),
        ).to(device)
        overlapped.load_state_dict(layer.state_dict())
        cleared += list(overlapped.parameters())

        def ours_overlap():
            overlapped(x_TD).out.backward(g_TD)

        cases["ours_overlap"] = ours_overlap

    fs_note = fairscale_note() if args.fairscale else "skipped (--no-fairscale)"
    if fs_note is None and not dist.is_initialized():
        fs_note = "skipped: torch.distributed is not started (msmoe-bench layer starts it)"
    if fs_note is None:
        torch.manual_seed(0)
        try:
            fs = build_fairscale_moe(D, F, E, K, P, pg.ep if pg is not None else None, device)
            if T % (E // P):
                raise ValueError(f"fairscale's MOELayer needs tokens={T} divisible by the local experts {E // P}")
        except Exception as exc:  # an optional comparison; say why it is missing (same on every rank)
            fs_note = "skipped: " + " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
        else:
            x_fs = x_TD.detach().view(E // P, T // (E // P), D).clone().requires_grad_()
            g_fs = g_TD.view(x_fs.shape)
            cleared += list(fs.parameters()) + [x_fs]

            def fairscale_case():
                fs(x_fs).backward(g_fs)

            cases["fairscale"] = fairscale_case

    ds_note = None
    if not args.deepspeed:
        ds_note = "skipped (--no-deepspeed)"
    elif not dist.is_initialized():
        ds_note = "skipped: torch.distributed and DeepSpeed's comm are not started (msmoe-bench layer starts them)"
    else:
        torch.manual_seed(0)
        try:
            moe = build_deepspeed_moe(D, F, E, K, P, device)
        except Exception as exc:  # an optional comparison; say why it is missing
            if pg is not None:
                raise  # the other ranks would wait for this one's collectives forever
            ds_note = "skipped: " + " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
        else:
            x_ds = x_TD.detach().clone().requires_grad_()
            cleared += list(moe.parameters()) + [x_ds]

            def deepspeed_case():
                moe(x_ds)[0].backward(g_TD)

            cases["deepspeed"] = deepspeed_case

    def clear_grads():
        # A training step starts from cleared gradients; accumulating into old ones would add work
        # that neither side needs.
        for t in cleared:
            t.grad = None

    own: dict[str, list[float]] = {}
    for c in comm.values():
        c.reset()
    with autocast:
        times = timed_rounds(
            cases, repeats, args.warmup, device, group=pg.dp if pg is not None else None, reset=clear_grads, own=own
        )
    med = {name: statistics.median(v) for name, v in times.items()}
    floor = min(med["floor_bmm"], med["floor_loop"])
    if pg is None:
        shapes = {"tokens": T, "d_model": D, "ffn": F, "experts": E, "top_k": K, "rows_per_expert": C}
    else:
        shapes = {
            "tokens_per_rank": T,
            "d_model": D,
            "ffn": F,
            "experts": E,
            "local_experts": L,
            "top_k": K,
            "floor_rows_per_local_expert": C,
        }
    shapes.update({"dtype": args.dtype, "device": device.type, "repeats": repeats, "warmup": args.warmup})
    result = {
        **header("layer", shapes, machine),
        "world_size": P,
        "ours_ms": round(med["ours"], 3),
        "floor_ms": round(floor, 3),
        "floor_bmm_ms": round(med["floor_bmm"], 3),
        "floor_loop_ms": round(med["floor_loop"], 3),
        "ratio": round(med["ours"] / floor, 4),
        "experts_only_ms": round(med["experts_only"], 3),
    }
    if "ours_overlap" in med:
        result.update(
            {
                "overlap_chunks": chunks,
                "ours_overlap_ms": round(med["ours_overlap"], 3),
                "overlap_ratio": round(med["ours_overlap"] / floor, 4),
                "speedup_overlap_vs_blocking": round(med["ours"] / med["ours_overlap"], 4),
            }
        )
    if pg is not None:
        # Where the time goes: per step, the host time this rank spent inside (blocking) or waiting for
        # (overlapped) the MoE collectives, by name; the rest of `ours` is the experts (experts_only) and
        # the local routing/permutation work.
        calls = args.warmup + repeats
        blocked = {
            case: {name: round(t.seconds * 1e3 / calls, 3) for name, t in c.by_name.items()}
            for case, c in comm.items()
            if case in cases
        }
        result["comm_blocked_ms_per_step_rank0"] = blocked if rank == 0 else None
        per_rank = _per_rank([statistics.median(own[n]) for n in cases], device)  # [rank][case]
        result.update(
            {
                "ep_size": P,
                "per_rank_median_ms": {n: [r[i] for r in per_rank] for i, n in enumerate(cases)},
                "timing": "per case and round: max over ranks after a barrier; then the median over rounds",
            }
        )
    if "deepspeed" in med:
        ds = med["deepspeed"]
        settings = deepspeed_settings(T, E, K, P)
        # one process: rows per expert; expert parallel: rows per (rank, expert) slot
        settings["capacity_rows_per_expert" if pg is None else "capacity_rows_per_expert_slot"] = deepspeed_capacity(
            T, E, K
        )
        result.update(
            {
                "deepspeed_ms": round(ds, 3),
                "deepspeed_ratio": round(ds / floor, 4),
                "speedup_vs_deepspeed": round(ds / med["ours"], 4),
                "deepspeed_settings": settings,
            }
        )
    else:
        result["deepspeed"] = ds_note
    if "fairscale" in med:
        result.update(
            {
                "fairscale_ms": round(med["fairscale"], 3),
                "fairscale_ratio": round(med["fairscale"] / floor, 4),
                "speedup_vs_fairscale": round(med["fairscale"] / med["ours"], 4),
                "fairscale_settings": {
                    "gate": "Top2Gate (GShard: Gumbel-sampled second expert)",
                    "capacity_rows_per_expert_slot": fairscale_capacity(T, E),
                    "drop_tokens": True,
                    "dispatch": "einsum with dense [tokens, experts, capacity] masks",
                },
            }
        )
    else:
        result["fairscale"] = fs_note
    return result
