"""msmoe_dist.moe: router, experts, dispatch and the sparse MoE layer."""

from msmoe_dist.moe.dispatcher import (  # noqa: F401
    Combined,
    Dispatcher,
    DispatchState,
    ExpertCompute,
    LocalDispatcher,
    capacity_keep,
    expert_capacity,
    permute,
    sort_by_expert,
    unpermute,
)
from msmoe_dist.moe.experts import ACTIVATIONS, Experts, grouped_mm_works, is_expert_param  # noqa: F401
from msmoe_dist.moe.layer import MoELayer, MoEOutput, build_router  # noqa: F401
from msmoe_dist.moe.router import MoERouter, Router, Routing, router_z_loss, switch_balance_loss  # noqa: F401
from msmoe_dist.moe.stablemoe import StableMoERouter, StableRouting, stable_balance_loss  # noqa: F401
from msmoe_dist.moe.stats import MoEStats, compute_stats  # noqa: F401

__all__ = [
    "ACTIVATIONS",
    "Combined",
    "DispatchState",
    "Dispatcher",
    "Experts",
    "LocalDispatcher",
    "MoELayer",
    "MoEOutput",
    "MoERouter",
    "MoEStats",
    "Router",
    "Routing",
    "StableMoERouter",
    "StableRouting",
    "build_router",
    "capacity_keep",
    "compute_stats",
    "expert_capacity",
    "grouped_mm_works",
    "is_expert_param",
    "permute",
    "router_z_loss",
    "sort_by_expert",
    "stable_balance_loss",
    "switch_balance_loss",
    "unpermute",
]
