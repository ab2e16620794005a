"""Process-group start-up for the DeepSpeed engine: torchrun, the deepspeed launcher, or one process."""

from __future__ import annotations

import datetime
import os
import socket

import torch
import torch.distributed as dist

from msmoe_dist.config.schema import ParallelConfig
from msmoe_dist.logs import setup_logging


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _per_attempt_store(timeout: datetime.timedelta):
    """Under torchrun the workers share the agent's store, which outlives a restart. Subgroups
    (new_group) derive their keys from a counter that starts again at 0 in the restarted workers,
    so they would read the killed attempt's addresses and fail to connect. Prefixing the store with
    the restart count gives every attempt fresh keys. None when not under torchelastic."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() != "true":
        return None
    base = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        int(os.environ["WORLD_SIZE"]),
        is_master=False,
        timeout=timeout,
    )
    return dist.PrefixStore(f"msmoe/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", base)


def init_for_deepspeed(pcfg: ParallelConfig, device: str, local_rank: int) -> None:
    """Initialises torch.distributed from the environment (idempotent) and DeepSpeed's comm layer.

    A plain `python`/`msmoe-train` process (no launcher) becomes a world of one on loopback.
    Every collective gets `parallel.timeout_s`, so a hung peer becomes an error, not a hang.
    """
    use_cuda = torch.cuda.is_available() and device != "cpu"
    backend = pcfg.backend if pcfg.backend != "auto" else ("nccl" if use_cuda else "gloo")
    if use_cuda:
        torch.cuda.set_device(local_rank)
    timeout = datetime.timedelta(seconds=pcfg.timeout_s)
    if not dist.is_initialized():
        for key, val in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1")):
            os.environ.setdefault(key, val)
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        store = _per_attempt_store(timeout)
        if store is None:
            dist.init_process_group(backend=backend, timeout=timeout)
        else:
            dist.init_process_group(
                backend=backend,
                timeout=timeout,
                store=store,
                rank=int(os.environ["RANK"]),
                world_size=int(os.environ["WORLD_SIZE"]),
            )
    setup_logging(dist.get_rank(), dist.get_world_size())  # warnings and status lines say whose they are
    import deepspeed

    if not use_cuda:
        _skip_cpu_shm_op()
    deepspeed.init_distributed(dist_backend=backend, timeout=timeout)


def _skip_cpu_shm_op() -> None:
    """DeepSpeed's CPU accelerator JIT-compiles a shared-memory all-reduce at start-up (1-2 minutes
    on a fresh machine). It only serves inference all-reduce, which training never calls, and its
    initialisation assumes all ranks of a host form one node: two nodes simulated on one machine
    deadlock inside it. Marking the op incompatible makes DeepSpeed skip it."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None:
        deepspeed.ops.__compatible_ops__[builder.NAME] = False
