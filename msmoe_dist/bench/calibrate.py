"""msmoe-bench calibrate: a cpu-local cluster file for msmoe-plan from this machine's measured rates.

Measured here, each the median of --repeats runs:
- GEMM rate: fp32 matmuls of the shapes a small MoE step runs ([4096, 512] x [512, 512] and
  [4096, 512] x [512, 2048]), with the threads one of --ranks ranks gets (default cores // ranks);
- GEMM efficiency by size class: for each smallest dimension d in 8 ... 512, matmuls of the shapes a
  transformer step runs with one small side (projections [4096, 512] x [512, d] and [4096, d] x [d, 512],
  attention [64, 256, d] x [64, d, 256] and [64, 256, 256] x [64, 256, d]); their rate over the GEMM rate;
- element-wise bandwidth: bytes read + written per second by add, mul, where, softmax, its backward and
  ReLU's backward on 1M-element fp32 tensors (the size of a small model's activations);
- random numbers: bernoulli_ (dropout's mask) on a 4M-element tensor, elements per second;
- operator overhead: an autograd step (forward + backward) of a chain of 600 multiplies and adds on
  64-element tensors, over the aten calls it makes: the cost every call pays whatever its size;
- memory bandwidth: a copy of a 256 MiB tensor (bytes read + written per second);
- collectives: among max(2, --ranks) spawned gloo processes on this machine (through msmoe_dist.parallel.comm),
  the latency of a tiny all-to-all between short bursts of matmuls (what a collective adds to a step: the call
  and the wait for the slowest peer), and the bandwidth of all_to_all_single and all_reduce of 4 MiB per rank
  (less that latency); the same figures stand for "NVLink" and "network" (one node).
With --ranks R > 1, R spawned processes measure the compute figures at the same time (each the median over
them): what one rank gets while the others compute beside it (shared caches and memory; more ranks than
cores take turns). The machine's cores are shared with whatever else runs: run it on an idle machine, and
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


GEMM_CLASSES = (8, 16, 32, 64, 128, 256, 512)


def gemm_efficiency(threads: int, repeats: int, large_tflops: float) -> dict[int, float]:
    import torch

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    out = {}
    for d in GEMM_CLASSES:
        pairs = [
            (torch.randn(4096, 512, generator=g), torch.randn(512, d, generator=g)),
            (torch.randn(4096, d, generator=g), torch.randn(d, 512, generator=g)),
            (torch.randn(64, 256, d, generator=g), torch.randn(64, d, 256, generator=g)),
            (torch.randn(64, 256, 256, generator=g), torch.randn(64, 256, d, generator=g)),
        ]
        flops = sum(2 * a.numel() * b.shape[-1] for a, b in pairs)
        secs = _median_seconds(lambda pairs=pairs: [a @ b for a, b in pairs], repeats, _clock(threads))
        out[d] = round(min(1.0, flops / secs / 1e12 / large_tflops), 4)
    return out


def elementwise_gbps(repeats: int, n: int = 2**20) -> float:
    import torch

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, generator=g), torch.randn(n, generator=g)
    a2, mask = a.view(-1, 256), a.view(-1, 256) > 0
    y = torch.softmax(a2, dim=-1)
    ops = [
        (lambda: a + b, 3),
        (lambda: a * b, 3),
        (lambda: torch.where(mask, a2, 0.0), 2.25),  # the bool mask is a quarter of a float
        (lambda: torch.softmax(a2, dim=-1), 2),
        (lambda: torch._softmax_backward_data(b.view(-1, 256), y, -1, torch.float32), 3),
        (lambda: torch.ops.aten.threshold_backward(b, a, 0.0), 3),
    ]
    nbytes = sum(k for _, k in ops) * n * 4
    return nbytes / _median_seconds(lambda: [fn() for fn, _ in ops], repeats, _clock(1)) / 1e9


def rng_gelems(repeats: int, n: int = 4 * 2**20) -> float:
    import torch

    torch.set_num_threads(1)
    x = torch.empty(n)
    return n / _median_seconds(lambda: x.bernoulli_(0.9), repeats, _clock(1)) / 1e9


def op_overhead_us(repeats: int, links: int = 300) -> float:
    """Seconds per aten call of an autograd step of tiny ops (64 elements): forward and backward of a chain of
    multiplies and adds, over the aten calls a dispatch counter sees in it (what msmoe-plan's census counts).
    Eager training pays this per call beside the math: dispatch, autograd nodes, the backward engine."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    torch.set_num_threads(1)
    x = torch.ones(64, requires_grad=True)

    def chain():
        y = x
        for _ in range(links):
            y = y * 1.0001 + 0.5
        y.sum().backward()
        x.grad = None

    class Count(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.calls += 1
            return func(*args, **(kwargs or {}))

    with Count():
        chain()
    return _median_seconds(chain, repeats, _clock(1)) / Count.calls * 1e6


def copy_gbps(repeats: int) -> float:
    import torch

    src = torch.ones(64 * 2**20)  # 256 MiB
    dst = torch.empty_like(src)
    return 2 * src.nbytes / _median_seconds(lambda: dst.copy_(src), repeats, _clock(1)) / 1e9


def _collectives_worker(rank: int, world: int, init_file: str, nbytes: int, repeats: int, out) -> None:
    import torch
    import torch.distributed as dist

    from msmoe_dist.parallel import comm

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    tiny, big = torch.ones(2 * world), torch.ones(nbytes // 4)

    def timed(fn) -> float:
        def once():
            comm.barrier(name="calibrate step")
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0

        once()
        return statistics.median(once() for _ in range(max(repeats, 9)))

    # Latency in a training step's rhythm: each rank computes (about a millisecond of matmuls) and then meets
    # the others in a tiny all-to-all; what the meeting adds to the computing is the latency, including the
    # wait for the slowest peer (ranks drift apart while they compute).
    a, b = torch.randn(256, 256), torch.randn(256, 256)

    def work():
        for _ in range(4):
            a @ b

    def work_and_meet():
        work()
        comm.all_to_all_single(tiny, name="calibrate all_to_all (latency)")

    latency = max(timed(lambda: [work_and_meet() for _ in range(20)]) - timed(lambda: [work() for _ in range(20)]), 0)
    latency /= 20
    a2a = timed(lambda: comm.all_to_all_single(big, name="calibrate all_to_all"))
    reduce = timed(lambda: comm.all_reduce(big, name="calibrate all_reduce"))
    if rank == 0:
        out.put(
            {
                "latency_us": latency * 1e6,
                "a2a_gbps": nbytes / max(a2a - latency, 1e-9) / 1e9,
                "allreduce_gbps": 2 * (world - 1) / world * nbytes / max(reduce - latency, 1e-9) / 1e9,
            }
        )
    comm.barrier(name="calibrate done")
    dist.destroy_process_group()


def gloo_collectives(ranks: int, repeats: int, nbytes: int = 4 * 2**20, timeout_s: float = 180.0) -> dict:
    """Latency (a tiny all-to-all) and the bandwidth of all-to-all and all-reduce of nbytes per rank, among
    max(2, ranks) spawned gloo processes on this machine (ranks beyond the cores take turns, and wait longer)."""
    import multiprocessing as mp
    import tempfile

    world = max(2, ranks)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init = os.path.join(tmp, "store")
        procs = [
            ctx.Process(target=_collectives_worker, args=(r, world, init, nbytes, repeats, q)) for r in range(world)
        ]
        for p in procs:
            p.start()
        try:
            return dict(q.get(timeout=timeout_s))
        finally:
            for p in procs:
                p.join(timeout=10)
                if p.is_alive():
                    p.kill()


def _rates(threads: int, repeats: int, wait=lambda: None) -> dict:
    """This process's compute rates; ``wait`` (a barrier) lines the measurements up with the other ranks'."""
    wait()
    tflops = gemm_tflops(threads, repeats)
    wait()
    efficiency = gemm_efficiency(threads, repeats, tflops)
    wait()
    mem = copy_gbps(repeats)
    wait()
    ew = elementwise_gbps(repeats)
    wait()
    rng = rng_gelems(repeats)
    wait()
    overhead = op_overhead_us(repeats)
    return {"tflops": tflops, "efficiency": efficiency, "mem": mem, "ew": ew, "rng": rng, "overhead": overhead}


def _rates_worker(threads: int, repeats: int, barrier, out) -> None:
    out.put(_rates(threads, repeats, lambda: barrier.wait(timeout=600)))


def _rates_of_concurrent_ranks(ranks: int, threads: int, repeats: int, timeout_s: float = 900.0) -> dict:
    """_rates measured by `ranks` spawned processes at the same time; the median of each figure over them."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    q, barrier = ctx.Queue(), ctx.Barrier(ranks)
    procs = [ctx.Process(target=_rates_worker, args=(threads, repeats, barrier, q)) for _ in range(ranks)]
    for p in procs:
        p.start()
    try:
        got = [q.get(timeout=timeout_s) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    out = {k: statistics.median(g[k] for g in got) for k in got[0] if k != "efficiency"}
    out["efficiency"] = {d: statistics.median(g["efficiency"][d] for g in got) for d in got[0]["efficiency"]}
    return out


def run_calibrate(args: argparse.Namespace) -> dict:
    from msmoe_dist.bench.common import machine_info, now_iso
    from msmoe_dist.plan.cluster import Cluster, cluster_to_yaml

    if args.ranks < 1 or args.repeats < 1:
        raise SystemExit("msmoe-bench calibrate: --ranks and --repeats must be >= 1")
    cores = os.cpu_count() or 1
    threads = args.threads or max(1, cores // args.ranks)
    CPU_TIME[0] = args.cpu_time
    if args.cpu_time or args.ranks == 1:
        r = _rates(threads, args.repeats)
    else:  # every rank measures at once: what one of them gets while the others compute (cores, caches, memory)
        r = _rates_of_concurrent_ranks(args.ranks, threads, args.repeats)
    tflops, efficiency, mem, ew, rng, overhead = (
        r["tflops"], r["efficiency"], r["mem"], r["ew"], r["rng"], r["overhead"]
    )  # fmt: skip
    coll = gloo_collectives(args.ranks, args.repeats)
    a2a = coll["a2a_gbps"]
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
        nvlink_allreduce_gbps=coll["allreduce_gbps"],
        net_allreduce_gbps=coll["allreduce_gbps"],
        collective_latency_us=coll["latency_us"],
        op_overhead_us=overhead,
        gemm_efficiency=efficiency,
        elementwise_gbps=ew,
        rng_gelems=rng,
        sources=f"msmoe-bench calibrate, {now_iso()}, {machine_info('cpu')}, load average {load:.2f}",
        notes=f"fp32 GEMM with {threads} threads per rank for {args.ranks} rank(s); "
        f"gloo among {max(2, args.ranks)} processes"
        + ("; GEMM, copy and operator times in CPU seconds" if args.cpu_time else ""),
    )
    Path(args.output).write_text(cluster_to_yaml(cluster))
    figures = {
        "gemm_tflops": tflops,
        "gemm_efficiency": efficiency,
        "mem_gbps": mem,
        "elementwise_gbps": ew,
        "rng_gelems": rng,
        "a2a_gbps": a2a,
        "allreduce_gbps": coll["allreduce_gbps"],
        "collective_latency_us": coll["latency_us"],
        "op_overhead_us": overhead,
    }
    return {"output": args.output, **figures, "load": load}
