"""msmoe-bench plan-check: msmoe-plan's predicted step time and memory beside a real msmoe-train run, at 1, 2, 4 ranks.

For each rank count R (expert parallel, ep_size = R):
1. calibrate: ``msmoe-bench calibrate --ranks R --threads T`` writes ``OUT/cpu-local-R.yaml`` (the rates one of
   R ranks gets on this machine);
2. measure: ``torchrun --nproc_per_node R -m msmoe_dist.cli train`` on the config with ``parallel.ep_size=R``,
   the data replaced by the project's synthetic corpus (``data.kind=synthetic``, vocabulary ``--vocab`` via
   ``model.vocab_size``; a V-MoE config, ``model.kind=vit``: its synthetic images, ``data.kind=synthetic_images``,
   decoded by the config's ``vision.num_workers`` loader workers, which share the machine's cores with the ranks
   and are not in the plan), no evaluation, checkpoint or per-expert statistics
   during the steps; the measured step is msmoe-train's own throughput (``tokens_per_s`` or ``images_per_s`` of
   metrics.jsonl: global tokens or images per step / rate), the median of the logged windows after the first
   (which holds start-up and warm-up);
3. predict: ``msmoe-plan --gpus R --ep-size R --micro-batch data.batch_size`` with the engine, ZeRO stage and
   checkpointing the run used, on that cluster file, and compare its no-overlap step time (msmoe_dist runs its
   all-to-all blocking unless moe.overlap_chunks > 1).
Prints one row per R (predicted, measured, error, the predicted parts) with the machine and date; --json for a
JSON object. Run it on an idle machine: every figure is wall-clock time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from msmoe_dist.errors import UserError


class PlanCheckError(UserError):
    """A bad command line, or a run or plan that failed (one line, exit 2)."""


def add_plan_check_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="training config YAML (a language model or a V-MoE)")
    p.add_argument("overrides", nargs="*", help="config overrides section.key=value for the run and the plan")
    p.add_argument("--ranks", default="1,2,4", help="comma-separated rank counts (default 1,2,4)")
    p.add_argument("--vocab", type=int, default=2000, help="vocabulary of a language model (default 2000)")
    p.add_argument("--steps", type=int, default=40, help="training steps per run (default 40)")
    p.add_argument("--log-every", type=int, default=5, help="steps per measured window (default 5)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank (default 1)")
    p.add_argument("--out", default=None, help="keep the cluster files and runs here (default: a temporary dir)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds each run may take (default 900)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _calibrate(out: Path, ranks: int, threads: int) -> Path:
    from msmoe_dist.bench.calibrate import run_calibrate

    path = out / f"cpu-local-{ranks}.yaml"
    ns = argparse.Namespace(output=str(path), ranks=ranks, repeats=5, cpu_time=False, threads=threads, memory_gib=None)
    run_calibrate(ns)
    return path


def _measure(args: argparse.Namespace, out: Path, ranks: int) -> dict:
    run_dir = out / f"run-{ranks}"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks),
        "-m", "msmoe_dist.cli", "train", "--config", args.config, *args.overrides,
        *_data_overrides(args, out),
        f"parallel.ep_size={ranks}", f"train.run_dir={run_dir}", "train.overwrite=true",
        f"train.max_steps={args.steps}", "train.eval_every=0", "checkpoint.every_steps=0",
        f"logging.log_every={args.log_every}", "logging.moe_stats=false", "logging.tensorboard=false",
        "train.progress=false",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    if proc.returncode:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise PlanCheckError(f"the {ranks}-rank run failed: {' | '.join(tail)}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    cfg = _load(args, ranks)
    key = "images_per_s" if cfg["vit"] else "tokens_per_s"
    rates = [r[key] for r in rows if key in r][1:]
    units = ranks * cfg["batch_size"] * (1 if cfg["vit"] else cfg["seq_len"]) * cfg["grad_accum"]
    return {"step_s": units / statistics.median(rates), "windows": len(rates), "run_dir": str(run_dir)}


def _is_vit(args: argparse.Namespace) -> bool:
    from msmoe_dist.config.loader import load_config

    return load_config(args.config, args.overrides).model.kind == "vit"


def _data_overrides(args: argparse.Namespace, out: Path) -> list[str]:
    """The run's data (and the plan's vocabulary): generated here, never downloaded."""
    if _is_vit(args):
        return ["data.kind=synthetic_images", f"data.path={out / 'synthetic_images'}"]
    return ["data.kind=synthetic", f"data.path={out / 'synthetic'}", f"model.vocab_size={args.vocab}"]


def _vocab_overrides(args: argparse.Namespace) -> list[str]:
    return [] if _is_vit(args) else [f"model.vocab_size={args.vocab}"]


def _load(args: argparse.Namespace, ranks: int) -> dict:
    from msmoe_dist.config.loader import load_config

    cfg = load_config(args.config, [*args.overrides, f"parallel.ep_size={ranks}", *_vocab_overrides(args)])
    return {
        "vit": cfg.model.kind == "vit",
        "batch_size": cfg.data.batch_size,
        "seq_len": cfg.data.seq_len,
        "grad_accum": cfg.train.grad_accum_steps,
        "zero_stage": cfg.parallel.zero_stage,
        "checkpointing": cfg.train.activation_checkpointing,
    }


def _predict(args: argparse.Namespace, cluster: Path, ranks: int) -> dict:
    cfg = _load(args, ranks)
    cmd = [
        sys.executable, "-m", "msmoe_dist.plan.cli", "--config", args.config, *args.overrides,
        *_vocab_overrides(args), "--gpus", str(ranks), "--ep-size", str(ranks), "--cluster", str(cluster),
        "--micro-batch", str(cfg["batch_size"]), "--checkpointing", cfg["checkpointing"], "--json",
    ]  # fmt: skip
    if ranks > 1:
        cmd += ["--zero-stage", str(cfg["zero_stage"])]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    if proc.returncode:
        raise PlanCheckError(f"msmoe-plan failed: {proc.stderr.strip()}")
    return json.loads(proc.stdout)["best"]["step_s"]


def run_plan_check(args: argparse.Namespace) -> dict:
    from msmoe_dist.bench.common import machine_info, now_iso

    try:
        ranks = [int(r) for r in args.ranks.split(",")]
        if min(ranks) < 1 or args.steps <= 2 * args.log_every:
            raise ValueError
    except ValueError:
        raise PlanCheckError(
            f"--ranks must be comma-separated integers >= 1 (got {args.ranks!r}) and --steps more than twice "
            f"--log-every (got {args.steps}, {args.log_every}): the first logged window is not measured"
        ) from None
    if not Path(args.config).is_file():
        raise PlanCheckError(f"--config {args.config}: no such file")
    _load(args, 1)  # a bad override fails here, before anything runs
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp)
        out.mkdir(parents=True, exist_ok=True)
        rows = []
        for r in ranks:
            cluster = _calibrate(out, r, args.threads)
            measured = _measure(args, out, r)
            predicted = _predict(args, cluster, r)
            err = (predicted["serial"] - measured["step_s"]) / measured["step_s"]
            rows.append({"ranks": r, "predicted": predicted, "measured_s": measured["step_s"], "error": err})
    return {"config": args.config, "overrides": args.overrides, "date": now_iso(), "machine": machine_info("cpu"),
            "rows": rows}  # fmt: skip


def print_plan_check(result: dict) -> None:
    print(f"plan-check {result['config']} {' '.join(result['overrides'])}  ({result['date']})")
    print(f"machine: {result['machine']}")
    print("ranks  predicted ms  measured ms   error   predicted parts (ms)")
    for r in result["rows"]:
        p = r["predicted"]
        parts = " ".join(
            f"{k}={1e3 * p[k]:.1f}" for k in ("compute", "memory_ops", "all_to_all", "grad_reduce", "optimizer")
        )
        pred, meas = 1e3 * p["serial"], 1e3 * r["measured_s"]
        print(f"{r['ranks']:5d}  {pred:12.1f}  {meas:11.1f}  {100 * r['error']:+6.1f}%   {parts}")
