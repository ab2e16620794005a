"""msmoe-bench gpu-check (launch/gpu_check.sh): the one-GPU acceptance checks.

Checks, each in its own child process with its own time limit (a hang or a CUDA error in one cannot
take the others down), in this order:

  a         grouped-GEMM experts (the path Experts.forward takes: torch._grouped_mm where it works)
            equal the per-expert loop, forward and gradients, in fp32 and in bf16 autocast
  b         MoE layer forward+backward vs its expert-GEMM floor, bf16, d 1024, ffn 4096, 16 experts,
            top-2, 16k tokens (msmoe-bench layer; goal <= 1.2x the floor)
  c_full, c_chunked, c_adaptive
            the WikiText-103 medium config's training step (native engine, bf16 autocast, the
            config's batch, the real 267,735-word vocabulary, Zipf ids): tokens/s, MFU, peak
            torch.cuda.max_memory_allocated, per model.output_layer
  d_bf16    the DeepSpeed engine (NCCL, world size 1, ZeRO 2, bf16) through the real trainer: 20
            steps with a checkpoint at 10; a copy of the run resumed from step 10 must log steps
            11-20 exactly as the uninterrupted run did
  d_fp16    the same in fp16 with dynamic loss scaling, then deliberately overflowing steps that must
            be skipped (weights untouched) until the loss scale halves (after the configured
            hysteresis), and an ordinary step afterwards that updates the weights
  e         the native engine with train.dtype=bf16 through the trainer (finite, falling loss)
  f         V-MoE ViT-S/32 training-step images/s of each momentum variant (msmoe-bench vit)
  d_ep2     d_bf16 at expert parallelism 2 under torchrun (2 ranks; only with >= 2 GPUs)
  b_ep2     (b) at expert parallelism 2 under torchrun (2 ranks, NCCL; only with >= 2 GPUs): the blocking
            all-to-all vs moe.overlap_chunks=2 in one run, and each one's host time blocked in its collectives

After every check its result is written into the JSON file (--out, default gpu_check.json), so a
later failure or a kill keeps what was measured; a table is printed at the end. Exit status 0 when
every check that ran passed or was measured, 1 otherwise, 2 without CUDA (one line says so).
Timing goals are reported (goal_met), never a failure.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "configs" / "quickstart.yaml"
MEDIUM = REPO / "configs" / "wikitext103" / "momentum_smoe_medium.yaml"
VIT_S32 = REPO / "configs" / "imagenet" / "vmoe_s32.yaml"
VIT_TINY = REPO / "configs" / "imagenet" / "tiny_synthetic.yaml"
RESULT_MARK = "GPU_CHECK_RESULT "
DEFAULT_BUDGET_S = 450.0  # the 8 minutes, less start-up and the table
# Statuses that count as success; "oom" is a measurement (the variant does not fit this GPU).
OK = ("pass", "measured", "oom", "skipped")


@dataclasses.dataclass
class Ctx:
    """What a check runs with: device, backend, scratch directory, sizes (``small``: CPU test sizes)."""

    device: str  # "cuda" or "cpu" (tests)
    backend: str  # "nccl" or "gloo"
    work: Path
    small: bool
    peak_tflops: float | None


@dataclasses.dataclass(frozen=True)
class Check:
    name: str
    title: str
    timeout_s: float
    fn: Callable[[Ctx], dict]
    ranks: int = 1  # > 1: launched under torchrun with this many processes (one GPU each)
    env: tuple[tuple[str, str], ...] = ()


# ---------------------------------------------------------------------------------------------------
# helpers


def rel_err(got, want) -> float:
    """||got - want|| / ||want|| (Frobenius, float64). A norm over the whole tensor, not the largest
    entry: a ReLU whose input rounds to the other side of zero in one path changes a few entries by
    a lot, which says nothing about the kernels."""
    g, w = got.detach().double(), want.detach().double()
    return float((g - w).norm() / w.norm().clamp_min(1e-30))


def _sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]


# Keys of a metrics row that depend on wall time or on the process's memory history, not on the computation.
def _timing_key(key: str) -> bool:
    return key.endswith("_per_s") or "time" in key or key.endswith("_s") or key.endswith("_gib")


def _canonical(row: dict) -> str:
    """A row as text, timing keys left out: floats print exactly (repr round-trips), and a NaN (the
    grad norm of a step fp16 skipped) equals a NaN, which == on floats would deny."""
    return json.dumps({k: v for k, v in row.items() if not _timing_key(k)}, sort_keys=True, allow_nan=True)


def compare_traces(reference: list[dict], resumed: list[dict], after_step: int) -> dict:
    """Rows logged after ``after_step`` in both runs, compared exactly (timing keys left out)."""
    want = [r for r in reference if r.get("step", 0) > after_step]
    got = [r for r in resumed if r.get("step", 0) > after_step]
    same = [_canonical(a) == _canonical(b) for a, b in zip(want, got)]
    out: dict[str, Any] = {"rows_compared": len(want), "exact": len(want) == len(got) > 0 and all(same)}
    if not out["exact"]:
        diffs = []
        for a, b in zip(want, got):
            for k in sorted(set(a) | set(b)):
                if not _timing_key(k) and json.dumps(a.get(k)) != json.dumps(b.get(k)):
                    diffs.append({"step": a.get("step"), "key": k, "uninterrupted": a.get(k), "resumed": b.get(k)})
        out["first_differences"] = diffs[:5]
        if len(want) != len(got):
            out["row_counts"] = {"uninterrupted": len(want), "resumed": len(got)}
    return out


def loss_scale(ds_engine) -> float:
    """DeepSpeed's current dynamic loss scale (ZeRO 1/2 optimiser: cur_scale / loss_scale)."""
    opt = ds_engine.optimizer
    for attr in ("cur_scale", "loss_scale"):
        val = getattr(opt, attr, None)
        if isinstance(val, (int, float)):
            return float(val)
    scaler = getattr(opt, "loss_scaler", None)
    if scaler is not None:
        return float(scaler.cur_scale)
    raise RuntimeError(f"no loss scale on {type(opt).__name__}")


# ---------------------------------------------------------------------------------------------------
# (a) grouped experts == per-expert loop


def _experts_pass(ex, x0, gy, counts, impl: str, bf16: bool) -> dict:
    """Output and every gradient of one path (Experts.forward, or the per-expert loop)."""
    import torch

    ex.zero_grad(set_to_none=True)
    x = x0.clone().requires_grad_()
    with torch.autocast(x0.device.type, dtype=torch.bfloat16, enabled=bf16):
        y = ex(x, counts) if impl == "forward" else ex.forward_loop(x, counts)
    y.backward(gy.to(y.dtype))
    out = {"out": y.detach(), "x.grad": x.grad}
    out.update({f"{n}.grad": p.grad for n, p in ex.named_parameters()})
    return out


def check_experts(ctx: Ctx) -> dict:
    """fp32: Experts.forward (torch._grouped_mm on CUDA where it works, else the split path) against
    the per-expert loop directly, relative error <= 1e-5 (TF32 off). bf16 (autocast): both paths
    against a float64 loop on the same bf16-rounded inputs and weights; the forward path's error may
    be at most 1.5x the loop's + 0.01 (bf16 rounds differently in each kernel, so the two bf16 paths
    are compared by how far each is from exact, not with each other)."""
    import copy

    import torch

    from msmoe_dist.moe.experts import Experts, grouped_mm_works

    device = torch.device(ctx.device)
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 here
    E, D, F = (4, 32, 64) if ctx.small else (8, 512, 1024)
    counts = [37, 0, 5, 90] if ctx.small else [1000, 0, 17, 2048, 333, 1, 640, 1057]  # uneven, one empty
    torch.manual_seed(0)
    ex = Experts(E, D, F, "relu").to(device)
    with torch.no_grad():
        for b in (ex.b1, ex.b2):
            b.normal_(0.0, 0.02)  # non-zero biases, so their additions and gradients are checked too
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(sum(counts), D, generator=g).to(device)
    gy = torch.randn(sum(counts), D, generator=g).to(device)
    results: dict[str, Any] = {"experts": E, "d_model": D, "ffn": F, "rows": counts}

    def path(dtype) -> str:
        if device.type != "cuda":
            return "split (the CPU's path)"
        return "grouped_mm" if grouped_mm_works(device, dtype, D, F) else "split (torch._grouped_mm unusable here)"

    fwd, loop = _experts_pass(ex, x0, gy, counts, "forward", False), _experts_pass(ex, x0, gy, counts, "loop", False)
    errs = {k: rel_err(fwd[k], loop[k]) for k in loop}
    ok32 = all(e <= 1e-5 for e in errs.values())
    results["fp32"] = {"path": path(torch.float32), "rel_err_vs_loop": errs, "tolerance": 1e-5, "pass": ok32}

    ref_ex = copy.deepcopy(ex)
    with torch.no_grad():
        for p in ref_ex.parameters():
            p.data = p.data.to(torch.bfloat16).double()
    ref = _experts_pass(ref_ex, x0.to(torch.bfloat16).double(), gy.to(torch.bfloat16).double(), counts, "loop", False)
    fwd, loop = _experts_pass(ex, x0, gy, counts, "forward", True), _experts_pass(ex, x0, gy, counts, "loop", True)
    e_fwd = {k: rel_err(fwd[k], ref[k]) for k in ref}
    e_loop = {k: rel_err(loop[k], ref[k]) for k in ref}
    ok16 = all(math.isfinite(e_fwd[k]) and e_fwd[k] <= 1.5 * e_loop[k] + 0.01 for k in ref)
    results["bf16"] = {
        "path": path(torch.bfloat16),
        "rel_err_vs_fp64": e_fwd,
        "loop_rel_err_vs_fp64": e_loop,
        "tolerance": "forward's error <= 1.5 x the loop's + 0.01",
        "pass": ok16,
    }
    results["status"] = "pass" if ok32 and ok16 else "fail"
    return results


# ---------------------------------------------------------------------------------------------------
# (b) MoE layer vs its floor


def check_layer(ctx: Ctx) -> dict:
    import torch

    from msmoe_dist.bench.layer import run_layer_bench

    if ctx.small:
        shape = {"tokens": 256, "d_model": 32, "ffn": 64, "experts": 4, "top_k": 2, "repeats": 2, "warmup": 1}
    else:
        shape = {"tokens": 16384, "d_model": 1024, "ffn": 4096, "experts": 16, "top_k": 2, "repeats": 10, "warmup": 3}
    args = argparse.Namespace(
        **shape, dtype="bf16", device=ctx.device, deepspeed=False, fairscale=False, overlap_chunks=1, json=True
    )
    res = run_layer_bench(args, torch.device(ctx.device), None)
    goal = 1.2
    keep = ("ours_ms", "floor_ms", "floor_bmm_ms", "floor_loop_ms", "experts_only_ms", "ratio", "shapes")
    return {
        "status": "measured",
        **{k: res[k] for k in keep},
        "goal_ratio": goal,
        "goal_met": res["ratio"] <= goal,
        "timing": "CUDA events" if ctx.device == "cuda" else "time.perf_counter",
    }


def check_layer_ep2(ctx: Ctx) -> dict:
    """(b) at expert parallelism 2 (torchrun, one GPU per rank, NCCL): the blocking exchange vs
    moe.overlap_chunks=2 (all-to-all pipelined with the expert GEMMs), in one run at the same inputs."""
    from msmoe_dist.bench.layer import run_layer_bench
    from msmoe_dist.config.schema import ParallelConfig
    from msmoe_dist.parallel import ParallelLayout, build_process_groups
    from msmoe_dist.parallel.runtime import Runtime

    runtime = Runtime.from_env(ctx.device)
    runtime.start_distributed(ParallelConfig(ep_size=2, backend=ctx.backend, timeout_s=120.0))
    pg = build_process_groups(ParallelLayout(runtime.world_size, runtime.world_size), runtime.rank, 120.0)
    if ctx.small:
        shape = {"tokens": 256, "d_model": 32, "ffn": 64, "experts": 4, "top_k": 2, "repeats": 2, "warmup": 1}
    else:
        shape = {"tokens": 16384, "d_model": 1024, "ffn": 4096, "experts": 16, "top_k": 2, "repeats": 10, "warmup": 3}
    args = argparse.Namespace(
        **shape, dtype="bf16", device=ctx.device, deepspeed=False, fairscale=False, overlap_chunks=2, json=True
    )
    res = run_layer_bench(args, runtime.device, pg)
    keep = ("ours_ms", "ours_overlap_ms", "speedup_overlap_vs_blocking", "floor_ms", "experts_only_ms", "ratio")
    return {
        "status": "measured",
        **{k: res[k] for k in keep},
        "overlap_ratio": res["overlap_ratio"],
        "comm_blocked_ms_per_step_rank0": res["comm_blocked_ms_per_step_rank0"],
        "shapes": res["shapes"],
        "timing": "CUDA events, max over ranks" if ctx.device == "cuda" else "time.perf_counter, max over ranks",
    }


# ---------------------------------------------------------------------------------------------------
# (c) WikiText-103 medium step per output layer


def _wikitext_overrides(kind: str, small: bool, device: str) -> list[str]:
    from msmoe_dist.bench.memory import WIKITEXT103_VOCAB

    out = [
        f"model.output_layer={kind}",
        "model.tie_embeddings=false",
        f"train.device={device}",
        "train.dtype=bf16",
        "parallel.engine=native",
    ]
    if small:
        out += [
            "model.vocab_size=1000",
            "model.num_layers=1",
            "model.d_model=32",
            "model.ffn_dim=32",
            "model.num_heads=2",
            "moe.num_experts=4",
            "moe.expert_ffn_dim=32",
            "model.adaptive_cutoffs=100,500",
            "data.batch_size=2",
            "data.seq_len=16",
            "model.max_seq_len=16",
            "model.output_chunk_tokens=8",
        ]
    else:
        out.append(f"model.vocab_size={WIKITEXT103_VOCAB}")
    return out


def check_wikitext_step(kind: str) -> Callable[[Ctx], dict]:
    def run(ctx: Ctx) -> dict:
        import torch

        from msmoe_dist.bench.common import timed_rounds
        from msmoe_dist.bench.memory import zipf_ids
        from msmoe_dist.bench.mfu import mfu_report
        from msmoe_dist.config.loader import load_config
        from msmoe_dist.models import MoELanguageModel
        from msmoe_dist.train.native_engine import NativeEngine

        cfg = load_config(MEDIUM, _wikitext_overrides(kind, ctx.small, ctx.device))
        device = torch.device(ctx.device)
        vocab, B, S = cfg.model.vocab_size, cfg.data.batch_size, cfg.data.seq_len
        out: dict[str, Any] = {
            "output_layer": kind,
            "batch": B,
            "seq_len": S,
            "tokens_per_step": B * S,
            "vocab": vocab,
            "dtype": "bf16 autocast (fp32 weights), native engine",
        }
        torch.manual_seed(0)
        model = MoELanguageModel(cfg.model, cfg.moe, cfg.momentum, vocab)
        engine = NativeEngine(model, cfg.optim, cfg.train, device)
        idx = zipf_ids(vocab, B * (S + 1)).view(B, S + 1)
        micro = [(idx[:, :-1], idx[:, 1:])]
        losses: list[float] = []

        def step() -> None:
            losses.append(engine.train_step(micro, collect_stats=False).loss)

        repeats, warmup = (2, 1) if ctx.small else (5, 2)
        try:
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            ms = timed_rounds({"step": step}, repeats, warmup, device)["step"]
        except torch.cuda.OutOfMemoryError as exc:
            out.update({"status": "oom", "reason": " ".join(str(exc).split())[:200]})
            if device.type == "cuda":
                out["peak_gib_at_oom"] = torch.cuda.max_memory_allocated() / 2**30
            return out
        med = statistics.median(ms)
        tps = B * S / (med / 1e3)
        rep = mfu_report(
            model,
            top_k=cfg.moe.top_k,
            num_experts=cfg.moe.num_experts,
            layers=cfg.model.num_layers,
            d_model=cfg.model.d_model,
            seq_len=S,
            tokens_per_s=tps,
            device=device,
            peak_override=ctx.peak_tflops,
            tied_output=False,
        )
        out.update(
            {
                "status": "measured" if all(math.isfinite(v) for v in losses) else "fail",
                "step_ms": med,
                "tokens_per_s": tps,
                "mfu": rep["mfu"],
                "model_tflops_per_s": rep["model_tflops_per_s"],
                "peak_tflops": rep["peak_tflops"],
                "active_params": rep["params"]["active"],
                "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
                "losses": losses,
            }
        )
        if kind == "adaptive":
            out["mfu_note"] = "adaptive: the output layer's FLOPs are counted as all its parameters (an upper bound)"
        return out

    return run


# ---------------------------------------------------------------------------------------------------
# (d) DeepSpeed engine: checkpoint at 10, resume reproduces 11-20; fp16 overflow step


def _trainer_overrides(ctx: Ctx, run_dir: Path, dtype: str, engine: str, ep_size: int = 1) -> list[str]:
    out = [
        f"train.device={ctx.device}",
        f"parallel.engine={engine}",
        f"parallel.backend={ctx.backend}",
        f"parallel.ep_size={ep_size}",
        "parallel.zero_stage=2",
        f"train.dtype={dtype}",
        "train.max_steps=20",
        "checkpoint.every_steps=10",
        "checkpoint.keep_last=3",
        "logging.log_every=1",
        "logging.tensorboard=false",
        "train.progress=false",
        "train.eval_every=0",
        "train.eval_batches=2",
        "optim.warmup_steps=5",
        f"data.path={ctx.work / 'data'}",
        f"train.run_dir={run_dir}",
        "train.overwrite=true",
    ]
    if ctx.small:
        out += ["data.synthetic_lines=400", "model.num_layers=1", "model.d_model=32", "moe.expert_ffn_dim=32"]
        out += ["data.batch_size=2", "data.seq_len=16", "model.max_seq_len=16", "model.num_heads=2"]
    return out


def _is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        from msmoe_dist.parallel import comm

        comm.barrier(name="barrier (gpu check)")


def resume_reproduces(ctx: Ctx, dtype: str, ep_size: int = 1) -> dict:
    """Run A: 20 steps, checkpoints at 10 and 20. Run B: a copy of A whose latest checkpoint is
    step 10, resumed: its metrics rows after step 10 must equal A's exactly."""
    import torch

    from msmoe_dist.checkpoint.layout import LATEST, step_dir_name
    from msmoe_dist.config.loader import load_config
    from msmoe_dist.train.trainer import run

    # Resume is checked, not the GPU's atomics: scatter/index_add backward on CUDA is not
    # deterministic by default, which would differ between two uninterrupted runs as well.
    torch.use_deterministic_algorithms(True, warn_only=True)
    base = ctx.work / f"d_{dtype}_ep{ep_size}"
    full, resumed = base / "uninterrupted", base / "resumed"
    t0 = time.perf_counter()
    run(load_config(QUICKSTART, _trainer_overrides(ctx, full, dtype, "deepspeed", ep_size)))
    if _is_main():
        shutil.rmtree(resumed, ignore_errors=True)
        shutil.copytree(full, resumed)
        shutil.rmtree(resumed / "checkpoints" / step_dir_name(20))
        (resumed / "checkpoints" / LATEST).write_text(step_dir_name(10) + "\n")
    _barrier()
    t1 = time.perf_counter()
    overrides = _trainer_overrides(ctx, resumed, dtype, "deepspeed", ep_size)
    overrides = [o for o in overrides if o != "train.overwrite=true"] + ["train.resume=true"]
    run(load_config(QUICKSTART, overrides))
    t2 = time.perf_counter()
    if not _is_main():
        return {"status": "pass"}  # rank 0 compares and reports
    cmp = compare_traces(read_metrics(full), read_metrics(resumed), after_step=10)
    rows = [r for r in read_metrics(full) if "loss" in r and "tokens_per_s" in r]
    return {
        "status": "pass" if cmp["exact"] else "fail",
        "engine": "deepspeed",
        "backend": ctx.backend,
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),
        "ep_size": ep_size,
        "zero_stage": 2,
        "dtype": dtype,
        "resume": cmp,
        "loss_first_last": [rows[0]["loss"], rows[-1]["loss"]] if rows else None,
        "deterministic_algorithms": "torch.use_deterministic_algorithms(True, warn_only=True)",
        "run_seconds": {"uninterrupted": round(t1 - t0, 1), "resumed": round(t2 - t1, 1)},
    }


def overflow_step_skipped(ctx: Ctx, dtype: str = "fp16") -> dict:
    """A DeepSpeed fp16 engine from the trainer's own builders; one ordinary step; then steps whose
    loss is multiplied by 1e12 (finite in fp32, but its fp16 gradients overflow) until the loss scale
    drops. Every such step must be skipped with the weights untouched, the scale must end halved
    (after the configured hysteresis), and an ordinary step afterwards must change the weights."""
    import torch

    from msmoe_dist.config.loader import load_config
    from msmoe_dist.parallel.runtime import Runtime
    from msmoe_dist.train.ds_engine import DeepSpeedEngine
    from msmoe_dist.train.engine import objective
    from msmoe_dist.train.tasks import make_task
    from msmoe_dist.train.trainer import build_engine, build_initial_model, local_expert_ids

    cfg = load_config(QUICKSTART, _trainer_overrides(ctx, ctx.work / f"d_{dtype}_overflow", dtype, "deepspeed"))
    runtime = Runtime.from_env(cfg.train.device)
    runtime.start_distributed(cfg.parallel)
    task = make_task(cfg)
    task.load_data()
    engine = build_engine(
        cfg, "deepspeed", runtime, build_initial_model(cfg, task, local_expert_ids(cfg, "deepspeed", runtime))
    )
    if not isinstance(engine, DeepSpeedEngine):
        raise TypeError(f"expected the DeepSpeed engine, got {type(engine).__name__}")
    ds = engine.engine  # deepspeed's own engine inside our wrapper
    task.start(0, engine.rank, engine.world_size)

    def weights() -> list[torch.Tensor]:
        ws = [p.detach().clone() for p in engine.model.parameters()]
        masters = getattr(ds.optimizer, "single_partition_of_fp32_groups", None) or []
        return ws + [m.detach().clone() for m in masters]

    def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
        return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))

    micro, _ = task.micro_batches(0)
    engine.set_step(0)
    engine.train_step(micro, collect_stats=False)
    hysteresis = int(engine.ds_config["fp16"].get("hysteresis", 1)) if dtype == "fp16" else 0
    scale0, skipped0 = loss_scale(ds), int(ds.skipped_steps)
    before = weights()
    steps = []
    x, y = task.micro_batches(1)[0][0]
    for _ in range(hysteresis + 1):
        out = ds(engine._input(x), y.to(engine.device))
        loss = objective(out).float() * 1e12
        finite = bool(torch.isfinite(loss.detach()))
        ds.backward(loss)
        ds.step()
        steps.append({"loss_finite": finite, "applied": bool(ds.was_step_applied()), "scale": loss_scale(ds)})
        if loss_scale(ds) < scale0:
            break
    after = weights()
    scale1 = loss_scale(ds)
    engine.set_step(2)
    engine.train_step(task.micro_batches(2)[0], collect_stats=False)
    ordinary_changes = not same(after, weights())
    checks = {
        "every_overflow_step_skipped": all(not s["applied"] for s in steps),
        "skipped_steps_counted": int(ds.skipped_steps) - skipped0 == len(steps),
        "weights_untouched": same(before, after),
        "scale_halved": scale1 == scale0 / 2,
        "next_ordinary_step_updates": ordinary_changes,
    }
    return {
        "status": "pass" if all(checks.values()) else "fail",
        "checks": checks,
        "weight_dtype": str(next(engine.model.parameters()).dtype),
        "hysteresis": hysteresis,
        "scale_before": scale0,
        "scale_after": scale1,
        "overflow_steps": steps,
    }


def check_deepspeed(dtype: str, ep_size: int = 1) -> Callable[[Ctx], dict]:
    def run(ctx: Ctx) -> dict:
        out = resume_reproduces(ctx, dtype, ep_size)
        if dtype == "fp16" and _is_main():
            ov = overflow_step_skipped(ctx)
            out["overflow"] = ov
            if ov["status"] != "pass":
                out["status"] = "fail"
        return out

    return run


# ---------------------------------------------------------------------------------------------------
# (e) native engine, bf16


def check_native_bf16(ctx: Ctx) -> dict:
    from msmoe_dist.config.loader import load_config
    from msmoe_dist.train.trainer import run

    run_dir = ctx.work / "e_native_bf16"
    overrides = [o for o in _trainer_overrides(ctx, run_dir, "bf16", "native") if not o.startswith("parallel.")]
    overrides += ["parallel.engine=native", "train.max_steps=30", "checkpoint.every_steps=0"]
    run(load_config(QUICKSTART, overrides))
    rows = [r for r in read_metrics(run_dir) if "tokens_per_s" in r]
    losses = [r["loss"] for r in rows]
    finite = all(math.isfinite(v) for v in losses)
    falls = len(losses) > 1 and statistics.mean(losses[-5:]) < statistics.mean(losses[:5])
    return {
        "status": "pass" if finite and falls else "fail",
        "steps": len(rows),
        "loss_first_last": [losses[0], losses[-1]] if losses else None,
        "finite": finite,
        "loss_falls": falls,
        "tokens_per_s_median": statistics.median(r["tokens_per_s"] for r in rows[5:] or rows) if rows else None,
    }


# ---------------------------------------------------------------------------------------------------
# (f) V-MoE ViT-S/32 images/s


def check_vit(ctx: Ctx) -> dict:
    from msmoe_dist.bench.vit_step import run_vit_bench

    if ctx.small:
        args = argparse.Namespace(
            config=str(VIT_TINY), batch=4, variants="none", repeats=1, warmup=1, device=ctx.device, dtype="bf16"
        )
    else:
        args = argparse.Namespace(
            config=str(VIT_S32),
            batch=256,
            variants="none,heavy_ball,adam,robust",
            repeats=5,
            warmup=2,
            device=ctx.device,
            dtype="bf16",
        )
    res = run_vit_bench(args)
    return {
        "status": "measured",
        "config": str(Path(args.config).relative_to(REPO)),
        "batch": args.batch,
        "dtype": "bf16 autocast",
        "images_per_s": res["images_per_s"],
        "ratio_vs_vmoe": res["ratio_vs_smoe"],
    }


# ---------------------------------------------------------------------------------------------------
# registry, child process, orchestration

DETERMINISTIC_ENV = (("CUBLAS_WORKSPACE_CONFIG", ":4096:8"),)

CHECKS: tuple[Check, ...] = (
    Check("a", "grouped experts == per-expert loop (fp32, bf16)", 90, check_experts),
    Check("b", "MoE layer fwd+bwd vs floor, bf16, 16k tokens", 120, check_layer),
    Check("c_full", "WikiText-103 medium step, output_layer=full", 120, check_wikitext_step("full")),
    Check("c_chunked", "WikiText-103 medium step, output_layer=chunked", 120, check_wikitext_step("chunked")),
    Check("c_adaptive", "WikiText-103 medium step, output_layer=adaptive", 120, check_wikitext_step("adaptive")),
    Check(
        "d_bf16", "DeepSpeed NCCL ZeRO-2 bf16: resume 11-20 exact", 180, check_deepspeed("bf16"), 1, DETERMINISTIC_ENV
    ),
    Check(
        "d_fp16",
        "DeepSpeed NCCL ZeRO-2 fp16: resume exact, overflow skipped",
        180,
        check_deepspeed("fp16"),
        1,
        DETERMINISTIC_ENV,
    ),
    Check("e", "native engine, train.dtype=bf16", 90, check_native_bf16),
    Check("f", "V-MoE ViT-S/32 images/s (bf16)", 150, check_vit),
    Check("d_ep2", "d_bf16 at EP 2 under torchrun (>= 2 GPUs)", 240, check_deepspeed("bf16", 2), 2, DETERMINISTIC_ENV),
    Check("b_ep2", "MoE layer at EP 2: blocking vs overlap_chunks=2 (>= 2 GPUs)", 180, check_layer_ep2, 2),
)
BY_NAME = {c.name: c for c in CHECKS}


def select(only: str | None) -> list[Check]:
    """--only a,c,d_fp16: names, or a letter for every check of that item (c = c_full, c_chunked, ...)."""
    if not only:
        return list(CHECKS)
    wanted = [w.strip() for w in only.split(",") if w.strip()]
    unknown = [w for w in wanted if not any(c.name == w or c.name.split("_")[0] == w for c in CHECKS)]
    if unknown:
        raise SystemExit(f"msmoe-bench gpu-check: unknown check(s) {', '.join(unknown)} (known: {', '.join(BY_NAME)})")
    return [c for c in CHECKS if any(c.name == w or c.name.split("_")[0] == w for w in wanted)]


def child_command(check: Check, args: argparse.Namespace, work: Path) -> list[str]:
    cmd = [sys.executable]
    if check.ranks > 1:
        cmd += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(check.ranks)]
    cmd += ["-m", "msmoe_dist.bench.gpu_check", "--child", check.name, "--work", str(work)]
    if args.device != "cuda":
        cmd += ["--device", args.device]
    if args.small:
        cmd.append("--small")
    if args.peak_tflops is not None:
        cmd += ["--peak-tflops", str(args.peak_tflops)]
    return cmd


def run_child(name: str, work: Path, device: str, small: bool, peak: float | None) -> dict:
    """In the child process: run one check and return its result (exceptions become status error)."""
    check = BY_NAME[name]
    ctx = Ctx(device, "nccl" if device == "cuda" else "gloo", work, small, peak)
    work.mkdir(parents=True, exist_ok=True)
    try:
        if device == "cuda":
            import torch

            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        return check.fn(ctx)
    except Exception as exc:  # reported in the JSON, with the traceback's last frames on stderr
        import traceback

        traceback.print_exc()
        return {"status": "error", "error": " ".join(f"{type(exc).__name__}: {exc}".split())[:500]}


def _tail(text: str, n: int = 3) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return " | ".join(lines[-n:])[-500:]


def run_one(check: Check, args: argparse.Namespace, work: Path, limit_s: float) -> dict:
    """One check in a child process (its own session, so a timeout kills torchrun and its ranks)."""
    env = {**os.environ, **dict(check.env), "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        child_command(check, args, work),
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=limit_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        return {"status": "timeout", "limit_s": round(limit_s, 1), "stderr_tail": _tail(stderr)}
    seconds = round(time.perf_counter() - t0, 1)
    found = [ln[len(RESULT_MARK) :] for ln in stdout.splitlines() if ln.startswith(RESULT_MARK)]
    if not found:
        return {"status": "error", "exit": proc.returncode, "seconds": seconds, "stderr_tail": _tail(stderr)}
    result = json.loads(found[0])
    result["seconds"] = seconds
    if proc.returncode != 0 and result.get("status") in OK:
        result.update({"status": "error", "exit": proc.returncode, "stderr_tail": _tail(stderr)})
    elif result.get("status") == "error":
        result["stderr_tail"] = _tail(stderr)
    return result


def write_json(path: Path, report: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(report, indent=1, default=str) + "\n")
    tmp.replace(path)


def summary(name: str, res: dict) -> str:
    """The table's last column: the figure that matters for each check."""
    st = res.get("status")
    if st in ("error", "timeout"):
        return str(res.get("error") or res.get("stderr_tail") or res.get("limit_s", ""))[:90]
    if st == "skipped":
        return str(res.get("reason", ""))
    if name == "a":
        e32, e16 = max(res["fp32"]["rel_err_vs_loop"].values()), max(res["bf16"]["rel_err_vs_fp64"].values())
        e16_loop = max(res["bf16"]["loop_rel_err_vs_fp64"].values())
        return f"fp32 vs loop {e32:.1e}; bf16 vs fp64 {e16:.1e} (loop {e16_loop:.1e}); {res['bf16']['path']}"
    if name == "b":
        met = "met" if res["goal_met"] else "NOT met"
        return f"ours {res['ours_ms']:.2f} ms / floor {res['floor_ms']:.2f} ms = {res['ratio']:.3f}x (goal 1.2x {met})"
    if name.startswith("c_"):
        if st == "oom":
            return f"out of memory at batch {res['batch']} ({res.get('peak_gib_at_oom', 0):.1f} GiB allocated)"
        mfu_ = "-" if res.get("mfu") is None else f"{100 * res['mfu']:.1f}%"
        peak = "-" if res.get("peak_gib") is None else f"{res['peak_gib']:.1f} GiB"
        return f"{res['tokens_per_s']:,.0f} tokens/s, MFU {mfu_}, peak {peak}"
    if name.startswith("d_"):
        text = f"resume rows {res['resume']['rows_compared']} exact={res['resume']['exact']}"
        if "overflow" in res:
            ov = res["overflow"]
            ok = ov.get("status") == "pass"
            text += f"; overflow: scale {ov.get('scale_before')} -> {ov.get('scale_after')}, skipped+untouched={ok}"
        return text
    if name == "e":
        first, last = res["loss_first_last"]
        return f"loss {first:.3f} -> {last:.3f}, {res['tokens_per_s_median']:,.0f} tokens/s"
    if name == "f":
        return ", ".join(f"{k} {v:,.0f} img/s" for k, v in res["images_per_s"].items())
    return ""


def print_table(report: dict) -> None:
    print(f"gpu-check {report['date']}, {report['machine'].get('gpu', report['device'])}, {report['gpus']} GPU(s)")
    print(f"{'check':<11} {'status':<9} {'s':>6}  result")
    for name, res in report["checks"].items():
        try:
            text = summary(name, res)
        except (KeyError, TypeError, ValueError, IndexError):
            text = res.get("reason", "") if isinstance(res, dict) else ""
        secs = res.get("seconds")
        print(f"{name:<11} {res.get('status', '?'):<9} {'' if secs is None else secs:>6}  {text}")


def add_gpu_check_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="gpu_check.json", help="result file, rewritten after every check")
    p.add_argument("--work", default=None, help="scratch directory for runs and data (default: <out>_work/)")
    p.add_argument("--only", default=None, help=f"comma-separated checks or item letters ({', '.join(BY_NAME)})")
    p.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S, help="wall-clock budget of all checks")
    p.add_argument("--peak-tflops", type=float, default=None, help="peak TFLOP/s for the MFU (default: looked up)")
    p.add_argument("--dry-run", action="store_true", help="list the checks and their commands; run nothing")
    # For the project's own CPU tests: run on the CPU (gloo) at tiny sizes. Not an acceptance run.
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help=argparse.SUPPRESS)
    p.add_argument("--small", action="store_true", help=argparse.SUPPRESS)


def run_gpu_check(args: argparse.Namespace) -> int:
    out = Path(args.out)
    # Absolute: the children run in the repository (configs, imports), wherever this was started.
    work = (Path(args.work) if args.work else out.with_name(out.stem + "_work")).resolve()
    checks = select(args.only)
    if args.dry_run:
        print(f"msmoe-bench gpu-check would run {len(checks)} check(s), budget {args.budget_s:.0f} s, into {out}:")
        for c in checks:
            when = f" (only with >= {c.ranks} GPUs, under torchrun)" if c.ranks > 1 else ""
            print(f"  {c.name:<11} {c.title}; limit {c.timeout_s:.0f} s{when}")
            print(f"  {'':<11} $ {' '.join(child_command(c, args, work))}")
        return 0
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print(
            f"msmoe-bench gpu-check: no CUDA device is visible (torch {torch.__version__}, "
            f"CUDA build {torch.version.cuda}); nothing checked",
            file=sys.stderr,
        )
        return 2
    from msmoe_dist.bench.common import machine_info, now_iso

    gpus = torch.cuda.device_count() if args.device == "cuda" else 0
    report: dict[str, Any] = {
        "benchmark": "gpu_check",
        "date": now_iso(),
        "device": args.device,
        "gpus": gpus,
        "machine": machine_info(args.device),
        "budget_s": args.budget_s,
        "checks": {},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    for c in checks:
        left = args.budget_s - (time.perf_counter() - start)
        if c.ranks > 1 and args.device == "cuda" and gpus < c.ranks:
            res: dict = {"status": "skipped", "reason": f"needs {c.ranks} GPUs, {gpus} visible"}
        elif left < 10 and c.ranks == 1:  # the multi-GPU check is not in the one-GPU budget
            res = {"status": "skipped", "reason": f"time budget of {args.budget_s:.0f} s spent"}
        else:
            res = run_one(c, args, work, c.timeout_s if c.ranks > 1 else min(c.timeout_s, left))
        report["checks"][c.name] = res
        report["elapsed_s"] = round(time.perf_counter() - start, 1)
        write_json(out, report)
        print(f"[{c.name}] {res['status']} ({res.get('seconds', '-')} s)", flush=True)
    failed = [n for n, r in report["checks"].items() if r["status"] not in OK]
    report["passed"] = not failed
    write_json(out, report)
    print_table(report)
    print(f"{'all checks passed' if not failed else 'FAILED: ' + ', '.join(failed)}; results in {out}")
    return 0 if not failed else 1


def _child_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m msmoe_dist.bench.gpu_check")
    p.add_argument("--child", required=True, choices=list(BY_NAME))
    p.add_argument("--work", required=True)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--small", action="store_true")
    p.add_argument("--peak-tflops", type=float, default=None)
    a = p.parse_args(argv)
    res = run_child(a.child, Path(a.work), a.device, a.small, a.peak_tflops)
    if _is_main():
        print(RESULT_MARK + json.dumps(res, default=str), flush=True)
    return 1 if res.get("status") == "error" else 0


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
