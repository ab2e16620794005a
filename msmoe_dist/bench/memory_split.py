"""msmoe-bench memory --ep-size N: where one rank's memory goes, for a config at an expert-parallel degree.

    msmoe-bench memory --ep-size 2 --config configs/wikitext103/momentum_smoe_medium.yaml data.batch_size=4

N ranks run as gloo processes on this machine (``parallel.ep_size`` = N, world size N; N = 1 runs one
process without torch.distributed). Each rank builds the model exactly as a run does
(`models.build.build_model`, then `parallel.apply_expert_parallel`), builds the optimiser of
``optim`` (train/optim.py: param groups as in training), and takes one training step on random data
of the config's shape (LM: ``data.batch_size`` x ``data.seq_len`` token ids; ViT: ``data.batch_size``
images): forward, backward of loss + aux loss, optimiser step. The first step, so the optimiser's state
is allocated inside it, as in the first step of a real run (an untimed forward + backward before it
loads torch's lazily initialised kernels; its gradients are dropped). No DeepSpeed engine: its ZeRO/bf16 buffers
are not counted (the step is the native engine's, on the EP-sharded model).

Peaks are measured as in `bench/memory.py`: on CPU the resident set (VmHWM after resetting it with
``/proc/self/clear_refs``), on CUDA ``torch.cuda.max_memory_allocated`` after resetting it. Byte counts
are exact sums of tensor sizes. A step's growth is measured above the resident set
(CUDA: allocated bytes) just before it, which holds the parameters and, on CPU, torch's own libraries
and caches (loaded by the warm-up, not this model's cost); the parameters are added back. The JSON keys
(one rank; the top level repeats rank 0's, ``ranks`` has every rank's), all in bytes:

  baseline_bytes       resident set before the build (Python, torch, the data); CUDA: allocated, ~0
  before_step_bytes    resident set (CUDA: allocated) just before the measured step
  build_peak_bytes     peak during the model build and expert sharding, above the baseline
  param_bytes          this rank's parameters (unique tensors), = dense_param_bytes + expert_param_bytes
  dense_param_bytes    parameters every rank holds in full (embeddings, attention, routers, norms, ...)
  expert_param_bytes   this rank's expert parameters (1/ep_size of all experts)
  grad_bytes           the gradients the backward allocated (``p.grad`` of every parameter)
  optim_bytes          the optimiser's state after the step (every tensor in ``optimizer.state``)
  fwd_bwd_peak_bytes   param_bytes + the peak growth during forward + backward
  step_peak_bytes      param_bytes + the peak growth during the whole step (forward, backward, optimiser step)
  activation_bytes     fwd_bwd_peak_bytes - param_bytes - grad_bytes: what forward and backward hold
                       beyond the weights and their gradients (saved activations, the all-to-all buffers,
                       workspace); 0 if negative (allocator reuse)

On CPU the peaks include what the allocator keeps (glibc's free lists; freed pages not returned) and
the build also counts the module objects; the exact byte counts do not. A planner's prediction
compares with param/grad/optim exactly and with the peaks approximately.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from typing import Any

MIB = 2**20
KEYS = (
    "baseline_bytes",
    "before_step_bytes",
    "build_peak_bytes",
    "param_bytes",
    "dense_param_bytes",
    "expert_param_bytes",
    "grad_bytes",
    "optim_bytes",
    "fwd_bwd_peak_bytes",
    "step_peak_bytes",
    "activation_bytes",
)
RANK_TIMEOUT_S = 1800  # one build and one step; a hung rank must not hold the machine forever


def _nbytes(t) -> int:
    return t.numel() * t.element_size()


def tensor_bytes(model, opt) -> dict[str, int]:
    """Exact bytes of the parameters (dense/expert), their gradients and the optimiser's state."""
    import torch

    from msmoe_dist.moe import is_expert_param

    params = list({id(p): p for p in model.parameters()}.values())
    expert = sum(_nbytes(p) for p in params if is_expert_param(p))
    dense = sum(_nbytes(p) for p in params if not is_expert_param(p))
    grads = sum(_nbytes(p.grad) for p in params if p.grad is not None)
    optim = sum(_nbytes(v) for state in opt.state.values() for v in state.values() if isinstance(v, torch.Tensor))
    return {
        "param_bytes": dense + expert,
        "dense_param_bytes": dense,
        "expert_param_bytes": expert,
        "grad_bytes": grads,
        "optim_bytes": optim,
    }


class _Meter:
    """Peak memory since the last `reset`, on the host (RSS) or a CUDA device (allocated bytes)."""

    def __init__(self, device) -> None:
        from msmoe_dist.bench.memory import _reset_peak_rss

        self.device = device
        self.exact_reset = device.type == "cuda" or _reset_peak_rss()

    def now(self) -> int:
        import torch

        from msmoe_dist.bench.memory import _proc_status_kib

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.memory_allocated(self.device)
        return _proc_status_kib("VmRSS")["VmRSS"] * 1024

    def reset(self) -> None:
        import torch

        from msmoe_dist.bench.memory import _reset_peak_rss

        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.exact_reset = _reset_peak_rss() and self.exact_reset

    def trim(self) -> None:
        """Returns freed memory to the OS (glibc's malloc_trim; CUDA: the caching allocator's free blocks)."""
        import torch

        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            return
        try:
            import ctypes

            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass

    def peak(self) -> int:
        from msmoe_dist.bench.memory import _peak

        return _peak(self.device)

    @property
    def method(self) -> str:
        if self.device.type == "cuda":
            return "torch.cuda.max_memory_allocated after reset_peak_memory_stats, minus memory_allocated before"
        if self.exact_reset:
            return "VmHWM after resetting it (clear_refs 5) before each phase, minus VmRSS before the phase"
        return "VmHWM minus VmRSS before the phase (clear_refs not writable: each peak is the process's so far)"


def _batch(cfg, vocab: int, device):
    """Random inputs and targets of the config's shape (fixed seed)."""
    import torch

    g = torch.Generator().manual_seed(1)
    B = cfg.data.batch_size
    if cfg.model.kind == "vit":
        v = cfg.vision
        x = torch.randn(B, 3, v.image_size, v.image_size, generator=g)
        y = torch.randint(0, v.num_classes, (B,), generator=g)
    else:
        from msmoe_dist.bench.memory import zipf_ids

        ids = zipf_ids(vocab, B * (cfg.data.seq_len + 1)).view(B, cfg.data.seq_len + 1)
        x, y = ids[:, :-1], ids[:, 1:]
    return x.to(device), y.to(device)


def measure_rank(spec: dict) -> dict:
    """In this process (one rank): build, shard, one step; the keys of the module docstring."""
    import torch

    from msmoe_dist.config.loader import load_config
    from msmoe_dist.models.build import build_model
    from msmoe_dist.train.optim import build_optimizer, param_groups

    cfg = load_config(spec["config"], spec["overrides"])
    ep = cfg.parallel.ep_size
    pg = None
    if ep > 1:
        from msmoe_dist.bench.common import stdout_to_stderr
        from msmoe_dist.parallel import ParallelLayout, build_process_groups
        from msmoe_dist.parallel.runtime import Runtime

        runtime = Runtime.from_env(spec["device"])
        with stdout_to_stderr():
            runtime.start_distributed(cfg.parallel)
        pg = build_process_groups(ParallelLayout(ep, ep), runtime.rank, cfg.parallel.timeout_s)
        device = runtime.device
    else:
        device = torch.device(spec["device"])
    vocab = spec["vocab"]
    x, y = _batch(cfg, vocab, device)
    meter = _Meter(device)
    meter.reset()
    baseline = meter.now()
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, cfg.moe, cfg.momentum, cfg.vision, vocab).to(device)
    if pg is not None:
        from msmoe_dist.parallel.expert_parallel import apply_expert_parallel

        apply_expert_parallel(model, pg)
    model.train()
    build_peak = meter.peak() - baseline
    opt = build_optimizer(param_groups(model, cfg.optim.weight_decay), cfg.optim)
    # An untimed forward + backward first: torch loads kernels, thread pools and autograd machinery on first
    # use (about 0.15 GiB of resident set on CPU), which would otherwise count as this model's activations.
    # Its gradients are dropped and the freed memory handed back to the OS before the measured step.
    warm = model(x, y)
    (warm.loss + warm.aux_loss).backward()
    del warm
    opt.zero_grad(set_to_none=True)
    meter.trim()
    meter.reset()
    before_step = meter.now()
    out = model(x, y)
    (out.loss + out.aux_loss).backward()
    fwd_bwd_growth = meter.peak() - before_step
    opt.step()
    step_growth = max(meter.peak() - before_step, fwd_bwd_growth)
    counts = tensor_bytes(model, opt)
    fwd_bwd_peak = counts["param_bytes"] + fwd_bwd_growth
    step_peak = counts["param_bytes"] + step_growth
    result: dict[str, Any] = {
        "rank": pg.rank if pg is not None else 0,
        "baseline_bytes": baseline,
        "before_step_bytes": before_step,
        "build_peak_bytes": build_peak,
        **counts,
        "fwd_bwd_peak_bytes": fwd_bwd_peak,
        "step_peak_bytes": step_peak,
        "activation_bytes": max(0, fwd_bwd_peak - counts["param_bytes"] - counts["grad_bytes"]),
        "loss": float(out.loss.detach()),
        "method": meter.method,
    }
    if pg is not None:
        import torch.distributed as dist

        dist.destroy_process_group()
    return result


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_split(args) -> dict:
    """Starts the ranks (child processes), collects their figures; rank 0's are also the top-level keys."""
    from msmoe_dist.bench.common import machine_info, now_iso
    from msmoe_dist.config.errors import ConfigError
    from msmoe_dist.config.loader import load_config

    ep = args.ep_size
    if ep < 1:
        raise ConfigError(f"--ep-size: expected an integer >= 1, got {ep}", ["parallel.ep_size"])
    overrides = [*args.overrides, f"parallel.ep_size={ep}"]
    cfg = load_config(args.config, overrides)  # a bad config fails here, before any process starts
    if cfg.model.kind == "vit":
        vocab = cfg.vision.num_classes
    else:
        vocab = cfg.model.vocab_size or args.vocab  # --vocab defaults to WikiText-103's
    spec = {"config": args.config, "overrides": overrides, "device": args.device, "vocab": vocab}
    port = str(_free_port())
    procs = []
    for rank in range(ep):
        env = dict(os.environ)
        env.update(
            {
                "RANK": str(rank),
                "WORLD_SIZE": str(ep),
                "LOCAL_RANK": str(rank),
                "LOCAL_WORLD_SIZE": str(ep),
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": port,
                "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // ep)),
            }
        )
        cmd = [sys.executable, "-m", "msmoe_dist.bench.memory_split", json.dumps(spec)]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    ranks, failures = [], []
    for rank, proc in enumerate(procs):
        try:
            out, err = proc.communicate(timeout=RANK_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise RuntimeError(f"msmoe-bench memory: rank {rank} did not finish in {RANK_TIMEOUT_S} s") from None
        if proc.returncode != 0:
            failures.append(f"rank {rank} exit {proc.returncode}: {(err.strip().splitlines() or [''])[-1][-300:]}")
            continue
        ranks.append(json.loads(out.strip().splitlines()[-1]))
    if failures:
        raise RuntimeError("msmoe-bench memory: " + "; ".join(failures))
    first = ranks[0]
    return {
        "benchmark": "memory_split",
        "date": now_iso(),
        "machine": machine_info(args.device),
        "device": args.device,
        "config": args.config,
        "overrides": list(args.overrides),
        "ep_size": ep,
        "model_kind": cfg.model.kind,
        "num_outputs": vocab,
        "batch_size": cfg.data.batch_size,
        "seq_len": cfg.data.seq_len,
        "optimizer": cfg.optim.name,
        **{k: first[k] for k in KEYS},
        "method": first["method"],
        "ranks": ranks,
    }


def print_split_table(result: dict) -> None:
    print(f"memory split, {result['date']}, {result['machine']}, device {result['device']}")
    over = " ".join(result["overrides"])
    print(f"{result['config']} {over}: ep_size {result['ep_size']}, optimizer {result['optimizer']}")
    cols = [k for k in KEYS if k not in ("baseline_bytes", "before_step_bytes")]
    print(f"{'rank':>4}  " + "  ".join(f"{k.removesuffix('_bytes'):>12}" for k in cols) + "   (MiB)")
    for r in result["ranks"]:
        print(f"{r['rank']:>4}  " + "  ".join(f"{r[k] / MIB:>12.2f}" for k in cols))
    print(f"method: {result['method']}")


if __name__ == "__main__":  # one rank, started by run_split
    if len(sys.argv) != 2:
        raise SystemExit("usage: msmoe-bench memory --ep-size N [...] (this module runs itself as each rank)")
    print(json.dumps(measure_rank(json.loads(sys.argv[1]))))
