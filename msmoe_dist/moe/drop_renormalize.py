"""`moe.renormalize_after_drop`: DeepSpeed's order of renormalisation and capacity drops.

Legend: T tokens, K top-k, E experts.

With moe.gate=softmax_topk and moe.renormalize=true the router divides a token's K gate values by their
sum BEFORE the capacity drops; a token that loses one of its two routes keeps p1/(p1+p2) on the
other. DeepSpeed's top2gating renormalises AFTER the drops (the surviving gate values divided by
their sum, clamped at eps), so that token keeps 1. This function gives the DeepSpeed order: the kept
mask is exactly the dispatcher's (the same stable sort and first-`capacity` rule, decided from the
routing alone, so it also holds under expert parallelism, where each rank drops its own rows).
"""

from __future__ import annotations

import dataclasses

import torch

from msmoe_dist.moe.dispatcher import capacity_keep, sort_by_expert
from msmoe_dist.moe.router import Routing


def kept_assignments(experts_TK: torch.Tensor, num_experts: int, capacity: int) -> torch.Tensor:
    """bool [T, K]: which assignments survive capacity (the dispatcher's rule)."""
    T, K = experts_TK.shape
    assignment_A, sorted_experts_A, counts_E = sort_by_expert(experts_TK, num_experts)
    keep_A = capacity_keep(sorted_experts_A, counts_E, capacity)
    kept = torch.zeros(T * K, dtype=torch.bool, device=experts_TK.device)
    kept[assignment_A] = keep_A
    return kept.view(K, T).t()


def renormalize_after_drop(routing: Routing, num_experts: int, capacity: int | None) -> Routing:
    """The routing with each token's weights rescaled over its kept assignments (dropless: unchanged)."""
    if capacity is None:
        return routing
    kept_TK = kept_assignments(routing.experts_TK, num_experts, capacity)
    w_TK = routing.weights_TK * kept_TK
    denom = w_TK.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(w_TK.dtype).eps)
    return dataclasses.replace(routing, weights_TK=w_TK / denom)
