"""Text tables and JSON rows of a plan."""

from __future__ import annotations

from dataclasses import asdict

from msmoe_dist.plan.census import Census
from msmoe_dist.plan.cluster import Cluster
from msmoe_dist.plan.search import GIB, Candidate


def bound_of(c: Candidate) -> str:
    """What limits this configuration: memory (within 10% of the budget), compute, or communication."""
    t = c.time
    comm = t.all_to_all + t.grad_reduce
    work = t.compute + t.memory_ops
    return "communication" if comm > work else "compute"


def candidate_row(c: Candidate) -> dict:
    s = c.setting
    return {
        "world": s.world,
        "ep_size": s.ep_size,
        "edp_size": s.edp,
        "zero_stage": s.zero_stage,
        "micro_batch": s.micro_batch,
        "activation_checkpointing": s.checkpointing,
        "engine": s.engine,
        "dtype": s.dtype,
        "imbalance": s.imbalance,
        "fits": c.fits,
        "memory_gib": {k: v / GIB for k, v in asdict(c.memory).items()} | {"peak": c.memory.peak / GIB},
        "step_s": c.time.as_dict(),
        "tokens_per_s": c.tokens_per_s,
        "mfu": c.mfu,
        "bound": bound_of(c),
    }


def census_row(c: Census) -> dict:
    return {
        "micro_batch": c.micro_batch,
        "tokens": c.tokens,
        "vocab": c.vocab,
        "dense_params": c.dense_params,
        "expert_params_total": c.expert_params_total,
        "num_moe_layers": c.num_moe_layers,
        "flops_per_micro_batch": c.flops,
        "saved_bytes_per_micro_batch": c.saved_bytes,
    }


def _gib(x: float) -> str:
    return f"{x / GIB:8.2f}"


def print_plan(cands: list[Candidate], census: Census, cluster: Cluster, world: int, top: int = 10) -> None:
    best = cands[0]
    s, m, t = best.setting, best.memory, best.time
    print(
        f"msmoe-plan: {world} x {cluster.name} ({cluster.gpus_per_node} per node, "
        f"{cluster.gpu_memory_gib * cluster.usable_memory_fraction:.1f} GiB usable, {cluster.sustained_tflops:g} "
        f"TFLOP/s sustained)"
    )
    total = census.dense_params + census.expert_params_total
    active = census.dense_params + census.expert_params_total * census.top_k // max(census.num_experts, 1)
    print(
        f"model: {total / 1e6:,.1f} M parameters ({census.dense_params / 1e6:,.1f} M dense, "
        f"{census.expert_params_total / 1e6:,.1f} M in experts; {active / 1e6:,.1f} M active per token), "
        f"vocab {census.vocab:,}, {census.num_moe_layers} MoE layers"
    )
    print(
        f"best: ep_size={s.ep_size} zero_stage={s.zero_stage} micro_batch={s.micro_batch} "
        f"activation_checkpointing={s.checkpointing} ({s.engine}, {s.dtype}, imbalance {s.imbalance:g})"
    )
    print("memory per rank (GiB)")
    for name, val in (
        ("parameters", m.params),
        ("gradients", m.grads),
        ("optimizer state", m.optimizer),
        ("activations", m.activations),
        ("all-to-all buffers", m.a2a_buffers),
        ("transient (bwd/logits)", m.transient),
        ("ZeRO 1/2 reduce bucket", m.zero_bucket),
        ("peak", m.peak),
    ):
        print(f"  {name:<24}{_gib(val)}")
    print(f"step time ({t.micro_batches} micro-batches)")
    for name, secs in (
        ("compute (GEMM, attention)", t.compute),
        ("element-wise (memory)", t.memory_ops),
        ("all-to-all", t.all_to_all),
        ("gradient reduce", t.grad_reduce),
        ("optimizer", t.optimizer),
        ("total, no overlap", t.serial),
        ("total, full overlap", t.overlapped),
    ):
        print(f"  {name:<28}{secs * 1e3:10.1f} ms")
    print(f"  tokens/s {best.tokens_per_s:,.0f} (all ranks), MFU {100 * best.mfu:.1f}%, {bound_of(best)}-bound")
    print(f"top {min(top, len(cands))} of {len(cands)} configurations (fitting first, fastest first)")
    head = ("ep", 4), ("zero", 4), ("mb", 4), ("ckpt", 9), ("peak GiB", 9), ("fits", 5), ("step ms", 9), ("tok/s", 12)
    print("  " + " ".join(f"{h:>{w}}" for h, w in head) + f" {'MFU':>6}")
    for c in cands[:top]:
        s = c.setting
        print(
            f"  {s.ep_size:>4} {s.zero_stage:>4} {s.micro_batch:>4} {s.checkpointing:>9} {c.memory.peak / GIB:>9.2f} "
            f"{'yes' if c.fits else 'no':>5} {c.time.serial * 1e3:>9.1f} {c.tokens_per_s:>12,.0f} {100 * c.mfu:>5.1f}%"
        )
