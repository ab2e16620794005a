"""The expert-parallel exchange pipelined with the expert computation (``moe.overlap_chunks`` = n > 1).

Legend as in parallel/all_to_all.py: P ranks in the EP group, L local experts, D model dim.

The home rank's send buffer holds its rows in (destination rank p, p's local expert l, row) order,
``send_PL[p][l]`` rows per block; this rank receives ``recv_PL[p][l]`` rows from rank p for its local
expert l. Every block is cut into n pieces (sizes differ by at most one row; ``chunk_sizes``), and
chunk c is piece c of every block: a complete all-to-all with its own split sizes, which every rank
derives from the counts it already holds, so no extra count exchange is needed. Each chunk carries
rows of every expert, so the chunks' expert GEMMs are about equally large.

Forward, in the same program order on every rank (so NCCL, which runs a group's collectives in issue
order, and gloo agree):

    start send(0)
    for c in 0..n-1:  wait send(c); start send(c+1); experts(chunk c); start return(c)
    wait return(0..n-1); put the rows back in send-buffer order

so chunk c+1's exchange and chunk c-1's return are in flight while chunk c's experts compute. The
backward does the same with the gradients: the output gradient travels out chunk by chunk, each
chunk's expert backward (its own small autograd graph, recorded in the forward) runs while the next
chunk arrives, and the input gradient returns. Results equal the blocking exchange up to float
rounding: each row's expert output is computed alone either way, but the expert weight gradients are
summed chunk by chunk. Capacity mode hands in its padded buffer (C rows per block): the same pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from msmoe_dist.moe.dispatcher import ExpertCompute
from msmoe_dist.parallel import comm as collective
from msmoe_dist.parallel.comm_stats import CommStats

# The collectives' names (error messages, CommStats keys): one per chunk and direction.
CHUNK_FORWARD = "all_to_all (MoE token exchange, overlapped chunk, forward)"
CHUNK_BACKWARD = "all_to_all (MoE token exchange, overlapped chunk, backward)"


def chunk_sizes(rows: int, chunks: int) -> list[int]:
    """``rows`` cut into ``chunks`` pieces, the first ``rows % chunks`` one row larger (some may be 0)."""
    return [rows // chunks + (1 if c < rows % chunks else 0) for c in range(chunks)]


def regroup_index(counts_PL: Tensor, num_rows: int) -> Tensor:
    """Index that reorders rows from (source rank, local expert) to (local expert, source rank).

    On the counts' device, without a host loop: output row j lies in block b = (l, p) (l-major) and
    is row j - out_start[b] of that block, which starts at recv_start[p, l] in the received order.
    ``num_rows`` (the sum of the counts) is known on the host, so nothing here waits for the device."""
    P, L = counts_PL.shape
    flat = counts_PL.reshape(-1)
    starts_LP = (torch.cumsum(flat, 0) - flat).view(P, L).t().reshape(-1)
    counts_LP = counts_PL.t().reshape(-1)
    out_starts_LP = torch.cumsum(counts_LP, 0) - counts_LP
    block_R = torch.repeat_interleave(torch.arange(P * L, device=counts_PL.device), counts_LP, output_size=num_rows)
    return starts_LP[block_R] + torch.arange(num_rows, device=counts_PL.device) - out_starts_LP[block_R]


def _gather_index(starts: list[int], sizes: list[int], device: torch.device) -> Tensor:
    """Concatenation of arange(start, start + size) over the blocks, built on ``device`` in one go."""
    total = sum(sizes)
    sizes_t = torch.tensor(sizes, dtype=torch.long, device=device)
    starts_t = torch.tensor(starts, dtype=torch.long, device=device)
    block = torch.repeat_interleave(torch.arange(len(sizes), device=device), sizes_t, output_size=total)
    return starts_t[block] + torch.arange(total, device=device) - (torch.cumsum(sizes_t, 0) - sizes_t)[block]


@dataclass(frozen=True)
class ChunkPlan:
    send_splits: list[int]  # rows this rank sends each EP rank in this chunk
    recv_splits: list[int]  # rows it receives from each
    expert_rows: list[int]  # rows per local expert in this chunk, after the regroup
    regroup: Tensor  # received order (source, local expert) -> expert order (local expert, source)
    inverse: Tensor  # expert order -> received order (the way back)


@dataclass(frozen=True)
class PipelinePlan:
    order: Tensor  # send-buffer row of each chunk-major row: chunk c's rows are order[start_c : start_c + rows_c]
    chunks: list[ChunkPlan]

    @property
    def chunk_rows(self) -> list[int]:
        """Rows this rank sends (and gets back) per chunk."""
        return [sum(c.send_splits) for c in self.chunks]


def build_plan(send_PL: list[list[int]], recv_PL: list[list[int]], chunks: int, device: torch.device) -> PipelinePlan:
    """The chunks' splits and indices, from the host counts of the whole exchange (see the module docstring)."""
    P, L = len(send_PL), len(send_PL[0])
    send_pieces = [[chunk_sizes(n, chunks) for n in row] for row in send_PL]  # [p][l][c]
    recv_pieces = [[chunk_sizes(n, chunks) for n in row] for row in recv_PL]
    starts, sizes, start = [], [], 0
    block_start = []
    for p in range(P):
        for lc in range(L):
            block_start.append(start)
            start += send_PL[p][lc]
    plans = []
    for c in range(chunks):
        for p in range(P):
            for lc in range(L):
                starts.append(block_start[p * L + lc] + sum(send_pieces[p][lc][:c]))
                sizes.append(send_pieces[p][lc][c])
        counts_PL = [[recv_pieces[p][lc][c] for lc in range(L)] for p in range(P)]
        rows = sum(map(sum, counts_PL))
        regroup = regroup_index(torch.tensor(counts_PL, dtype=torch.long, device=device), rows)
        inverse = torch.empty_like(regroup)
        inverse[regroup] = torch.arange(rows, device=device)
        plans.append(
            ChunkPlan(
                send_splits=[sum(send_pieces[p][lc][c] for lc in range(L)) for p in range(P)],
                recv_splits=[sum(row) for row in counts_PL],
                expert_rows=[sum(counts_PL[p][lc] for p in range(P)) for lc in range(L)],
                regroup=regroup,
                inverse=inverse,
            )
        )
    return PipelinePlan(_gather_index(starts, sizes, device), plans)


@dataclass(frozen=True)
class _Exchange:
    group: object
    comm: CommStats | None

    def start(self, rows: Tensor, out_splits: list[int], in_splits: list[int], name: str):
        return collective.all_to_all_single_async(
            rows, out_splits, in_splits, group=self.group, name=name, stats=self.comm
        )


def _to_buffer(plan: PipelinePlan, pieces: list[Tensor]) -> Tensor:
    """Chunk-major rows back into send-buffer order."""
    rows = torch.cat(pieces)
    return rows.new_empty(rows.shape).index_copy_(0, plan.order, rows)


def _pipeline(
    x_buf: Tensor, plan: PipelinePlan, experts: ExpertCompute, ex: _Exchange, record: list | None, needs_x: bool
) -> Tensor:
    """The forward pipeline. ``record``: a list that receives each chunk's (expert input leaf, output) so that
    the backward can differentiate chunk by chunk; None = no graph (evaluation)."""
    x_chunked = x_buf.index_select(0, plan.order)
    offsets = [0]
    for n in plan.chunk_rows:
        offsets.append(offsets[-1] + n)
    chunks = plan.chunks

    def send(c: int):
        cp = chunks[c]
        return ex.start(x_chunked[offsets[c] : offsets[c + 1]], cp.recv_splits, cp.send_splits, CHUNK_FORWARD)

    pending, back = send(0), []
    for c, cp in enumerate(chunks):
        received = pending.wait()
        if c + 1 < len(chunks):
            pending = send(c + 1)
        x_c = received.index_select(0, cp.regroup)
        if record is None:
            y_c = experts.fn(x_c, cp.expert_rows)
        else:
            x_c = x_c.requires_grad_(needs_x)
            with torch.enable_grad():
                y_c = experts.fn(x_c, cp.expert_rows)
            record.append((x_c, y_c))
            y_c = y_c.detach()
        back.append(ex.start(y_c.index_select(0, cp.inverse), cp.send_splits, cp.recv_splits, CHUNK_FORWARD))
    return _to_buffer(plan, [b.wait() for b in back])


class _PipelinedExperts(torch.autograd.Function):
    """x_buf (send-buffer order) -> the experts' output rows, back home in the same order; see the module docstring.

    The expert parameters are inputs, so their gradients (summed over the chunks) flow to them as from any
    other node. Each chunk's expert graph is recorded in the forward and differentiated in the backward
    (``torch.autograd.grad``), so the backward of one chunk's experts runs while the next chunk's gradient
    is in flight."""

    @staticmethod
    def forward(ctx, x_buf, plan, experts, ex, *params):
        record: list = []
        y_buf = _pipeline(x_buf, plan, experts, ex, record, ctx.needs_input_grad[0])
        ctx.plan, ctx.ex, ctx.record = plan, ex, record
        ctx.param_needs = ctx.needs_input_grad[4:]
        ctx.params = params
        return y_buf

    @staticmethod
    def backward(ctx, g_buf):
        plan, ex, record = ctx.plan, ctx.ex, ctx.record
        needs_x = ctx.needs_input_grad[0]
        wanted = [p for p, need in zip(ctx.params, ctx.param_needs) if need]
        g_chunked = g_buf.contiguous().index_select(0, plan.order)
        offsets = [0]
        for n in plan.chunk_rows:
            offsets.append(offsets[-1] + n)
        chunks = plan.chunks

        def send(c: int):
            cp = chunks[c]
            return ex.start(g_chunked[offsets[c] : offsets[c + 1]], cp.recv_splits, cp.send_splits, CHUNK_BACKWARD)

        sums: list[Tensor | None] = [None] * len(wanted)
        pending, back = send(0), []
        for c, cp in enumerate(chunks):
            received = pending.wait()
            if c + 1 < len(chunks):
                pending = send(c + 1)
            x_c, y_c = record[c]
            record[c] = None  # the chunk's graph is freed by its backward
            inputs = ([x_c] if needs_x else []) + wanted
            grads = torch.autograd.grad(y_c, inputs, received.index_select(0, cp.regroup), allow_unused=True)
            for i, g in enumerate(grads[1:] if needs_x else grads):
                if g is not None:
                    total = sums[i]
                    sums[i] = g if total is None else total.add_(g)
            if needs_x:
                gx = grads[0] if grads[0] is not None else torch.zeros_like(x_c)
                back.append(ex.start(gx.index_select(0, cp.inverse), cp.send_splits, cp.recv_splits, CHUNK_BACKWARD))
        gx_buf = _to_buffer(plan, [b.wait() for b in back]) if needs_x else None
        it = iter(sums)
        param_grads = [next(it) if need else None for need in ctx.param_needs]
        return (gx_buf, None, None, None, *param_grads)


def pipelined_exchange(
    x_buf: Tensor,
    send_PL: list[list[int]],
    recv_PL: list[list[int]],
    chunks: int,
    experts: ExpertCompute,
    group,
    comm: CommStats | None = None,
) -> Tensor:
    """The experts' output for every row of ``x_buf`` (send-buffer order), exchanged and computed in ``chunks``
    overlapping pieces. Differentiable in ``x_buf`` and ``experts.params`` when grad mode is on."""
    plan = build_plan(send_PL, recv_PL, chunks, x_buf.device)
    ex = _Exchange(group, comm)
    params = tuple(experts.params)
    if torch.is_grad_enabled() and (x_buf.requires_grad or any(p.requires_grad for p in params)):
        return _PipelinedExperts.apply(x_buf, plan, experts, ex, *params)
    return _pipeline(x_buf, plan, experts, ex, None, False)
