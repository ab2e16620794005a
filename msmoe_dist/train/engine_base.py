"""What the training loop needs from an engine (native PyTorch or DeepSpeed)."""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch


class NonFiniteLoss(RuntimeError):
    """Training hit a NaN/Inf loss; the CLI exits with code 3."""


@dataclass(frozen=True)
class StepResult:
    loss: float  # mean cross-entropy over the global batch (all micro-batches, all ranks)
    aux_loss: float  # mean weighted balance/z loss
    grad_norm: float  # global gradient norm before clipping, as one process would compute it
    stats: list | None  # MoE statistics of this rank's last micro-batch (when asked for)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
