"""What DeepSpeed's MoE support keys on (DeepSpeed 0.19), given to a model whose MoE layers are ours.

* every expert parameter carries `allreduce=False` and `group_name="ep_size_<P>"`, and our own EP
  and expert-data-parallel (EDP) groups are registered under that name in `deepspeed.utils.groups`,
  so expert gradients are summed over EDP only and divided by the world size (the global-batch
  mean), never averaged across different experts;
* the optimiser's expert parameter groups carry `moe=True` and that name, so ZeRO partitions them
  over EDP;
* a parameter-free `MoE` subclass marks the model, which switches on DeepSpeed's MoE paths
  (expert-aware gradient norm in ZeRO, per-EP-rank optimiser files at stage 0, no broadcast of
  rank 0's experts over the whole world at start-up).
"""

from __future__ import annotations

from torch import nn

from msmoe_dist.checkpoint.layout import DEEPSPEED_MARKER_PREFIX
from msmoe_dist.moe import is_expert_param
from msmoe_dist.parallel import ProcessGroups


def group_name(ep_size: int) -> str:
    return f"ep_size_{ep_size}"


def _marker_class():
    from deepspeed.moe.layer import MoE

    class DeepSpeedMoEMarker(MoE):
        """Holds no parameters; its presence makes DeepSpeed treat the model as an MoE model."""

        def __init__(self, num_experts: int, ep_size: int, group_name: str):
            nn.Module.__init__(self)  # deliberately not MoE.__init__: it would build its own experts
            self.num_experts, self.ep_size, self.expert_group_name = num_experts, ep_size, group_name
            self.num_local_experts = 0  # our experts are checkpointed by us, not by DeepSpeed

        def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
            pass  # groups are registered by register_groups()

        def forward(self, *args, **kwargs):
            raise RuntimeError("DeepSpeedMoEMarker is a marker, not a layer")

    return DeepSpeedMoEMarker


def register_groups(pg: ProcessGroups, name: str) -> None:
    """Hands our EP/EDP groups to DeepSpeed under `name` (instead of letting it build its own).
    DeepSpeed offers no public call for this, so its module-level tables are written directly."""
    from deepspeed.utils import groups as ds_groups

    ds_groups._EXPERT_PARALLEL_GROUP[name] = pg.ep
    ds_groups._EXPERT_PARALLEL_GROUP_RANKS[name] = pg.layout.ep_group_of(pg.rank)
    ds_groups._EXPERT_DATA_PARALLEL_GROUP[name] = pg.edp
    ds_groups._EXPERT_DATA_PARALLEL_GROUP_RANKS[name] = pg.layout.edp_group_of(pg.rank)


def prepare_for_deepspeed(model: nn.Module, pg: ProcessGroups, num_experts: int) -> str:
    """Registers the groups, tags the expert parameters and adds the marker; returns the group name."""
    name = group_name(pg.layout.ep_size)
    register_groups(pg, name)
    for p in model.parameters():
        if is_expert_param(p):
            p.allreduce = False  # type: ignore[attr-defined]  # DeepSpeed reads these two attributes
            p.group_name = name  # type: ignore[attr-defined]
    model.add_module(DEEPSPEED_MARKER_PREFIX.rstrip("."), _marker_class()(num_experts, pg.layout.ep_size, name))
    return name
