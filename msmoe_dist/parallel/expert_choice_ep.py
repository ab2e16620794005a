"""Expert-choice routing under expert parallelism: a `Dispatcher` (msmoe_dist.moe.dispatcher).

Legend: T tokens on this rank, G tokens of the EP group (sum of every rank's T), E experts,
P ranks of the EP group, L = E / P local experts, C picks per expert, D model dim.

Each expert must pick exactly what it would pick on one process holding the group's G tokens
(msmoe_dist.moe.expert_choice), so the choice needs every token's scores:
  1. all-gather the ranks' token counts and their (detached, fp32) scores [T, E] over the EP group
     (padded to the largest T); every rank then makes the SAME choice token_EC over the G tokens
     (a stable sort: deterministic from identical inputs), so nothing else has to be agreed;
  2. from token_EC each rank knows, without a counts exchange, which of its own tokens go to which
     expert (send) and how many rows each rank sends to each of its local experts (receive);
  3. the rows travel by the same autograd all-to-all as top-k routing (parallel/all_to_all.py), are
     regrouped by local expert, and come back the same way; the weighted unpermute happens on the home
     rank with the token's own score for that expert, so the router's gradient stays local.
Capacity C is computed from G (an all-reduce of T in `capacity`). Every collective goes through
`parallel.comm`. Device-to-host syncs per layer: the capacity, the gathered counts, and the send/recv
counts of the choice.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from msmoe_dist.moe.dispatcher import Combined, ExpertCompute, permute, run_blocking, unpermute
from msmoe_dist.moe.expert_choice import ExpertChoiceState, choose_tokens, picks_per_expert, unpicked_count
from msmoe_dist.moe.router import Routing
from msmoe_dist.parallel import comm as collective
from msmoe_dist.parallel.all_to_all import AllToAllDispatcher, all_to_all
from msmoe_dist.parallel.comm_stats import CommStats

GROUP_TOKENS = "all_reduce (expert choice: tokens of the EP group)"
COUNTS = "all_gather (expert choice: tokens per rank)"
SCORES = "all_gather (expert choice: router scores of the EP group)"


@dataclass(frozen=True)
class ExpertChoiceEPState:
    home: ExpertChoiceState  # this rank's picked rows, sorted by global expert
    send_splits: list[int]
    recv_splits: list[int]
    regroup_R: Tensor  # received order (source rank, local expert) -> local expert, source rank


class ExpertChoiceAllToAll:
    """The expert-parallel expert-choice Dispatcher: this rank holds experts ep_rank*L .. (ep_rank+1)*L - 1."""

    def __init__(self, num_experts: int, ep_group, ep_size: int, ep_rank: int, comm: CommStats | None = None):
        if num_experts % ep_size:
            raise ValueError(f"num_experts={num_experts} must be divisible by ep_size={ep_size}")
        self.num_experts, self.ep_size, self.ep_rank = num_experts, ep_size, ep_rank
        self.num_local_experts = num_experts // ep_size
        self.group, self.comm = ep_group, comm

    def capacity(self, factor: float, num_tokens: int, top_k: int, device: torch.device) -> int:
        """C from the group's token count G (the single-process run over the group's tokens has G)."""
        t = torch.tensor([num_tokens], dtype=torch.long, device=device)
        group_tokens = int(collective.all_reduce(t, group=self.group, name=GROUP_TOKENS, stats=self.comm)[0])
        return picks_per_expert(factor, group_tokens, top_k, self.num_experts)

    def _gather_scores(self, probs_TE: Tensor) -> tuple[Tensor, list[int]]:
        """(probs_GE of the whole group in rank order, each rank's token count)."""
        T, E = probs_TE.shape
        mine = torch.tensor([T], dtype=torch.long, device=probs_TE.device)
        counts = [int(c[0]) for c in collective.all_gather(mine, group=self.group, name=COUNTS, stats=self.comm)]
        padded = probs_TE.detach().new_zeros(max(counts), E)
        padded[:T] = probs_TE.detach()
        parts = collective.all_gather(padded, group=self.group, name=SCORES, stats=self.comm)
        return torch.cat([p[:n] for p, n in zip(parts, counts, strict=True)]), counts

    def dispatch(
        self, x_TD: Tensor, routing: Routing, capacity: int | None
    ) -> tuple[Tensor, list[int], ExpertChoiceEPState]:
        P, L, E = self.ep_size, self.num_local_experts, self.num_experts
        T = x_TD.shape[0]
        probs_GE, counts = self._gather_scores(routing.probs_TE)
        G = probs_GE.shape[0]
        C = min(int(capacity or 0), G)
        token_EC = choose_tokens(probs_GE, C)  # the same on every rank of the group
        starts = torch.tensor([0, *counts], device=token_EC.device).cumsum(0)
        owner_EC = torch.bucketize(token_EC, starts[1:], right=True)  # the rank that holds each picked token
        mine_EC = owner_EC == self.ep_rank
        # recv_PL[p, l]: rows rank p sends to this rank's local expert l; send_E[e]: rows this rank sends to e.
        local_owner_LC = owner_EC[self.ep_rank * L : (self.ep_rank + 1) * L]
        recv_PL = (local_owner_LC.unsqueeze(0) == torch.arange(P, device=token_EC.device).view(P, 1, 1)).sum(2)
        send_E = mine_EC.sum(1)
        host = torch.cat([send_E, recv_PL.reshape(-1)]).cpu()  # one device-to-host sync for both
        send_counts, host_PL = host[:E].tolist(), host[E:].view(P, L)
        # This rank's picked rows, sorted by global expert (= destination rank, then its local expert),
        # each expert's picks in its choice order.
        expert_R, pick_R = mine_EC.nonzero(as_tuple=True)
        token_R = token_EC[expert_R, pick_R] - starts[self.ep_rank]
        weight_R = routing.probs_TE[token_R, expert_R].to(routing.weights_TK.dtype)
        home = ExpertChoiceState(
            token_R=token_R,
            weight_R=weight_R,
            num_tokens=T,
            tokens_per_expert=tuple(send_counts),
            routed_per_expert=tuple(send_counts),
            num_dropped=0,
            kept_TK=None,
            unpicked_t=unpicked_count(token_R, T),
        )
        send = host[:E].view(P, L).sum(1).tolist()
        recv = host_PL.sum(1).tolist()
        x_recv = all_to_all(permute(x_TD, token_R), recv, send, self.group, self.comm)
        regroup = AllToAllDispatcher._regroup_index(recv_PL, sum(recv))
        state = ExpertChoiceEPState(home, send, recv, regroup)
        return x_recv.index_select(0, regroup), host_PL.sum(0).tolist(), state

    def combine(self, y_RD: Tensor, state: ExpertChoiceEPState) -> Combined:
        """Every row back to its home rank, then the weighted unpermute there."""
        inverse = torch.empty_like(state.regroup_R)
        inverse[state.regroup_R] = torch.arange(state.regroup_R.numel(), device=inverse.device)
        y_back = all_to_all(y_RD.index_select(0, inverse), state.send_splits, state.recv_splits, self.group, self.comm)
        h = state.home
        return Combined(unpermute(y_back, h.token_R, h.weight_R, h.num_tokens), y_back, h)

    def exchange_and_compute(
        self, x_TD: Tensor, routing: Routing, capacity: int | None, experts: ExpertCompute, overlap_chunks: int = 1
    ) -> Combined:
        """dispatch, the experts, combine: expert choice does not pipeline (moe.overlap_chunks must be 1)."""
        return run_blocking(self, x_TD, routing, capacity, experts)
