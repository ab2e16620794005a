"""Expert-parallel token dispatch by all-to-all: a `Dispatcher` (msmoe_dist.moe.dispatcher) like LocalDispatcher.

Legend: T tokens on this rank, D model dim, E experts in total, L = E / P local experts,
P ranks in the expert-parallel (EP) group, C capacity per (source rank, expert).

dispatch:  sort/count locally  ->  all-to-all the counts  ->  all-to-all the rows  ->  regroup
           received rows by local expert.       combine: the reverse, then the weighted unpermute.
The combine all-to-all brings every token's SMoE output back to its home rank; the momentum
update happens there, outside the MoE layer, so momentum adds no communication.

Row layouts (dropless):
  sent    [R_home, D]  sorted by global expert = by destination rank, then its local expert
  recv    [R_recv, D]  by source rank, then local expert       (what all_to_all_single yields)
  experts [R_recv, D]  by local expert, then source rank       (contiguous per local expert)
Capacity mode pads every (source rank, expert) slot to exactly C rows, so both all-to-alls have
fixed, equal splits and no counts need to be exchanged; padded rows are zeros and are dropped
again on the way home. C itself is agreed first, by an all-reduce (max) over the EP group in `capacity`.

With ``moe.overlap_chunks`` = n > 1, `exchange_and_compute` pipelines both exchanges with the experts in
n chunks, forward and backward (parallel/overlap.py); n = 1 is the blocking sequence above.

Every collective goes through `parallel.comm`: placed on the group's device, named (its failure says
which) and, when the dispatcher was given a `CommStats`, measured under that name.

Device-to-host syncs (docs/parallel.md lists those of a whole step): dropless, exactly one per layer,
reading the exchanged counts (the row splits of the all-to-alls must be host integers); capacity mode,
the capacity agreement (C shapes the buffers) and, as in LocalDispatcher, the routed counts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from msmoe_dist.moe.dispatcher import (
    Combined,
    DispatchState,
    ExpertCompute,
    LocalDispatcher,
    expert_capacity,
    permute,
    run_blocking,
    sort_by_expert,
    unpermute,
)
from msmoe_dist.moe.router import Routing
from msmoe_dist.parallel import comm as collective
from msmoe_dist.parallel.comm_stats import CommStats
from msmoe_dist.parallel.overlap import pipelined_exchange, regroup_index

# The collectives' names: in error messages and as CommStats keys.
TOKENS_FORWARD = "all_to_all (MoE token exchange, forward)"
TOKENS_BACKWARD = "all_to_all (MoE token exchange, backward)"
COUNTS = "all_to_all (MoE token counts)"
CAPACITY = "all_reduce (MoE capacity)"


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with autograd: the backward is the reverse all-to-all."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group, comm):
        ctx.group, ctx.out_splits, ctx.in_splits, ctx.comm = group, out_splits, in_splits, comm
        return collective.all_to_all_single(x, out_splits, in_splits, group=group, name=TOKENS_FORWARD, stats=comm)

    @staticmethod
    def backward(ctx, grad):
        back = collective.all_to_all_single(
            grad, ctx.in_splits, ctx.out_splits, group=ctx.group, name=TOKENS_BACKWARD, stats=ctx.comm
        )
        return back, None, None, None, None


def all_to_all(x: Tensor, out_splits: list[int], in_splits: list[int], group, comm: CommStats | None = None) -> Tensor:
    return _AllToAll.apply(x, out_splits, in_splits, group, comm)


@dataclass(frozen=True)
class EPDispatchState:
    home: DispatchState  # the local permutation of this rank's tokens (as in LocalDispatcher)
    send_splits: list[int]  # rows this rank sends to each EP rank
    recv_splits: list[int]  # rows this rank receives from each EP rank
    regroup_R: Tensor  # recv order -> expert order
    pad_keep: Tensor | None  # capacity mode: which padded slots hold real rows (home side)


class AllToAllDispatcher:
    """The expert-parallel Dispatcher: this rank holds experts ep_rank*L .. (ep_rank+1)*L - 1."""

    def __init__(self, num_experts: int, ep_group, ep_size: int, ep_rank: int, comm: CommStats | None = None):
        if num_experts % ep_size:
            raise ValueError(f"num_experts={num_experts} must be divisible by ep_size={ep_size}")
        self.num_experts, self.ep_size, self.ep_rank = num_experts, ep_size, ep_rank
        self.num_local_experts = num_experts // ep_size
        self.group = ep_group
        self.comm = comm  # None: the collectives are not measured
        self._local = LocalDispatcher(num_experts)

    # ---- local work (no communication) ------------------------------------------------------
    # Index that reorders rows from (source rank, local expert) to (local expert, source rank).
    _regroup_index = staticmethod(regroup_index)

    def _pad(self, x_home_RD: Tensor, kept_E: list[int], capacity: int) -> tuple[Tensor, Tensor]:
        """Capacity mode: the kept rows scattered into fixed C-row slots per expert ([E * C, D], zeros
        elsewhere), and each row's slot."""
        C, device = capacity, x_home_RD.device
        counts_E = torch.tensor(kept_E, dtype=torch.long, device=device)
        starts_E = torch.cumsum(counts_E, 0) - counts_E
        # output_size: the row count is known on the host, so repeat_interleave need not sync to learn it.
        expert_R = torch.repeat_interleave(
            torch.arange(self.num_experts, device=device), counts_E, output_size=x_home_RD.shape[0]
        )
        slot_R = expert_R * C + (torch.arange(expert_R.numel(), device=device) - starts_E[expert_R])
        padded = x_home_RD.new_zeros(self.num_experts * C, x_home_RD.shape[1]).index_copy(0, slot_R, x_home_RD)
        return padded, slot_R

    # ---- communication ----------------------------------------------------------------------
    def _exchange_counts(self, counts_E: Tensor) -> Tensor:
        """counts_E[e] (on the data's device): rows this rank sends to expert e. Returns recv_PL[p, l], on
        the same device: rows rank p sends to this rank's local expert l. No sync: the caller reads both
        at once."""
        recv = collective.all_to_all_single(counts_E, group=self.group, name=COUNTS, stats=self.comm)
        return recv.view(self.ep_size, self.num_local_experts)

    def _send(self, x: Tensor, out_splits: list[int], in_splits: list[int]) -> Tensor:
        return all_to_all(x, out_splits, in_splits, self.group, self.comm)

    # ---- the Dispatcher interface -----------------------------------------------------------
    def capacity(self, factor: float, num_tokens: int, top_k: int, device: torch.device) -> int | None:
        """The largest capacity in the EP group. Ranks may hold different token counts (a short last
        evaluation batch, a training batch that lost an unreadable image); the fixed-size exchange
        needs one C everywhere, and the largest drops no token that its own rank would keep."""
        capacity = expert_capacity(factor, num_tokens, top_k, self.num_experts)
        if capacity is None:  # the factor is the same config value on every rank: all skip the collective
            return None
        t = torch.tensor([capacity], dtype=torch.long, device=device)
        t = collective.all_reduce(t, op="max", group=self.group, name=CAPACITY, stats=self.comm)
        return int(t[0])  # device-to-host sync: C shapes the buffers of both all-to-alls

    def dispatch(
        self, x_TD: Tensor, routing: Routing, capacity: int | None
    ) -> tuple[Tensor, list[int], EPDispatchState]:
        if capacity is None:
            return self._dispatch_dropless(x_TD, routing)
        # Capacity mode: fixed C rows per (rank, expert); scatter the kept rows into the padded slots.
        x_home_RD, kept_E, home = self._local.dispatch(x_TD, routing, capacity)
        P, L, C = self.ep_size, self.num_local_experts, capacity
        padded, slot_R = self._pad(x_home_RD, kept_E, C)
        split = [L * C] * P
        x_recv = self._send(padded, split, split)  # [P, L, C, D] flattened
        regroup = torch.arange(P * L * C, device=x_TD.device).view(P, L, C).transpose(0, 1).reshape(-1)
        state = EPDispatchState(home, split, split, regroup, slot_R)
        return x_recv.index_select(0, regroup), [P * C] * L, state

    def _dispatch_dropless(self, x_TD: Tensor, routing: Routing) -> tuple[Tensor, list[int], EPDispatchState]:
        """LocalDispatcher's permutation (no drops), with the counts exchanged before any reaches the host."""
        home, host, recv_PL = self._plan_dropless(routing)
        P, E = self.ep_size, self.num_experts
        host_PL = host[E:].view(P, self.num_local_experts)
        send = host[:E].view(P, -1).sum(1).tolist()
        recv = host_PL.sum(1).tolist()
        x_recv = self._send(permute(x_TD, home.token_R), recv, send)
        regroup = self._regroup_index(recv_PL, sum(recv))
        state = EPDispatchState(home, send, recv, regroup, None)
        return x_recv.index_select(0, regroup), host_PL.sum(0).tolist(), state

    def _plan_dropless(self, routing: Routing) -> tuple[DispatchState, Tensor, Tensor]:
        """(the home permutation; on the host: this rank's counts per expert, then recv_PL flattened;
        recv_PL[p, l] on the data's device: rows rank p sends to local expert l)."""
        T, E = routing.experts_TK.shape[0], self.num_experts
        assignment_A, _, counts_E = sort_by_expert(routing.experts_TK, E)
        recv_PL = self._exchange_counts(counts_E)
        # THE device-to-host sync of this layer: the all-to-all splits must be host integers. Our own
        # counts travel in the same copy, so the local sort costs no second sync.
        host = torch.cat([counts_E, recv_PL.reshape(-1)]).cpu()
        routed = tuple(host[:E].tolist())
        token_R = assignment_A % T
        home = DispatchState(
            token_R=token_R,
            weight_R=routing.weights_TK.t().reshape(-1)[assignment_A],
            num_tokens=T,
            tokens_per_expert=routed,
            routed_per_expert=routed,
            num_dropped=0,
            kept_TK=None,
        )
        return home, host, recv_PL

    def combine(self, y_RD: Tensor, state: EPDispatchState) -> Combined:
        """Sends every row back to its token's home rank, then the weighted unpermute there. The rows
        that came home (in `state.home` order) are returned too: statistics describe this rank's tokens."""
        inverse = torch.empty_like(state.regroup_R)
        inverse[state.regroup_R] = torch.arange(state.regroup_R.numel(), device=inverse.device)
        y_back = self._send(y_RD.index_select(0, inverse), state.send_splits, state.recv_splits)
        if state.pad_keep is not None:
            y_back = y_back.index_select(0, state.pad_keep)
        h = state.home
        return Combined(unpermute(y_back, h.token_R, h.weight_R, h.num_tokens), y_back, h)

    def exchange_and_compute(
        self, x_TD: Tensor, routing: Routing, capacity: int | None, experts: ExpertCompute, overlap_chunks: int = 1
    ) -> Combined:
        """dispatch, experts, combine. ``overlap_chunks`` = 1: exactly that, blocking. n > 1: the exchange
        pipelined with the experts in n chunks, forward and backward (parallel/overlap.py)."""
        if type(overlap_chunks) is not int or overlap_chunks < 1:
            raise ValueError(f"overlap_chunks must be an integer >= 1, got {overlap_chunks!r}")
        if overlap_chunks == 1:
            return run_blocking(self, x_TD, routing, capacity, experts)
        P, L = self.ep_size, self.num_local_experts
        if capacity is None:
            home, host, _ = self._plan_dropless(routing)
            send_PL = host[: self.num_experts].view(P, L).tolist()
            recv_PL = host[self.num_experts :].view(P, L).tolist()
            y_buf = pipelined_exchange(
                permute(x_TD, home.token_R), send_PL, recv_PL, overlap_chunks, experts, self.group, self.comm
            )
            y_back = y_buf
        else:
            x_home_RD, kept_E, home = self._local.dispatch(x_TD, routing, capacity)
            padded, slot_R = self._pad(x_home_RD, kept_E, capacity)
            full = [[capacity] * L for _ in range(P)]
            y_buf = pipelined_exchange(padded, full, full, overlap_chunks, experts, self.group, self.comm)
            y_back = y_buf.index_select(0, slot_R)
        return Combined(unpermute(y_back, home.token_R, home.weight_R, home.num_tokens), y_back, home)
