"""Rank layout for expert parallelism, carved out of data parallelism (DeepSpeed's layout).

Every rank holds a full replica of the dense parameters, so dense gradients are averaged over
all ranks (the data-parallel group, DP). Experts are sharded: an expert-parallel group (EP) of
`ep_size` consecutive ranks holds all E experts between them, E/ep_size each, and tokens move
inside it by all-to-all. Ranks at the same position of different EP groups hold the same
experts; they form an expert-data-parallel group (EDP) over which those experts' gradients are
averaged. Different experts are never averaged together.

Worked example: 16 ranks, ep_size 4, 32 experts (8 per rank).
    DP   group:  [0 .. 15]
    EP   groups: [0 1 2 3] [4 5 6 7] [8 9 10 11] [12 13 14 15]       (consecutive ranks)
    EDP  groups: [0 4 8 12] [1 5 9 13] [2 6 10 14] [3 7 11 15]        (stride ep_size)
    rank 6: ep_rank 2 (in EP group [4..7]), edp_rank 1; holds experts 16..23, the same experts
    as ranks 2, 10 and 14, with which it averages their gradients.
"""

from __future__ import annotations

from dataclasses import dataclass

from msmoe_dist.errors import UserError


class LayoutError(UserError):
    """Degrees that do not fit together (one-line message)."""


@dataclass(frozen=True)
class ParallelLayout:
    world_size: int
    ep_size: int

    def __post_init__(self):
        if self.world_size < 1:
            raise LayoutError(f"world size must be >= 1, got {self.world_size}")
        if self.ep_size < 1 or self.world_size % self.ep_size:
            divisors = [d for d in range(1, self.world_size + 1) if self.world_size % d == 0]
            raise LayoutError(
                f"parallel.ep_size={self.ep_size} must divide the world size {self.world_size} "
                f"(expected one of {', '.join(map(str, divisors))})"
            )

    @property
    def edp_size(self) -> int:
        """Replicas of each expert = number of EP groups."""
        return self.world_size // self.ep_size

    def ep_rank(self, rank: int) -> int:
        return rank % self.ep_size

    def edp_rank(self, rank: int) -> int:
        return rank // self.ep_size

    def ep_groups(self) -> list[list[int]]:
        return [list(range(g * self.ep_size, (g + 1) * self.ep_size)) for g in range(self.edp_size)]

    def edp_groups(self) -> list[list[int]]:
        return [list(range(i, self.world_size, self.ep_size)) for i in range(self.ep_size)]

    def ep_group_of(self, rank: int) -> list[int]:
        return self.ep_groups()[self.edp_rank(rank)]

    def edp_group_of(self, rank: int) -> list[int]:
        return self.edp_groups()[self.ep_rank(rank)]

    def check_experts(self, num_experts: int) -> int:
        """Experts per rank; refuses counts that do not split evenly."""
        if num_experts % self.ep_size:
            raise LayoutError(f"moe.num_experts={num_experts} must be divisible by parallel.ep_size={self.ep_size}")
        return num_experts // self.ep_size

    def local_experts(self, rank: int, num_experts: int) -> range:
        """Global indices of the experts that `rank` holds."""
        per = self.check_experts(num_experts)
        first = self.ep_rank(rank) * per
        return range(first, first + per)
