"""Who and where this process is: rank, world size, local rank and compute device.

Built once per process from the launcher's environment (torchrun and the deepspeed launcher set
RANK, WORLD_SIZE and LOCAL_RANK; a plain `python` process is rank 0 of a world of one), then
handed to whoever needs it: the trainer, the engines, the benchmarks, msmoe-eval. Nothing else
reads these variables.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from msmoe_dist.config.schema import ParallelConfig
from msmoe_dist.errors import UserError


class DeviceError(UserError):
    """A device that cannot be used here (one line)."""


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto``: this process's GPU when CUDA is visible, else the CPU; ``cuda`` without a GPU is an error."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError("train.device=cuda but no CUDA device is visible (expected train.device=cpu or auto)")
        return torch.device("cuda", local_rank) if local_rank else torch.device("cuda")
    return torch.device(name)


@dataclass(frozen=True)
class Runtime:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device: str = "auto") -> Runtime:
        rank = int(os.environ.get("RANK", 0))
        world = int(os.environ.get("WORLD_SIZE", 1))
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        return cls(rank, world, local_rank, pick_device(device, local_rank))

    def start_distributed(self, pcfg: ParallelConfig) -> None:
        """Starts torch.distributed (idempotent; a world of one on loopback without a launcher) and
        DeepSpeed's communication layer, with parallel.timeout_s on every collective."""
        from msmoe_dist.parallel.startup import init_for_deepspeed

        init_for_deepspeed(pcfg, self.device.type, self.local_rank)
