"""Auxiliary-loss-free load balancing (DeepSeek-V3, arXiv 2412.19437, sec. 2.1.2): `moe.balance=bias`.

Legend: T tokens, E experts, K top-k, L MoE layers.

Each top-k router holds a per-expert bias b_E. It is added to the routing scores for the CHOICE of
experts only: experts_TK = topk(scores_TE + b_E), while the combine weights are computed from the
unbiased scores of the chosen experts. After every optimiser step each layer moves

    b_e += rate * sign(mean_e' load_e' - load_e);   b -= mean(b)     (re-centred to zero mean)

where load_e counts the assignments to expert e over the WHOLE global batch of that step: every
micro-batch of every data-parallel rank (the engine sums the counters over all ranks with one
all-reduce for all layers). An overloaded expert's bias falls and an idle one's rises, so the choice
drifts towards balance without any gradient on the router.

Counting exactly once. The counter of a router is advanced inside its forward only when
  - the module is in training mode (evaluation, the routing-fluctuation probe and msmoe-eval run in
    eval mode and never count), and
  - the forward is not running inside the autograd engine (`in_backward()`). Activation checkpointing
    re-runs a block's forward during backward to rebuild its activations; both PyTorch variants
    (reentrant and non-reentrant) do that recomputation inside the backward pass, so it is skipped,
    while the first forward (with or without grad mode: the reentrant variant runs it under no_grad)
    counts. Gradient accumulation runs one forward per micro-batch, each counted once; the counters are
    read and zeroed once per optimiser step by `update_expert_biases`.

The bias is a persistent fp32 buffer (`...router.expert_bias.bias` in the state dict), so both
engines save and resume it bit for bit; DeepSpeed casts parameters, not fp32 buffers, to bf16/fp16.
The counter is a non-persistent int64 buffer: a checkpoint is written after a step, when it is zero.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn


def in_backward() -> bool:
    """True while the autograd engine runs (a backward pass, where checkpointing recomputes forwards)."""
    return torch._C._current_graph_task_id() != -1


class ExpertBias(nn.Module):
    """The per-expert selection bias of one router and its load counter for the step under way."""

    bias: Tensor  # [E] fp32, persistent
    load: Tensor  # [E] int64, this step's assignments so far (not saved)

    def __init__(self, num_experts: int, rate: float):
        super().__init__()
        if not rate >= 0:
            raise ValueError(f"bias update rate must be >= 0, got {rate}")
        self.num_experts, self.rate = num_experts, rate
        self.register_buffer("bias", torch.zeros(num_experts, dtype=torch.float32))
        self.register_buffer("load", torch.zeros(num_experts, dtype=torch.long), persistent=False)

    def select(self, scores_TE: Tensor, top_k: int) -> tuple[Tensor, Tensor]:
        """Like ``scores_TE.topk(top_k)``: (the chosen experts' UNBIASED scores, their ids), the ids chosen on
        scores + bias. Counts the choice (see the module docstring for when)."""
        experts_TK = (scores_TE.detach() + self.bias.to(scores_TE.dtype)).topk(top_k, dim=-1).indices
        if self.training and not in_backward():
            self.load += torch.bincount(experts_TK.reshape(-1), minlength=self.num_experts)
        return scores_TE.gather(-1, experts_TK), experts_TK

    @torch.no_grad()
    def apply_update(self, load_E: Tensor) -> None:
        """One optimiser step's update from the global load (every rank computes the same, from the same sums)."""
        load = load_E.to(device=self.bias.device, dtype=torch.float32)
        self.bias += self.rate * torch.sign(load.mean() - load)
        self.bias -= self.bias.mean()
        self.load.zero_()


def expert_biases(model: nn.Module) -> list[ExpertBias]:
    """The model's bias balancers, in module order (the same order on every rank)."""
    return [m for m in model.modules() if isinstance(m, ExpertBias)]


def update_expert_biases(model: nn.Module, all_sum: Callable[[Tensor], Tensor] | None = None) -> None:
    """After an optimiser step: sum this step's counters over the data-parallel ranks (``all_sum``, one
    collective for all layers; None on one process) and move every layer's bias. A no-op without balancers."""
    balancers = expert_biases(model)
    if not balancers:
        return
    loads_LE = torch.stack([b.load for b in balancers])
    if all_sum is not None:
        loads_LE = all_sum(loads_LE)
    for b, load_E in zip(balancers, loads_LE, strict=True):
        b.apply_update(load_E)
