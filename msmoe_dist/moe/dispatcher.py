"""Moving tokens to their experts and back, on one process.

Legend: T tokens, D model dim, E experts, K top-k, A = T*K assignments (flattened k-major,
a = k*T + t, so that a stable sort by expert orders each expert's rows first-choice first,
then by token: exactly the capacity priority), R routed (kept) rows, sorted by expert.

The steps are separate pure functions - sort/count, capacity, permute, unpermute - so that
the expert-parallel dispatcher can put its all-to-alls between them and reuse the rest.

`Dispatcher` is the seam between the MoE layer and token movement. The layer hands the dispatcher its
experts (`ExpertCompute`) and asks for the combined result (`exchange_and_compute`), so that a
dispatcher may interleave moving rows with computing them (the all-to-all one pipelines chunks with
``moe.overlap_chunks`` > 1); `run_blocking` is the plain sequence dispatch, experts, combine. Its two
implementations are `LocalDispatcher` (here: one process, the obviously correct reference) and the expert-parallel
`msmoe_dist.parallel.all_to_all.AllToAllDispatcher`, which parallelism swaps in after the model is
built (`msmoe_dist.parallel.expert_parallel.apply_expert_parallel`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar, runtime_checkable

import torch
from torch import Tensor

from msmoe_dist.moe.router import Routing


@dataclass(frozen=True)
class DispatchState:
    """Everything combine needs to undo dispatch; produced by dispatch, consumed by combine."""

    token_R: Tensor  # int64: the token each routed row came from
    weight_R: Tensor  # the row's combine weight (carries the router's gradient)
    num_tokens: int
    tokens_per_expert: tuple[int, ...]  # kept rows per expert (the experts' input split)
    routed_per_expert: tuple[int, ...]  # assignments per expert before capacity drops
    num_dropped: int
    kept_TK: Tensor | None  # bool [T, K]: which assignments survived capacity; None = all (dropless)


@dataclass(frozen=True)
class Combined:
    """What combine hands back to the layer."""

    out_TD: Tensor  # this rank's tokens: the weighted sum of their experts' rows (0 if all were dropped)
    home_rows_RD: Tensor  # the expert output of each of this rank's routed rows, in `home` order (for stats)
    home: DispatchState  # the local permutation of this rank's tokens


@dataclass(frozen=True)
class ExpertCompute:
    """The experts as a dispatcher runs them: ``fn(x_RD, rows per local expert) -> y_RD`` on rows that are
    contiguous per local expert, and the parameters ``fn`` reads (a dispatcher that runs the experts chunk
    by chunk differentiates each chunk against them itself)."""

    fn: Callable[[Tensor, Sequence[int]], Tensor]
    params: tuple[Tensor, ...]


StateT = TypeVar("StateT")


@runtime_checkable
class Dispatcher(Protocol[StateT]):
    """Moves routed token rows to the experts that own them and back.

    The layer calls ``capacity`` (once per forward), then ``exchange_and_compute``, which moves the rows,
    runs the experts and brings the rows home; the blocking form of that is ``dispatch``, the experts,
    ``combine`` (`run_blocking`). ``StateT`` is whatever dispatch must hand to combine (a frozen value).
    """

    num_local_experts: int  # experts whose rows dispatch returns: the layer holds exactly these

    def capacity(self, factor: float, num_tokens: int, top_k: int, device: torch.device) -> int | None:
        """Rows each expert keeps for this forward, or None (dropless) when factor <= 0. The one owner of
        capacity: an expert-parallel dispatcher agrees on it across its group (a collective)."""
        ...

    def dispatch(self, x_TD: Tensor, routing: Routing, capacity: int | None) -> tuple[Tensor, list[int], StateT]:
        """(x_RD rows for the local experts, contiguous per local expert; rows per local expert; state).
        ``capacity`` must come from ``self.capacity`` for the same forward."""
        ...

    def combine(self, y_RD: Tensor, state: StateT) -> Combined:
        """The experts' output rows (same layout as dispatch's x_RD) back to this rank's tokens."""
        ...

    def exchange_and_compute(
        self, x_TD: Tensor, routing: Routing, capacity: int | None, experts: ExpertCompute, overlap_chunks: int = 1
    ) -> Combined:
        """dispatch, ``experts.fn``, combine, in one call. ``overlap_chunks`` > 1 lets a dispatcher that
        communicates overlap that with the experts' work (same result to float rounding); one that does
        not communicate ignores it."""
        ...


def run_blocking(
    dispatcher: Dispatcher, x_TD: Tensor, routing: Routing, capacity: int | None, experts: ExpertCompute
) -> Combined:
    """``exchange_and_compute`` without overlap: dispatch, the experts on the rows, combine."""
    x_RD, tokens_per_expert, state = dispatcher.dispatch(x_TD, routing, capacity)
    return dispatcher.combine(experts.fn(x_RD, tokens_per_expert), state)


def sort_by_expert(experts_TK: Tensor, num_experts: int) -> tuple[Tensor, Tensor, Tensor]:
    """Stable sort of the k-major assignments by expert.

    Returns (assignment_A: the k-major assignment index of each sorted slot, experts_A: the
    expert of each sorted slot, counts_E: assignments per expert).
    """
    experts_A = experts_TK.t().reshape(-1)
    sorted_experts_A, assignment_A = torch.sort(experts_A, stable=True)
    counts_E = torch.bincount(experts_A, minlength=num_experts)
    return assignment_A, sorted_experts_A, counts_E


def capacity_keep(sorted_experts_A: Tensor, counts_E: Tensor, capacity: int) -> Tensor:
    """Bool mask over sorted slots: a slot survives if it is among its expert's first `capacity`."""
    starts_E = torch.cumsum(counts_E, 0) - counts_E
    rank_A = torch.arange(sorted_experts_A.numel(), device=sorted_experts_A.device) - starts_E[sorted_experts_A]
    return rank_A < capacity


def permute(x_TD: Tensor, token_R: Tensor) -> Tensor:
    """Gather each routed row's token: [T, D] -> [R, D], grouped by expert."""
    return x_TD.index_select(0, token_R)


class _WeightedUnpermute(torch.autograd.Function):
    """y_TD[t] = sum over rows r of token t of weight_R[r] * y_RD[r].

    One node instead of mul + index_add so that the backward gathers grad_out once and
    scales it in place, and the weight gradient is a row-wise dot with no [R, D] temporary.
    """

    @staticmethod
    def forward(ctx, y_RD, weight_R, token_R, num_tokens):
        out_TD = y_RD.new_zeros(num_tokens, y_RD.shape[1])
        out_TD.index_add_(0, token_R, y_RD * weight_R.unsqueeze(1))
        ctx.save_for_backward(y_RD, weight_R, token_R)
        return out_TD

    @staticmethod
    def backward(ctx, grad_TD):
        y_RD, weight_R, token_R = ctx.saved_tensors
        need_y, need_w = ctx.needs_input_grad[:2]
        g_RD = grad_TD.index_select(0, token_R)
        grad_w = None
        if need_w:
            grad_w = torch.bmm(g_RD.unsqueeze(1), y_RD.unsqueeze(2)).view(-1).to(weight_R.dtype)
        grad_y = g_RD.mul_(weight_R.unsqueeze(1)) if need_y else None
        return grad_y, grad_w, None, None


def unpermute(y_RD: Tensor, token_R: Tensor, weight_R: Tensor, num_tokens: int) -> Tensor:
    """Weighted scatter-add of routed rows back to their tokens; untouched tokens stay zero."""
    weight_R = weight_R.to(torch.promote_types(y_RD.dtype, weight_R.dtype))
    if y_RD.dtype != weight_R.dtype:
        y_RD = y_RD.to(weight_R.dtype)
    return _WeightedUnpermute.apply(y_RD, weight_R, token_R, num_tokens)


def expert_capacity(capacity_factor: float, num_tokens: int, top_k: int, num_experts: int) -> int | None:
    """ceil(capacity_factor * T * K / E), or None (dropless) when capacity_factor is 0."""
    if capacity_factor <= 0:
        return None
    # The rounding keeps float noise (1.1 * 10 = 11.000000000000002) from adding a slot.
    return max(1, math.ceil(round(capacity_factor * num_tokens * top_k / num_experts, 9)))


class LocalDispatcher:
    """Dispatch for a single process (no expert parallelism, no process group needed): a Dispatcher."""

    def __init__(self, num_experts: int):
        self.num_experts = num_experts
        self.num_local_experts = num_experts

    def capacity(self, factor: float, num_tokens: int, top_k: int, device: torch.device) -> int | None:
        return expert_capacity(factor, num_tokens, top_k, self.num_experts)

    def dispatch(self, x_TD: Tensor, routing: Routing, capacity: int | None) -> tuple[Tensor, list[int], DispatchState]:
        T, K = routing.experts_TK.shape
        assignment_A, sorted_experts_A, counts_E = sort_by_expert(routing.experts_TK, self.num_experts)
        routed = tuple(counts_E.tolist())  # device-to-host sync: the experts' row splits are host integers
        kept_TK = None
        if capacity is not None and max(routed, default=0) > capacity:
            keep_A = capacity_keep(sorted_experts_A, counts_E, capacity)
            kept_flat = torch.zeros(T * K, dtype=torch.bool, device=keep_A.device)
            kept_flat[assignment_A] = keep_A
            kept_TK = kept_flat.view(K, T).t()
            kept = tuple(min(n, capacity) for n in routed)
            # The kept slots in order; their number is known on the host, so unlike a boolean mask this
            # does not wait for the device to learn the output size.
            assignment_A = assignment_A[torch.nonzero_static(keep_A, size=sum(kept)).squeeze(1)]
        else:
            kept = routed
        token_R = assignment_A % T
        weight_R = routing.weights_TK.t().reshape(-1)[assignment_A]
        state = DispatchState(
            token_R=token_R,
            weight_R=weight_R,
            num_tokens=T,
            tokens_per_expert=kept,
            routed_per_expert=routed,
            num_dropped=sum(routed) - sum(kept),
            kept_TK=kept_TK,
        )
        return permute(x_TD, token_R), list(kept), state

    def combine(self, y_RD: Tensor, state: DispatchState) -> Combined:
        return Combined(unpermute(y_RD, state.token_R, state.weight_R, state.num_tokens), y_RD, state)

    def exchange_and_compute(
        self, x_TD: Tensor, routing: Routing, capacity: int | None, experts: ExpertCompute, overlap_chunks: int = 1
    ) -> Combined:
        """One process moves no rows over a network: nothing to overlap, so ``overlap_chunks`` is not used."""
        return run_blocking(self, x_TD, routing, capacity, experts)
