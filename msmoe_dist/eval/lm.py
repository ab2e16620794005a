"""Perplexity over a token stream, every target token scored exactly once, on one rank or many."""

from __future__ import annotations

import math

import torch
from torch import nn

from msmoe_dist.data import eval_batches
from msmoe_dist.eval.evaluator import Evaluator, LocalEvaluator


@torch.no_grad()
def evaluate_tokens(ev: Evaluator, stream: torch.Tensor, batch_size: int, seq_len: int, max_batches: int) -> dict:
    """Batches are dealt round-robin to ranks; a rank without a batch still runs a forward on a dummy
    one (uncounted), because every rank of an expert-parallel group must join every all-to-all."""
    batches = list(eval_batches(stream, batch_size, seq_len, max_batches))
    mine = batches[ev.rank :: ev.world_size]
    rounds = math.ceil(len(batches) / ev.world_size)
    nll = count = 0.0
    with ev.evaluating():
        for i in range(rounds):
            x, y = mine[i] if i < len(mine) else batches[0]
            out = ev.eval_forward(x, y, reduction="sum")
            if i < len(mine):
                nll, count = nll + float(out.loss), count + y.numel()  # device-to-host sync per batch
    nll, count = ev.all_sum([nll, count])
    loss = nll / max(count, 1.0)
    return {"loss": loss, "ppl": math.exp(min(loss, 700.0)), "tokens": int(count)}


def evaluate_lm(
    model: nn.Module, stream: torch.Tensor, batch_size: int, seq_len: int, max_batches: int, device, dtype: str = "fp32"
) -> dict:
    """evaluate_tokens for a plain model in one process."""
    return evaluate_tokens(LocalEvaluator(model, device, dtype), stream, batch_size, seq_len, max_batches)
