"""msmoe_dist.moe: router, experts, dispatch and the sparse MoE layer."""

from msmoe_dist.moe.dispatcher import (  # noqa: F401
    DispatchState,
    LocalDispatcher,
    capacity_keep,
    expert_capacity,
    permute,
    sort_by_expert,
    unpermute,
)
from msmoe_dist.moe.experts import ACTIVATIONS, Experts, grouped_mm_works  # noqa: F401
from msmoe_dist.moe.layer import MoELayer, MoEOutput  # noqa: F401
from msmoe_dist.moe.router import Router, Routing, router_z_loss, switch_balance_loss  # noqa: F401
from msmoe_dist.moe.stats import MoEStats, compute_stats  # noqa: F401
from msmoe_dist.moe.stablemoe import StableMoERouter, StableRouting, stable_balance_loss  # noqa: F401

__all__ = [
    "ACTIVATIONS",
    "DispatchState",
    "Experts",
    "LocalDispatcher",
    "MoELayer",
    "MoEOutput",
    "MoEStats",
    "Router",
    "Routing",
    "StableMoERouter",
    "StableRouting",
    "capacity_keep",
    "compute_stats",
    "expert_capacity",
    "grouped_mm_works",
    "permute",
    "router_z_loss",
    "sort_by_expert",
    "stable_balance_loss",
    "switch_balance_loss",
    "unpermute",
]
