"""Process-group start-up for the DeepSpeed engine: torchrun, the deepspeed launcher, or one process."""

from __future__ import annotations

import datetime
import os
import socket

import torch
import torch.distributed as dist

from msmoe_dist.config.schema import ParallelConfig


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
        dist.init_process_group(backend=backend, timeout=timeout)
    import deepspeed

    deepspeed.init_distributed(dist_backend=backend, timeout=timeout)
