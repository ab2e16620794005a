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

Every collective is named (its failure says which) and, when the dispatcher was given a `CommStats`,
measured under that name.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from msmoe_dist.moe.dispatcher import Combined, DispatchState, LocalDispatcher, expert_capacity, unpermute
from msmoe_dist.moe.router import Routing
from msmoe_dist.parallel.collectives import named_collective
from msmoe_dist.parallel.comm_stats import CommStats

# The collectives' names: in error messages and as CommStats keys.
TOKENS_FORWARD = "all_to_all (MoE token exchange, forward)"
TOKENS_BACKWARD = "all_to_all (MoE token exchange, backward)"
COUNTS = "all_to_all (MoE token counts)"
CAPACITY = "all_reduce (MoE capacity)"


@contextmanager
def _collective(name: str, comm: CommStats | None, nbytes: int):
    """A named collective (its failure names it), timed into `comm` when one is given."""
    with named_collective(name), comm.timed(name, nbytes) if comm is not None else nullcontext():
        yield


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with autograd: the backward is the reverse all-to-all."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group, comm):
        ctx.group, ctx.out_splits, ctx.in_splits, ctx.comm = group, out_splits, in_splits, comm
        out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
        with _collective(TOKENS_FORWARD, comm, _nbytes(x)):
            dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        back = grad.new_empty((sum(ctx.in_splits),) + tuple(grad.shape[1:]))
        with _collective(TOKENS_BACKWARD, ctx.comm, _nbytes(grad)):
            dist.all_to_all_single(back, grad.contiguous(), ctx.in_splits, ctx.out_splits, group=ctx.group)
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
    def _regroup_index(self, counts_PL: Tensor) -> Tensor:
        """Index that reorders rows from (source rank, local expert) to (local expert, source rank)."""
        P, L = counts_PL.shape
        starts_PL = (torch.cumsum(counts_PL.reshape(-1), 0) - counts_PL.reshape(-1)).view(P, L)
        pieces = [
            torch.arange(int(starts_PL[p, e]), int(starts_PL[p, e] + counts_PL[p, e]))
            for e in range(L)
            for p in range(P)
        ]
        return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)

    # ---- communication ----------------------------------------------------------------------
    def _exchange_counts(self, counts_E: Tensor, device: torch.device) -> Tensor:
        """counts_E[e]: rows this rank sends to expert e. Returns counts_PL[p, l] (on the host): rows from
        rank p for local expert l. This is a device-to-host sync: the splits must be known on the host.
        The exchange runs on the data's device (NCCL takes only CUDA tensors)."""
        send = counts_E.to(device)
        recv = torch.empty_like(send)
        with _collective(COUNTS, self.comm, _nbytes(send)):
            dist.all_to_all_single(recv, send, group=self.group)
        return recv.cpu().view(self.ep_size, self.num_local_experts)

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
        with _collective(CAPACITY, self.comm, _nbytes(t)):
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return int(t[0])  # device-to-host sync

    def dispatch(
        self, x_TD: Tensor, routing: Routing, capacity: int | None
    ) -> tuple[Tensor, list[int], EPDispatchState]:
        x_home_RD, kept_E, home = self._local.dispatch(x_TD, routing, capacity)
        P, L = self.ep_size, self.num_local_experts
        if capacity is None:
            counts_E = torch.tensor(kept_E, dtype=torch.long)
            counts_PL = self._exchange_counts(counts_E, x_TD.device)
            send = counts_E.view(P, L).sum(1).tolist()
            recv = counts_PL.sum(1).tolist()
            x_recv = self._send(x_home_RD, recv, send)
            regroup = self._regroup_index(counts_PL).to(x_TD.device)
            tokens_per_local = counts_PL.sum(0).tolist()
            state = EPDispatchState(home, send, recv, regroup, None)
            return x_recv.index_select(0, regroup), tokens_per_local, state
        # Capacity mode: fixed C rows per (rank, expert); scatter the kept rows into the padded slots.
        C = capacity
        counts_E = torch.tensor(kept_E, dtype=torch.long, device=x_TD.device)
        starts_E = torch.cumsum(counts_E, 0) - counts_E
        # output_size: the row count is known on the host, so repeat_interleave need not sync to learn it.
        expert_R = torch.repeat_interleave(
            torch.arange(self.num_experts, device=x_TD.device), counts_E, output_size=x_home_RD.shape[0]
        )
        slot_R = expert_R * C + (torch.arange(expert_R.numel(), device=x_TD.device) - starts_E[expert_R])
        padded = x_home_RD.new_zeros(self.num_experts * C, x_home_RD.shape[1]).index_copy(0, slot_R, x_home_RD)
        split = [L * C] * P
        x_recv = self._send(padded, split, split)  # [P, L, C, D] flattened
        regroup = torch.arange(P * L * C, device=x_TD.device).view(P, L, C).transpose(0, 1).reshape(-1)
        state = EPDispatchState(home, split, split, regroup, slot_R)
        return x_recv.index_select(0, regroup), [P * C] * L, state

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
