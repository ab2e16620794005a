"""What evaluation needs from whoever holds the model: an `Evaluator`.

Both training engines satisfy it (msmoe_dist.train.engine.Engine extends it), and so does
`LocalEvaluator`, a plain model in one process (msmoe-eval). Evaluation code takes an Evaluator,
never a bare model, so one function serves training-time and offline evaluation.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Protocol

import torch
from torch import nn


def autocast_ctx(device: torch.device, dtype: str):
    """bf16 autocast for train.dtype=bf16 in one process; no-op otherwise."""
    if dtype == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class Evaluator(Protocol):
    rank: int
    world_size: int

    @property
    def model(self) -> nn.Module: ...

    def evaluating(self) -> contextlib.AbstractContextManager[None]: ...  # eval mode, restored afterwards

    def eval_forward(self, x: torch.Tensor, y: torch.Tensor | None = None, **kwargs: Any) -> Any: ...

    def all_sum(self, values: list[float]) -> list[float]: ...  # sum over all ranks; identity on one


class LocalEvaluator:
    """A plain model in one process, as an Evaluator."""

    rank, world_size = 0, 1

    def __init__(self, model: nn.Module, device: torch.device, dtype: str = "fp32"):
        self.model, self.device, self.dtype = model, torch.device(device), dtype

    @contextlib.contextmanager
    def evaluating(self) -> Iterator[None]:
        was_training = self.model.training
        self.model.eval()
        try:
            yield
        finally:
            self.model.train(was_training)

    @torch.no_grad()
    def eval_forward(self, x: torch.Tensor, y: torch.Tensor | None = None, **kwargs: Any) -> Any:
        with autocast_ctx(self.device, self.dtype):
            return self.model(x.to(self.device), None if y is None else y.to(self.device), **kwargs)

    def all_sum(self, values: list[float]) -> list[float]:
        return list(values)
