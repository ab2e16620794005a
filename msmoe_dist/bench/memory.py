"""msmoe-bench memory: peak memory of one WikiText-103 training step for each ``model.output_layer``.

The model is the one a WikiText-103 config builds (default: the medium MomentumSMoE one) with the
real vocabulary, 267,735 words; tokens are random ids drawn with Zipf(1) frequencies (see
:func:`zipf_ids`: only adaptive softmax's memory depends on them). One step = forward + backward +
optimiser step (the first one, so Adam's moment buffers are allocated inside it, as in the first
step of a real run).

Each variant runs in a fresh child process, so no variant inherits another's allocator caches
or high-water mark. What the child measures:

- CPU: the growth of its resident set during the step. Just before the step it resets the kernel's
  high-water mark (``echo 5 > /proc/self/clear_refs``), then reads VmRSS; after the step it reads
  VmHWM, the peak since the reset, kept by the kernel (no polling, nothing missed). Not
  getrusage's ru_maxrss: it cannot be reset, and Linux carries it over from the parent across
  fork and exec. Where clear_refs is not writable the figure is VmHWM minus the pre-step VmRSS,
  an upper bound that includes the model build, and the method says so.
- CUDA: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``, minus what was
  allocated before the step (the caching allocator's reserve is not counted).

With ``--ep-size N`` the command does something else: the parameter/gradient/optimiser/activation split
of one rank for any config at expert-parallel degree N (bench/memory_split.py documents it and its keys).

A variant whose logits alone would not fit (``--max-gib``, default 80% of the memory available
now) is not run; its analytic logits size is printed instead, and marked as such.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time

VARIANTS = ("full", "chunked", "adaptive")
DEFAULT_CONFIG = "configs/wikitext103/momentum_smoe_medium.yaml"
WIKITEXT103_VOCAB = 267_735
GIB = 2**30


def add_memory_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=DEFAULT_CONFIG, help=f"model/optimiser config (default {DEFAULT_CONFIG})")
    p.add_argument("--vocab", type=int, default=WIKITEXT103_VOCAB, help="vocabulary size (default: WikiText-103's)")
    p.add_argument("--batch-size", type=int, default=None, help="sequences per step (default: the config's)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: the config's)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated output layers to measure")
    p.add_argument("--chunk-tokens", type=int, default=None, help="model.output_chunk_tokens (default: config's)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument(
        "--max-gib",
        type=float,
        default=None,
        help="skip a variant whose [tokens, vocab] fp32 logits x 3 (logits, log-softmax, gradient) "
        "exceed this (default: 80%% of MemAvailable, or of the GPU's memory)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument(
        "--ep-size",
        type=int,
        default=None,
        help="the other mode (bench/memory_split.py): for --config and key=value overrides at this expert-parallel "
        "degree (that many gloo processes), rank memory of the model build and of one training step, split into "
        "parameters (dense/expert), gradients, optimiser state and activations",
    )
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (with --ep-size)")


def _overrides(spec: dict) -> list[str]:
    out = [
        f"model.vocab_size={spec['vocab']}",
        f"model.output_layer={spec['kind']}",
        f"data.batch_size={spec['batch_size']}",
        f"data.seq_len={spec['seq_len']}",
    ]
    if spec["kind"] == "adaptive":
        out.append("model.tie_embeddings=false")  # adaptive cannot tie; the WikiText-103 configs do not anyway
    if spec.get("chunk_tokens"):
        out.append(f"model.output_chunk_tokens={spec['chunk_tokens']}")
    return out


def _proc_status_kib(*keys: str) -> dict[str, int]:
    with open("/proc/self/status") as f:
        rows = dict(line.split(":", 1) for line in f if ":" in line)
    return {k: int(rows[k].split()[0]) for k in keys}


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def zipf_ids(vocab: int, n: int, seed: int = 1):
    """n token ids with Zipf(1) frequencies over frequency-ordered ids, the law msmoe-bench prepare's
    WikiText-103 stand-in uses. The full and chunked layers cost the same for any ids; adaptive softmax
    does not: a target in a tail cluster pays for that cluster's logits, so uniform ids (92% of them
    beyond the 20k-word shortlist) would overstate it."""
    import torch

    weights = 1.0 / (torch.arange(vocab, dtype=torch.float64) + 2.7)
    return torch.multinomial(weights, n, replacement=True, generator=torch.Generator().manual_seed(seed))


def _peak(device) -> int:
    """Bytes at the high-water mark since the reset (see the module docstring)."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return _proc_status_kib("VmHWM")["VmHWM"] * 1024


def measure_one_step(spec: dict) -> dict:
    """In this (fresh) process: build the model of ``spec``, take one training step, measure it."""
    import torch

    from msmoe_dist.config.loader import load_config
    from msmoe_dist.models import MoELanguageModel
    from msmoe_dist.train.optim import build_optimizer, param_groups

    cfg = load_config(spec["config"], _overrides(spec))
    device = torch.device(spec["device"])
    torch.manual_seed(0)
    model = MoELanguageModel(cfg.model, cfg.moe, cfg.momentum, spec["vocab"]).to(device)
    opt = build_optimizer(param_groups(model, cfg.optim.weight_decay), cfg.optim)
    B, S = cfg.data.batch_size, cfg.data.seq_len
    idx = zipf_ids(spec["vocab"], B * (S + 1)).view(B, S + 1).to(device)
    x, y = idx[:, :-1], idx[:, 1:]
    num_params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        method = "torch.cuda.max_memory_allocated - memory_allocated before the step"
    else:
        reset = _reset_peak_rss()
        before = _proc_status_kib("VmRSS")["VmRSS"] * 1024
        method = (
            "VmHWM after resetting it (clear_refs 5) - VmRSS before the step"
            if reset
            else "VmHWM - VmRSS before the step (clear_refs not writable: includes the model build, upper bound)"
        )
    t0 = time.perf_counter()
    out = model(x, y)
    (out.loss + out.aux_loss).backward()
    peak_fwd_bwd = _peak(device)  # where the output layer's logits live; the optimiser's state comes next
    opt.step()
    peak = _peak(device)
    cutoffs = [int(c) for c in cfg.model.adaptive_cutoffs.split(",")]
    return {
        "kind": spec["kind"],
        "status": "measured",
        "loss": float(out.loss.detach()),
        "targets_in_shortlist": float((y < cutoffs[0]).float().mean()),
        "step_s": round(time.perf_counter() - t0, 1),
        "params": num_params,
        "before_gib": before / GIB,
        "peak_gib": peak / GIB,
        "increase_gib": (peak - before) / GIB,
        "fwd_bwd_increase_gib": (peak_fwd_bwd - before) / GIB,
        "method": method,
    }


def _available_gib(device: str) -> float:
    if device == "cuda":
        import torch

        return torch.cuda.get_device_properties(0).total_memory / GIB
    with open("/proc/meminfo") as f:
        rows = dict(line.split(":", 1) for line in f)
    return int(rows["MemAvailable"].split()[0]) * 1024 / GIB


def run_memory_bench(args: argparse.Namespace) -> dict:
    if args.overrides:
        raise SystemExit("msmoe-bench memory: key=value overrides need --ep-size (the parameter/activation split)")
    from msmoe_dist.bench.common import machine_info, now_iso
    from msmoe_dist.config.loader import load_config

    base = load_config(args.config, [f"model.vocab_size={args.vocab}"])
    B = args.batch_size or base.data.batch_size
    S = args.seq_len or base.data.seq_len
    tokens = B * S
    logits_gib = tokens * args.vocab * 4 / GIB  # one fp32 [tokens, vocab] tensor
    limit = args.max_gib if args.max_gib is not None else 0.8 * _available_gib(args.device)
    rows = []
    for kind in [k.strip() for k in args.variants.split(",") if k.strip()]:
        if kind not in VARIANTS:
            raise SystemExit(f"msmoe-bench memory: unknown variant {kind!r} (expected {', '.join(VARIANTS)})")
        spec = {
            "kind": kind,
            "config": args.config,
            "vocab": args.vocab,
            "batch_size": B,
            "seq_len": S,
            "chunk_tokens": args.chunk_tokens,
            "device": args.device,
        }
        if kind == "full" and 3 * logits_gib > limit:
            rows.append(
                {
                    "kind": kind,
                    "status": "not run (analytic only)",
                    "reason": f"logits, log-softmax and gradient 3 x {logits_gib:.1f} GiB > {limit:.1f} GiB",
                }
            )
            continue
        proc = subprocess.run(
            [sys.executable, "-m", "msmoe_dist.bench.memory", "--child", json.dumps(spec)],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            tail = (proc.stderr.strip().splitlines() or [""])[-1]
            rows.append({"kind": kind, "status": f"failed (exit {proc.returncode})", "reason": tail[-300:]})
            continue
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    full = next((r for r in rows if r["kind"] == "full" and r["status"] == "measured"), None)
    for r in rows:
        if full is not None and r["status"] == "measured":
            r["ratio_vs_full"] = r["increase_gib"] / full["increase_gib"]
            r["fwd_bwd_ratio_vs_full"] = r["fwd_bwd_increase_gib"] / full["fwd_bwd_increase_gib"]
    chunk = args.chunk_tokens or base.model.output_chunk_tokens
    return {
        "benchmark": "memory",
        "date": now_iso(),
        "machine": machine_info(args.device),
        "device": args.device,
        "config": args.config,
        "vocab": args.vocab,
        "batch_size": B,
        "seq_len": S,
        "tokens": tokens,
        "chunk_tokens": chunk,
        "adaptive_cutoffs": base.model.adaptive_cutoffs,
        "analytic": {
            "full_logits_gib": logits_gib,
            "chunk_logits_gib": min(chunk, tokens) * args.vocab * 4 / GIB,
            "reference_batch_logits_gib": base.data.batch_size * base.data.seq_len * args.vocab * 4 / GIB,
        },
        "limit_gib": limit,
        "variants": rows,
    }


def print_table(result: dict) -> None:
    a = result["analytic"]
    print(f"memory benchmark, {result['date']}, {result['machine']}, device {result['device']}")
    print(
        f"{result['config']}: vocab {result['vocab']:,}, batch {result['batch_size']} x {result['seq_len']} = "
        f"{result['tokens']:,} tokens, chunk {result['chunk_tokens']} tokens, cutoffs {result['adaptive_cutoffs']}"
    )
    print(
        f"analytic fp32 logits: all tokens {a['full_logits_gib']:.2f} GiB, one chunk "
        f"{a['chunk_logits_gib']:.2f} GiB, the config's own batch {a['reference_batch_logits_gib']:.2f} GiB"
    )
    print(
        f"{'output_layer':>12}  {'step peak increase':>18}  {'ratio vs full':>13}  {'fwd+bwd only':>12}  "
        f"{'ratio':>5}  {'params':>11}  note"
    )
    for r in result["variants"]:
        if r["status"] != "measured":
            print(
                f"{r['kind']:>12}  {'-':>18}  {'-':>13}  {'-':>12}  {'-':>5}  {'-':>11}  "
                f"{r['status']}: {r.get('reason', '')}"
            )
            continue
        ratio = f"{r['ratio_vs_full']:.3f}" if "ratio_vs_full" in r else "-"
        ratio_fb = f"{r['fwd_bwd_ratio_vs_full']:.3f}" if "fwd_bwd_ratio_vs_full" in r else "-"
        print(
            f"{r['kind']:>12}  {r['increase_gib']:>14.2f} GiB  {ratio:>13}  {r['fwd_bwd_increase_gib']:>8.2f} GiB  "
            f"{ratio_fb:>5}  {r['params']:>11,}  measured, step {r['step_s']} s, loss {r['loss']:.3f}"
            + (
                f", {100 * r['targets_in_shortlist']:.0f}% of targets in the shortlist"
                if r["kind"] == "adaptive"
                else ""
            )
        )
    measured = [r for r in result["variants"] if r["status"] == "measured"]
    if measured:
        print(f"method: {measured[0]['method']}")


if __name__ == "__main__":  # the child process of run_memory_bench
    if len(sys.argv) != 3 or sys.argv[1] != "--child":
        raise SystemExit("usage: msmoe-bench memory [options] (this module runs itself as its own child)")
    print(json.dumps(measure_one_step(json.loads(sys.argv[2]))))
