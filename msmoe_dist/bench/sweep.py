"""Scaling sweeps: a grid of separate torchrun launches of `msmoe-bench step`, their JSON, and PNG curves.

Each grid point (EP degree = number of ranks, experts, tokens per rank, momentum variant) is its
own launch, so a crash or hang of one point is bounded by --timeout and recorded, not fatal.
Writes <out>/sweep.jsonl (one object per point) and <out>/throughput.png, <out>/all_to_all_share.png.
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
from pathlib import Path


def _ints(text: str) -> list[int]:
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers, e.g. 1,2,4") from None
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected positive integers")
    return vals


def _kinds(text: str) -> list[str]:
    vals = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in vals if v not in ("none", "heavy_ball", "adam", "robust")]
    if bad or not vals:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a comma-separated subset of none,heavy_ball,adam,robust")
    return vals


def add_sweep_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ep", type=_ints, default=[1, 2], help="EP degrees = ranks per launch, e.g. 1,2,4")
    p.add_argument("--experts", type=_ints, default=[8], help="total experts, e.g. 8,16")
    p.add_argument("--tokens", type=_ints, default=[2048], help="tokens per rank, e.g. 1024,4096")
    p.add_argument("--momentum", type=_kinds, default=["none", "heavy_ball"], help="momentum variants")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", required=True, help="output directory (sweep.jsonl and the PNG curves)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds allowed per launch")
    p.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="passed to every `step` launch (cuda: one GPU per rank, NCCL; needs as many GPUs as the largest --ep)",
    )
    p.add_argument("--json", action="store_true", help="print the collected results as one JSON object")


def _cuda_device_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def run_sweep(args: argparse.Namespace) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, failures = [], []
    device = getattr(args, "device", "cpu")
    gpus = _cuda_device_count() if device == "cuda" else 0
    for ep, experts, tokens, kind in itertools.product(args.ep, args.experts, args.tokens, args.momentum):
        if device == "cuda" and ep > gpus:
            failures.append({"ep": ep, "experts": experts, "error": f"needs {ep} GPUs, {gpus} visible"})
            continue
        if experts % ep:
            failures.append({"ep": ep, "experts": experts, "error": "experts not divisible by ep"})
            continue
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            str(ep),
            "-m",
            "msmoe_dist.cli",
            "bench",
            "step",
            "--json",
            "--experts",
            str(experts),
            "--tokens",
            str(tokens),
            "--momentum",
            kind,
            "--seq",
            str(min(args.seq, tokens)),
            "--repeats",
            str(args.repeats),
            "--device",
            getattr(args, "device", "cpu"),
        ]
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            failures.append({"ep": ep, "experts": experts, "tokens": tokens, "momentum": kind, "error": "timeout"})
            continue
        lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
        if res.returncode != 0 or not lines:
            failures.append(
                {
                    "ep": ep,
                    "experts": experts,
                    "tokens": tokens,
                    "momentum": kind,
                    "error": (res.stderr.strip().splitlines() or ["no output"])[-1][:300],
                }
            )
            continue
        rows.append(json.loads(lines[-1]))
    (out / "sweep.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    plots = draw(rows, out) if rows else []
    return {"points": len(rows), "failures": failures, "jsonl": str(out / "sweep.jsonl"), "plots": plots}


def draw(rows: list[dict], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[tuple, list[dict]] = {}
    for r in rows:
        series.setdefault((r["experts"], r["tokens_per_rank"], r["momentum"]), []).append(r)
    paths = []
    for key, ylabel, fname in (
        ("tokens_per_s", "tokens / s (all ranks)", "throughput.png"),
        ("all_to_all_share", "all-to-all share of step time", "all_to_all_share.png"),
    ):
        fig, ax = plt.subplots(figsize=(6, 4))
        for (experts, tokens, kind), pts in sorted(series.items()):
            pts = sorted(pts, key=lambda r: r["world_size"])
            ax.plot(
                [p["world_size"] for p in pts],
                [p[key] for p in pts],
                marker="o",
                label=f"E={experts}, {tokens} tok/rank, {kind}",
            )
        ax.set_xlabel("ranks (= EP degree)")
        ax.set_ylabel(ylabel)
        ax.set_title(f"msmoe_dist scaling: {ylabel}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=110)
        plt.close(fig)
        paths.append(str(out / fname))
    return paths
