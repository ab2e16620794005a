"""Expert-choice routing (Zhou et al. 2022, arXiv 2202.09368): `moe.router=expert_choice`.

Legend: T tokens on this process, G tokens of the selection group (T on one process; every rank's
tokens of the expert-parallel group under EP), E experts, C picks per expert, R picked rows.

The router scores every token: probs_TE = softmax(x W^T) over the experts (fp32). Then each EXPERT
picks its C highest-scoring tokens of the group,

    C = min(G, max(moe.min_capacity, ceil(top_k * G / E * capacity_factor)))   (capacity_factor 0 reads as 1)

and a picked token's row is weighted by its score for that expert. A token may be picked by 0..E
experts; one picked by none gets 0 from the routed experts (it passes through the residual, plus any
shared experts) and is counted (`MoEStats.unpicked`). Ties are broken towards the lower token index
(a stable sort), so every rank of a group makes the same choice from the same scores.

The choice compares tokens across the whole batch: over a causal language model's batch, whether
position t is picked depends on the scores of later positions (and of other sequences), a leak of
the future. The configuration allows it for the bidirectional V-MoE only (config/validate.py).

Here: the router, the selection, and the single-process dispatcher (a `Dispatcher` like
LocalDispatcher); the expert-parallel one, which gathers the scores over the EP group so that the
choice equals the single-process choice over the group's tokens, is
`msmoe_dist.parallel.expert_choice_ep.ExpertChoiceAllToAll`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from msmoe_dist.moe.dispatcher import Combined, DispatchState, ExpertCompute, permute, run_blocking, unpermute
from msmoe_dist.moe.router import Routing, router_z_loss

if TYPE_CHECKING:  # the config package imports models, which import this package
    from msmoe_dist.config.schema import MoEConfig


@dataclass(frozen=True)
class ExpertChoiceState(DispatchState):
    """A DispatchState (rows sorted by expert) that also carries the number of this rank's tokens no expert
    picked, as a 0-d device tensor (read only when statistics are logged)."""

    unpicked_t: Tensor | None = None


def picks_per_expert(factor: float, num_tokens: int, top_k: int, num_experts: int) -> int:
    """ceil(top_k * G / E * factor), factor <= 0 reading as 1 (the MoE layer floors it at moe.min_capacity;
    the dispatch caps it at G)."""
    factor = factor if factor > 0 else 1.0
    return max(1, math.ceil(round(factor * num_tokens * top_k / num_experts, 9)))


def choose_tokens(probs_GE: Tensor, picks: int) -> Tensor:
    """token_EC: the group-token indices each expert picks, best first (ties: lower index first)."""
    return torch.sort(probs_GE.detach().t(), dim=1, descending=True, stable=True).indices[:, :picks]


class ExpertChoiceRouter(nn.Module):
    """A MoERouter whose Routing carries only the scores (probs_TE); the expert-choice dispatchers choose.

    experts_TK/weights_TK are empty [T, 0]: no token has a fixed number of experts. Supports the z-loss
    (moe.z_loss_coef); the balance losses do not apply (every expert takes exactly C tokens)."""

    def __init__(self, d_model: int, cfg: MoEConfig):
        super().__init__()
        self.num_experts, self.top_k = cfg.num_experts, cfg.top_k
        self.z_loss_coef = cfg.z_loss_coef
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, d_model))
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        nn.init.normal_(self.weight, mean=0.0, std=std)

    def set_step(self, step: int) -> None:
        """Nothing in expert-choice routing depends on the step."""

    def forward(self, x_TD: Tensor, token_T: Tensor | None = None) -> Routing:
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            logits_TE = F.linear(x_TD.float(), self.weight.float())
            probs_TE = torch.softmax(logits_TE, dim=-1)
            zero = logits_TE.new_zeros(())
            z = router_z_loss(logits_TE) if self.z_loss_coef else zero
            aux = self.z_loss_coef * z if self.z_loss_coef else zero
        T = x_TD.shape[0]
        empty_TK = torch.empty(T, 0, dtype=torch.long, device=x_TD.device)
        return Routing(
            experts_TK=empty_TK,
            weights_TK=probs_TE.new_empty(T, 0),
            logits_TE=logits_TE,
            probs_TE=probs_TE,
            balance_loss=zero,
            z_loss=z,
            aux_loss=aux,
        )


def unpicked_count(token_R: Tensor, num_tokens: int) -> Tensor:
    """0-d: how many of the num_tokens tokens appear in no row (no sync)."""
    picked_T = torch.zeros(num_tokens, dtype=torch.bool, device=token_R.device)
    picked_T[token_R] = True
    return num_tokens - picked_T.sum()


class LocalExpertChoiceDispatcher:
    """Expert-choice dispatch on one process (the reference for the expert-parallel one): a Dispatcher."""

    def __init__(self, num_experts: int):
        self.num_experts = self.num_local_experts = num_experts

    def capacity(self, factor: float, num_tokens: int, top_k: int, device: torch.device) -> int:
        return picks_per_expert(factor, num_tokens, top_k, self.num_experts)

    def dispatch(
        self, x_TD: Tensor, routing: Routing, capacity: int | None
    ) -> tuple[Tensor, list[int], ExpertChoiceState]:
        T, E = routing.probs_TE.shape
        C = min(int(capacity or 0), T)
        token_EC = choose_tokens(routing.probs_TE, C)
        expert_EC = torch.arange(E, device=token_EC.device).unsqueeze(1).expand(E, C)
        token_R = token_EC.reshape(-1)
        weight_R = routing.probs_TE[token_R, expert_EC.reshape(-1)].to(routing.weights_TK.dtype)
        per_expert = (C,) * E
        state = ExpertChoiceState(
            token_R=token_R,
            weight_R=weight_R,
            num_tokens=T,
            tokens_per_expert=per_expert,
            routed_per_expert=per_expert,
            num_dropped=0,
            kept_TK=None,
            unpicked_t=unpicked_count(token_R, T),
        )
        return permute(x_TD, token_R), list(per_expert), state

    def combine(self, y_RD: Tensor, state: ExpertChoiceState) -> Combined:
        return Combined(unpermute(y_RD, state.token_R, state.weight_R, state.num_tokens), y_RD, state)

    def exchange_and_compute(
        self, x_TD: Tensor, routing: Routing, capacity: int | None, experts: ExpertCompute, overlap_chunks: int = 1
    ) -> Combined:
        """dispatch, the experts, combine: expert choice does not pipeline (moe.overlap_chunks must be 1)."""
        return run_blocking(self, x_TD, routing, capacity, experts)
