"""Rank layout of expert parallelism for several world sizes (pure arithmetic, no processes)."""

import pytest
import torch

from msmoe_dist.parallel import LayoutError, ParallelLayout, join_expert_shards, shard_expert_state


def test_worked_16_rank_example():
    lay = ParallelLayout(16, 4)
    assert lay.ep_groups() == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]
    assert lay.edp_groups() == [[0, 4, 8, 12], [1, 5, 9, 13], [2, 6, 10, 14], [3, 7, 11, 15]]
    assert (lay.ep_rank(6), lay.edp_rank(6)) == (2, 1)
    assert list(lay.local_experts(6, 32)) == list(range(16, 24))
    assert lay.ep_group_of(6) == [4, 5, 6, 7] and lay.edp_group_of(6) == [2, 6, 10, 14]


@pytest.mark.parametrize("world,ep", [(1, 1), (2, 1), (2, 2), (4, 2), (4, 4), (8, 2), (8, 8), (12, 3), (16, 16)])
def test_groups_partition_ranks_and_experts(world, ep):
    lay = ParallelLayout(world, ep)
    for groups, size in ((lay.ep_groups(), ep), (lay.edp_groups(), world // ep)):
        flat = sorted(r for g in groups for r in g)
        assert flat == list(range(world)) and all(len(g) == size for g in groups)
    E = 4 * ep
    for rank in range(world):
        assert rank in lay.ep_group_of(rank) and rank in lay.edp_group_of(rank)
        # every EP group holds every expert exactly once
        experts = sorted(e for r in lay.ep_group_of(rank) for e in lay.local_experts(r, E))
        assert experts == list(range(E))
        # an EDP group holds one set of experts, replicated
        assert {tuple(lay.local_experts(r, E)) for r in lay.edp_group_of(rank)} == {tuple(lay.local_experts(rank, E))}


def test_bad_degrees_are_refused():
    with pytest.raises(
        LayoutError, match=r"parallel.ep_size=3 must divide the world size 4 \(expected one of 1, 2, 4\)"
    ):
        ParallelLayout(4, 3)
    with pytest.raises(LayoutError, match="moe.num_experts=6 must be divisible by parallel.ep_size=4"):
        ParallelLayout(4, 4).check_experts(6)


def test_shard_and_join_round_trip():
    full = {"blocks.0.moe.experts.w1": torch.arange(8 * 3.0).view(8, 3), "blocks.0.attn.qkv.weight": torch.ones(2)}
    shards = [shard_expert_state(full, r, 4) for r in range(4)]
    assert torch.equal(shards[2]["blocks.0.moe.experts.w1"], full["blocks.0.moe.experts.w1"][4:6])
    back = join_expert_shards(shards)
    assert all(torch.equal(back[k], full[k]) for k in full)
