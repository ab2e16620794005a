"""The engine seam: what the training loop needs from an engine (native PyTorch or DeepSpeed).

An engine receives a model that is already parallel (msmoe_dist.parallel.apply_expert_parallel)
and owns the optimiser, the backward pass, gradient reduction and clipping, and its checkpoint
files. `NativeEngine` (one process) and `DeepSpeedEngine` (any number) satisfy `Engine`;
evaluation needs only the `Evaluator` part of it.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from msmoe_dist.checkpoint import CheckpointMeta
from msmoe_dist.eval.evaluator import Evaluator
from msmoe_dist.models.base import MoEModel
from msmoe_dist.train.errors import NonFiniteLoss

__all__ = [
    "Engine",
    "NonFiniteLoss",
    "StepResult",
    "check_finite_params",
    "nonfinite_params",
    "objective",
    "rng_state",
    "set_rng_state",
]


@dataclass(frozen=True)
class StepResult:
    loss: float  # mean cross-entropy over the global batch (all micro-batches, all ranks)
    aux_loss: float  # mean weighted balance/z loss
    grad_norm: float  # global gradient norm before clipping, as one process would compute it
    stats: list | None  # MoE statistics of this rank's last micro-batch (when asked for)


def objective(out: Any) -> torch.Tensor:
    """The training objective: the model's cross-entropy plus its MoE layers' weighted auxiliary losses."""
    return out.loss + out.aux_loss


class Engine(Evaluator, Protocol):
    name: str
    is_main: bool
    device: torch.device

    @property
    def model(self) -> MoEModel: ...  # the (parallel) model, unwrapped

    def set_step(self, step: int) -> None: ...  # the 0-based optimiser step about to be taken

    def train_step(self, micro_batches: list, collect_stats: bool) -> StepResult: ...

    def lr(self) -> float: ...

    def barrier(self) -> None: ...

    def layout_meta(self) -> dict: ...  # checkpoint.meta.LAYOUT_KEYS of this engine

    def save_files(self, step_dir: Path) -> None: ...  # this rank's checkpoint files

    def load_files(self, step_dir: Path, meta: CheckpointMeta) -> None: ...

    def load_full_state(self, full: dict) -> None: ...  # a checkpoint of another layout (checkpoint.full_state)


def nonfinite_params(params: Sequence[torch.Tensor]) -> torch.Tensor:
    """1.0 if a parameter is unusable, else 0.0: a 0-d float tensor on the parameters' device, no sync.

    Unusable: a NaN/Inf, or weights so large that the tensor's squared L2 norm overflows float32
    (entries around 1e19 and beyond): no forward pass through them stays finite (a LayerNorm squares
    its input), so such a checkpoint evaluates to NaN although every number in it is finite. One fused
    L2 norm per tensor (``_foreach_norm`` sums the squares without rescaling), then one small reduction.
    """
    if not params:
        return torch.zeros(())
    with torch.no_grad():
        norms = torch.stack([t.float() for t in torch._foreach_norm([p.detach() for p in params])])
        return (~torch.isfinite(norms)).any().float()


def check_finite_params(params: Sequence[torch.Tensor]) -> None:
    """Raise NonFiniteLoss when the weights are unusable (see nonfinite_params): a checkpoint is written only
    after this returned, so such weights are never sealed (the loss can still be finite when they are)."""
    if nonfinite_params(params).item() > 0:  # device-to-host sync, once per checkpoint
        raise NonFiniteLoss(
            "the weights became non-finite (or overflow float32 when squared); not writing this checkpoint"
        )


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
