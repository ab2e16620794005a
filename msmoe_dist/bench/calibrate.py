"""msmoe-bench calibrate: a cpu-local cluster file for msmoe-plan from this machine's measured rates.

Measured here, each the median of --repeats runs:
- GEMM rate: fp32 matmuls of the shapes a small MoE step runs ([4096, 512] x [512, 512] and
  [4096, 512] x [512, 2048]), with the threads one of --ranks ranks gets (cores // ranks); when more
  ranks than cores share the machine, the rate is divided by ranks / cores (they take turns);
- operator overhead: the time of one eager call on a 64-element tensor (torch.add, 2,000 calls), the cost
  that every operator pays whatever its size;
- memory bandwidth: a copy of a 256 MiB tensor (bytes read + written per second);
- all-to-all: gloo all_to_all_single between 2 spawned processes on this machine (through
  msmoe_dist.parallel.comm), 4 MiB sent per rank; the same figure stands for "NVLink" and "network"
  (one node), and all-reduce is taken as the same bandwidth.
The machine's cores are shared with whatever else runs: run it under `nice` on an idle machine, and
repeat; the file records the date and the load average.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path


def add_calibrate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", default="cpu-local.yaml", help="cluster YAML to write (default cpu-local.yaml)")
    p.add_argument("--ranks", type=int, default=1, help="ranks that will share this machine (default 1)")
    p.add_argument("--repeats", type=int, default=5, help="runs per figure; the median is kept (default 5)")
    p.add_argument(
        "--cpu-time",
        action="store_true",
        help="time GEMMs, copies and operator calls in process CPU seconds (a shared, loaded machine)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads per rank (default cores // ranks)")
    p.add_argument("--memory-gib", type=float, default=None, help="memory per rank (default: total / ranks)")


def _median_seconds(fn, repeats: int, clock=time.perf_counter) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = clock()
        fn()
        times.append(clock() - t0)
    return statistics.median(times)


def _clock(threads: int):
    """With --cpu-time, the process's CPU seconds (per thread): what the work costs, not how long other
    processes on a shared machine kept it waiting. Else wall-clock seconds."""
    if not CPU_TIME[0]:
        return time.perf_counter
    return lambda: time.process_time() / threads


CPU_TIME = [False]


def gemm_tflops(threads: int, repeats: int) -> float:
    import torch

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    shapes = [(4096, 512, 512), (4096, 512, 2048), (4096, 2048, 512)]
    mats = [(torch.randn(m, k, generator=g), torch.randn(k, n, generator=g)) for m, k, n in shapes]
    flops = sum(2 * m * k * n for m, k, n in shapes)
    return flops / _median_seconds(lambda: [a @ b for a, b in mats], repeats, _clock(threads)) / 1e12


def op_overhead_us(repeats: int, calls: int = 2000) -> float:
    import torch

    a, b = torch.ones(64), torch.ones(64)

    def loop():
        for _ in range(calls):
            torch.add(a, b)

    return _median_seconds(loop, repeats, _clock(1)) / calls * 1e6


def copy_gbps(repeats: int) -> float:
    import torch

    src = torch.ones(64 * 2**20)  # 256 MiB
    dst = torch.empty_like(src)
    return 2 * src.nbytes / _median_seconds(lambda: dst.copy_(src), repeats, _clock(1)) / 1e9


def _a2a_worker(rank: int, init_file: str, nbytes: int, repeats: int, out) -> None:
    import torch
    import torch.distributed as dist

    from msmoe_dist.parallel import comm

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    x = torch.ones(nbytes // 4)
    splits = [x.numel() // 2] * 2

    def once():
        comm.all_to_all_single(x, splits, splits, name="calibrate all_to_all")

    secs = _median_seconds(once, repeats)
    if rank == 0:
        out.put(nbytes / secs / 1e9)
    comm.barrier(name="calibrate done")
    dist.destroy_process_group()


def gloo_a2a_gbps(repeats: int, nbytes: int = 4 * 2**20, timeout_s: float = 120.0) -> float:
    import multiprocessing as mp
    import tempfile

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init = os.path.join(tmp, "store")
        procs = [ctx.Process(target=_a2a_worker, args=(r, init, nbytes, repeats, q)) for r in range(2)]
        for p in procs:
            p.start()
        try:
            return float(q.get(timeout=timeout_s))
        finally:
            for p in procs:
                p.join(timeout=10)
                if p.is_alive():
                    p.kill()


def run_calibrate(args: argparse.Namespace) -> dict:
    from msmoe_dist.bench.common import machine_info, now_iso
    from msmoe_dist.plan.cluster import Cluster, cluster_to_yaml

    if args.ranks < 1 or args.repeats < 1:
        raise SystemExit("msmoe-bench calibrate: --ranks and --repeats must be >= 1")
    cores = os.cpu_count() or 1
    threads = args.threads or max(1, cores // args.ranks)
    CPU_TIME[0] = args.cpu_time
    tflops = gemm_tflops(threads, args.repeats)
    if not args.cpu_time:
        tflops /= max(1.0, args.ranks * threads / cores)  # ranks beyond the cores take turns
    mem = copy_gbps(args.repeats)
    overhead = op_overhead_us(args.repeats)
    a2a = gloo_a2a_gbps(args.repeats)
    with open("/proc/meminfo") as f:
        total_gib = int(f.readline().split()[1]) / 2**20
    load = os.getloadavg()[0]
    cluster = Cluster(
        name="cpu-local",
        device="cpu",
        gpu_memory_gib=args.memory_gib or total_gib / args.ranks,
        usable_memory_fraction=1.0,
        peak_tflops=tflops,
        sustained_tflops=tflops,
        mem_gbps=mem,
        gpus_per_node=max(args.ranks, 1),
        nvlink_a2a_gbps=a2a,
        net_a2a_gbps=a2a,
        nvlink_allreduce_gbps=a2a,
        net_allreduce_gbps=a2a,
        collective_latency_us=100.0,
        op_overhead_us=overhead,
        sources=f"msmoe-bench calibrate, {now_iso()}, {machine_info('cpu')}, load average {load:.2f}",
        notes=f"fp32 GEMM with {threads} threads per rank for {args.ranks} rank(s); gloo all-to-all of 2 processes"
        + ("; GEMM, copy and operator times in CPU seconds" if args.cpu_time else ""),
    )
    Path(args.output).write_text(cluster_to_yaml(cluster))
    figures = {"gemm_tflops": tflops, "mem_gbps": mem, "a2a_gbps": a2a, "op_overhead_us": overhead}
    return {"output": args.output, **figures, "load": load}
