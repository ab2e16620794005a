"""Expert parallelism: rank layout, process groups, all-to-all dispatch, expert sharding."""

from msmoe_dist.parallel.all_to_all import AllToAllDispatcher, all_to_all  # noqa: F401
from msmoe_dist.parallel.comm_stats import CollectiveTotals, CommStats  # noqa: F401
from msmoe_dist.parallel.expert_parallel import apply_expert_parallel  # noqa: F401
from msmoe_dist.parallel.groups import (  # noqa: F401
    ProcessGroups,
    build_process_groups,
)
from msmoe_dist.parallel.layout import LayoutError, ParallelLayout  # noqa: F401
from msmoe_dist.parallel.sharding import is_expert_key, join_expert_shards, shard_expert_state  # noqa: F401
