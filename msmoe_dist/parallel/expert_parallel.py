"""Expert parallelism applied to a model that was built on one device.

Build the model once from the seed, either holding only this rank's experts
(`build_model(..., local_experts=layout.local_experts(rank, E))`: nothing else is ever allocated) or
every expert, exactly as a one-process run does; then call `apply_expert_parallel(model, pg)` once,
before the optimiser is built. Every rank then holds the same dense weights as the one-process model
and the slice of its experts that the layout gives it (`ParallelLayout.local_experts`) with the
one-process values (each expert is initialised from its own seed, moe.experts.expert_seed); its MoE
layers move tokens by all-to-all inside the EP group. No random numbers are drawn here, and the build
draws the same numbers from the global generator at every EP degree, so the RNG stream after this
call is the one-process run's.

Worked example: 8 experts, 4 ranks, ep_size 2. Ranks 0 and 2 keep experts 0..3, ranks 1 and 3
keep experts 4..7; every `Experts.w1` shrinks from [8, D, F] to [4, D, F] (and b1, w2, b2 alike).
"""

from __future__ import annotations

from torch import nn

from msmoe_dist.moe.layer import MoELayer
from msmoe_dist.parallel.all_to_all import AllToAllDispatcher
from msmoe_dist.parallel.comm_stats import CommStats
from msmoe_dist.parallel.expert_choice_ep import ExpertChoiceAllToAll
from msmoe_dist.parallel.groups import ProcessGroups


def apply_expert_parallel(model: nn.Module, pg: ProcessGroups, comm: CommStats | None = None) -> None:
    """Keep this rank's experts in every MoE layer (slice a full layer; a layer built with exactly
    these experts is kept as it is) and route their tokens through the EP group.

    ep_size 1 leaves the model as it is (every rank holds every expert; LocalDispatcher stays).
    `comm`, if given, measures every layer's collectives (one object for the whole model).
    The expert parameters are new, tagged Parameter objects (`msmoe_dist.moe.is_expert_param`).
    """
    layout = pg.layout
    for layer in (m for m in model.modules() if isinstance(m, MoELayer)):
        num_experts = layer.cfg.num_experts
        local = layout.local_experts(pg.rank, num_experts)  # LayoutError if ep_size does not divide E
        if layout.ep_size == 1:
            continue
        # moe.router=expert_choice: the experts choose among the EP group's tokens (parallel/expert_choice_ep.py).
        kind = ExpertChoiceAllToAll if layer.cfg.router == "expert_choice" else AllToAllDispatcher
        layer.shard_experts(local, kind(num_experts, pg.ep, layout.ep_size, pg.ep_rank, comm))
