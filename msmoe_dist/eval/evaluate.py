"""Perplexity over a token stream, every target token scored exactly once."""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from msmoe_dist.data import eval_batches


def autocast_ctx(device: torch.device, dtype: str):
    if dtype == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate_lm(
    model: nn.Module, stream: torch.Tensor, batch_size: int, seq_len: int, max_batches: int, device, dtype: str = "fp32"
) -> dict:
    was_training = model.training
    model.eval()
    nll, count = 0.0, 0
    try:
        for x, y in eval_batches(stream, batch_size, seq_len, max_batches):
            x, y = x.to(device), y.to(device)
            with autocast_ctx(device, dtype):
                out = model(x, y, reduction="sum")
            nll += float(out.loss)
            count += y.numel()
    finally:
        model.train(was_training)
    loss = nll / max(count, 1)
    return {"loss": loss, "ppl": math.exp(min(loss, 700.0)), "tokens": count}
