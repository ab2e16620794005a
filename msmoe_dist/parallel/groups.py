"""Process groups, built once from the layout and passed explicitly to whoever needs them.

Model code never looks a group up globally: the MoE layers receive their expert-parallel group
through the dispatcher, and the gradient reduction receives the data-parallel and
expert-data-parallel groups from the `ProcessGroups` bundle.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

import torch.distributed as dist

from msmoe_dist.parallel.layout import ParallelLayout


@dataclass(frozen=True)
class ProcessGroups:
    layout: ParallelLayout
    rank: int
    dp: dist.ProcessGroup | None  # all ranks (dense gradients); None: the default group
    ep: dist.ProcessGroup | None  # this rank's expert-parallel group (all-to-all)
    edp: dist.ProcessGroup | None  # this rank's expert-data-parallel group (expert gradients)

    @property
    def ep_rank(self) -> int:
        return self.layout.ep_rank(self.rank)

    @property
    def edp_rank(self) -> int:
        return self.layout.edp_rank(self.rank)


def build_process_groups(layout: ParallelLayout, rank: int, timeout_s: float = 300.0) -> ProcessGroups:
    """Creates every EP and EDP group (all ranks must call this, in the same order).

    The timeout is passed explicitly: torch's new_group does not inherit the default group's
    timeout but falls back to the backend default (30 minutes), which would let a hung peer
    stall an all-to-all for half an hour.
    """
    timeout = datetime.timedelta(seconds=timeout_s)
    ep_mine = edp_mine = None
    for ranks in layout.ep_groups():
        g = dist.new_group(ranks, timeout=timeout)
        if rank in ranks:
            assert isinstance(g, dist.ProcessGroup)  # a member gets the group; others a sentinel
            ep_mine = g
    for ranks in layout.edp_groups():
        g = dist.new_group(ranks, timeout=timeout)
        if rank in ranks:
            assert isinstance(g, dist.ProcessGroup)
            edp_mine = g
    return ProcessGroups(layout=layout, rank=rank, dp=dist.group.WORLD, ep=ep_mine, edp=edp_mine)
