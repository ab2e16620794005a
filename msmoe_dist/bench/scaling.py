"""msmoe-bench build-memory and msmoe-bench recompute: memory that scales with EP and with recomputation.

build-memory  Peak resident memory of ONE rank's model build at EP 1, 2, 4, ... (rank 0 of each layout),
              two ways in the same run: `local` (build_model(..., local_experts): only this rank's experts
              are ever allocated) and `whole` (today's former path: build every expert, then keep the
              slice, as apply_expert_parallel does for a model built whole). No process group is needed:
              the layout is handed to the builder, which is all a rank's build depends on.
recompute     One training step of a WikiText-103 config (default: the medium MomentumSMoE one, chunked
              output layer, batch 8 x 512, the real 267,735-word vocabulary) with
              train.activation_checkpointing none, block and selective: the step's peak memory and time.

Every measurement runs in a fresh child process (no inherited allocator caches or high-water mark),
with glibc told to serve every allocation above 64 KiB by mmap (MALLOC_MMAP_THRESHOLD_), so freed
tensors leave the resident set at once. A child resets the kernel's high-water mark
(/proc/self/clear_refs) just before what it measures and reads VmHWM after it: the peak, with nothing
missed between polls. Figures are GiB (2^30 bytes).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time

GIB = 2**30
MEDIUM = "configs/wikitext103/momentum_smoe_medium.yaml"
WIKITEXT103_VOCAB = 267_735


def add_build_memory_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--experts", type=int, default=64, help="experts per MoE layer (default 64)")
    p.add_argument("--d-model", type=int, default=1024)
    p.add_argument("--ffn", type=int, default=4096, help="expert FFN dim (default 4096)")
    p.add_argument(
        "--moe-layers",
        type=int,
        default=2,
        help="MoE layers (default 2: the issue's 8 hold 16 GiB of experts at EP 1; the expert share is linear in it)",
    )
    p.add_argument("--ep", default="1,2,4", help="comma-separated EP degrees (default 1,2,4)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def add_recompute_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=MEDIUM, help=f"the run's config (default {MEDIUM})")
    p.add_argument("--vocab", type=int, default=WIKITEXT103_VOCAB, help="vocabulary (default: WikiText-103's)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--modes", default="none,block,selective")
    p.add_argument(
        "--warmup-steps",
        type=int,
        default=1,
        help="untimed steps before the measured one (default 1: the measured step then starts with the "
        "optimiser's state allocated); 0 measures the first step",
    )
    p.add_argument(
        "--sgd",
        action="store_true",
        help="plain SGD (no optimiser state) instead of the config's optimiser: the same for every mode, cheaper",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


# ---- measuring, in the child


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS (Linux >= 4.0)


def _rss() -> float:
    return _status_kib("VmRSS") * 1024 / GIB


def _hwm() -> float:
    return _status_kib("VmHWM") * 1024 / GIB


def measure_build(spec: dict) -> dict:
    """Rank 0's build of an EP-`ep` layout, `local` or `whole` + slice (in this fresh process)."""
    import torch

    from msmoe_dist.config.loader import load_config
    from msmoe_dist.models.build import build_model
    from msmoe_dist.moe import is_expert_param

    E, ep = spec["experts"], spec["ep"]
    cfg = load_config(
        None,
        [
            f"model.num_layers={spec['moe_layers']}",
            f"model.d_model={spec['d_model']}",
            "model.num_heads=8",
            "model.max_seq_len=64",
            "data.seq_len=64",
            f"moe.num_experts={E}",
            f"moe.expert_ffn_dim={spec['ffn']}",
        ],
    )
    local = range(0, E // ep)  # rank 0 of the layout
    gc.collect()
    _reset_peak()
    before = _rss()
    t0 = time.perf_counter()
    torch.manual_seed(0)
    if spec["how"] == "local":
        model = build_model(cfg.model, cfg.moe, cfg.momentum, cfg.vision, 1000, local if ep > 1 else None)
    else:
        model = build_model(cfg.model, cfg.moe, cfg.momentum, cfg.vision, 1000)
        if ep > 1:
            for layer in model.moe_layers():
                layer.experts.keep_experts(local)  # what shard_experts does to a layer built whole
    gc.collect()
    seconds = time.perf_counter() - t0
    params = {id(p): p for p in model.parameters()}.values()
    expert = sum(p.numel() * p.element_size() for p in params if is_expert_param(p)) / GIB
    dense = sum(p.numel() * p.element_size() for p in params if not is_expert_param(p)) / GIB
    return {
        "peak_gib": _hwm() - before,
        "after_gib": _rss() - before,
        "expert_param_gib": expert,
        "dense_param_gib": dense,
        "seconds": seconds,
    }


def measure_recompute(spec: dict) -> dict:
    """Training steps (forward, backward, optimiser) with one activation-checkpointing mode: `warmup_steps`
    untimed ones (they allocate the optimiser's state), then one measured: its peak over the resident
    state it starts from, the process's peak during it, and its time."""
    import torch

    from msmoe_dist.config.loader import load_config
    from msmoe_dist.models.build import build_model
    from msmoe_dist.train.optim import build_optimizer, param_groups

    overrides = [
        f"data.batch_size={spec['batch_size']}",
        f"data.seq_len={spec['seq_len']}",
        f"train.activation_checkpointing={spec['mode']}",
    ]
    if spec.get("sgd"):
        overrides += ["optim.name=sgd", "optim.beta1=0.0"]
    cfg = load_config(spec["config"], overrides)
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.moe, cfg.momentum, cfg.vision, spec["vocab"])
    model.set_activation_checkpointing(cfg.train.activation_checkpointing)
    model.train()
    opt = build_optimizer(param_groups(model, cfg.optim.weight_decay), cfg.optim)
    B, S = cfg.data.batch_size, cfg.data.seq_len
    idx = torch.randint(0, spec["vocab"], (B, S + 1), generator=torch.Generator().manual_seed(1))
    x, y = idx[:, :-1], idx[:, 1:]

    def step() -> float:
        t0 = time.perf_counter()
        out = model(x, y)
        (out.loss + out.aux_loss).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    first = [step() for _ in range(spec.get("warmup_steps", 1))]
    gc.collect()
    _reset_peak()
    before = _rss()
    seconds = step()
    return {
        "step_peak_gib": _hwm() - before,
        "peak_rss_gib": _hwm(),
        "resident_before_gib": before,
        "step_s": seconds,
        "warmup_step_s": first,
    }


# ---- running the children


def _child(kind: str, spec: dict) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    code = (
        f"import json, sys; from msmoe_dist.bench.scaling import {kind}; "
        f"print(json.dumps({kind}(json.loads(sys.argv[1]))))"
    )
    r = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"{kind} {spec}: child failed: {r.stderr.strip().splitlines()[-1:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def run_build_memory(args) -> dict:
    from msmoe_dist.bench.common import header, machine_info

    eps = [int(e) for e in args.ep.split(",")]
    shapes = {"experts": args.experts, "d_model": args.d_model, "ffn": args.ffn, "moe_layers": args.moe_layers}
    result = header("build-memory", shapes, machine_info("cpu"))
    rows = {}
    for ep in eps:
        for how in ("local", "whole"):
            spec = {**shapes, "ep": ep, "how": how}
            rows[f"ep{ep}_{how}"] = _child("measure_build", spec)
    result["rows"] = rows
    base = rows[f"ep{eps[0]}_local"]
    dense = base["dense_param_gib"]
    # The expert share of a rank's build: its peak minus what the EP-independent dense part costs (the
    # dense parameters and whatever the build touches besides the experts, measured as the EP-1 peak
    # minus the EP-1 expert parameters).
    overhead = base["peak_gib"] - base["expert_param_gib"]
    for row in rows.values():
        row["expert_share_gib"] = row["peak_gib"] - overhead
        row["expert_share_vs_ep1_local"] = row["expert_share_gib"] / base["expert_share_gib"]
    result["dense_param_gib"] = dense
    return result


def run_recompute(args) -> dict:
    from msmoe_dist.bench.common import header, machine_info

    shapes = {
        "config": args.config,
        "vocab": args.vocab,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "warmup_steps": args.warmup_steps,
        "sgd": args.sgd,
    }
    result = header("recompute", shapes, machine_info("cpu"))
    rows = {m: _child("measure_recompute", {**shapes, "mode": m}) for m in args.modes.split(",")}
    base = rows.get("none")
    if base is not None:
        for row in rows.values():
            row["peak_vs_none"] = row["peak_rss_gib"] / base["peak_rss_gib"]
            row["step_peak_vs_none"] = row["step_peak_gib"] / base["step_peak_gib"]
            row["time_vs_none"] = row["step_s"] / base["step_s"]
    result["rows"] = rows
    return result


def print_table(result: dict) -> None:
    print(f"{result['benchmark']} benchmark, {result['date']}, {result['machine'].get('cpu')}")
    print(f"shapes: {result['shapes']}")
    for key, row in result["rows"].items():
        print(
            f"  {key:>12}: " + ", ".join(f"{k} {v}" if isinstance(v, list) else f"{k} {v:.3f}" for k, v in row.items())
        )
