"""Run a function on N gloo ranks in spawned processes, with a hard timeout; a free loopback port.

Tests reach these through the fixtures in tests/conftest.py (`run_distributed`, `free_port`). This
module exists apart from conftest.py because spawned ranks unpickle `_worker` by its module name:
pytest puts tests/ on sys.path (the rootdir conftest), and the spawn start method hands that
sys.path to every child, so `dist_harness` imports there too.

Each rank calls `fn(rank, world_size, *args)` after init_process_group (gloo, file:// store,
collective timeout `collective_timeout_s`). Returns the list of per-rank return values
(picklable). A rank that raises fails the test with its traceback; ranks still alive after
`timeout_s` are killed and the test fails instead of hanging.
"""

from __future__ import annotations

import datetime
import os
import queue as queue_mod
import tempfile
import traceback

import torch.multiprocessing as mp


def _worker(fn, rank, world_size, init_file, q, args, collective_timeout_s, master_port):
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)  # N ranks share 2 cores
    os.environ.update(
        {
            "RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": str(world_size),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": master_port,
        }
    )
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"file://{init_file}",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=collective_timeout_s),
        )
        out = fn(rank, world_size, *args)
        q.put((rank, True, out))
    except BaseException:  # noqa: BLE001 - report everything to the parent
        q.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago (the OS picks it; another process may still take it)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_distributed(fn, world_size: int, *args, timeout_s: float = 180.0, collective_timeout_s: float = 60.0):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "store")
        port = str(free_port())  # only read by libraries that want MASTER_*; the store is the file
        procs = [
            ctx.Process(target=_worker, args=(fn, r, world_size, init_file, q, args, collective_timeout_s, port))
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        results, errors = {}, []
        import time

        deadline = time.monotonic() + timeout_s
        while len(results) + len(errors) < world_size:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                rank, ok, payload = q.get(timeout=min(left, 1.0))
            except queue_mod.Empty:
                if all(not p.is_alive() for p in procs) and q.empty():
                    break
                continue
            if ok:
                results[rank] = payload
            else:
                errors.append(f"rank {rank}:\n{payload}")
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    if errors:
        raise AssertionError("distributed run failed\n" + "\n".join(errors))
    if len(results) < world_size:
        missing = sorted(set(range(world_size)) - set(results))
        raise AssertionError(f"ranks {missing} did not finish within {timeout_s} s (killed)")
    return [results[r] for r in range(world_size)]
