"""Every collective of msmoe_dist goes through this module; nothing else calls torch.distributed's.

Each function here does three things around the torch.distributed call:
  (a) places the tensor on the group's communication device (`comm_device`: the current CUDA device
      under NCCL, which accepts only CUDA tensors; the host under gloo), and hands the result back on
      the caller's device. A tensor already there is not copied.
  (b) names the collective: a failure (timeout, lost peer) becomes a `CollectiveError` saying which
      collective on which rank; the CLI exits with code 4. The wait itself is bounded by the group's
      timeout (parallel.timeout_s), set when the groups are built.
  (c) counts it: with a `CommStats`, its bytes, calls and host seconds under the same name.

`tests/unit/test_comm_scan.py` scans the package and fails if any other module calls a
torch.distributed collective directly.

The calls themselves go to a `CommBackend`, by default torch.distributed. A test can run the whole
package against another one (`using_backend`), e.g. one that claims the group is NCCL on a CUDA device
and records the device of every tensor it is handed (tests/distributed/test_simulated_nccl.py).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from msmoe_dist.parallel.comm_stats import CommStats

__all__ = [
    "CollectiveError",
    "CommBackend",
    "all_gather",
    "all_reduce",
    "all_to_all_single",
    "all_to_all_single_async",
    "barrier",
    "broadcast",
    "comm_device",
    "current_backend",
    "named_collective",
    "PendingCollective",
    "using_backend",
]

_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


class CollectiveError(RuntimeError):
    """A collective failed (timeout or lost peer); the message names it. The CLI exits with code 4."""


class CommBackend:
    """torch.distributed as this package uses it: where a group communicates, and the calls themselves.

    The calls have torch.distributed's signatures and are handed tensors already on `device(group)`.
    Subclass it to simulate another backend (see the module docstring); `to_comm`/`from_comm` are the
    only places a tensor changes device.
    """

    def device(self, group: Any = None) -> torch.device:
        if dist.get_backend(group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def to_comm(self, t: Tensor, device: torch.device) -> Tensor:
        return t if t.device == device else t.to(device)

    def from_comm(self, t: Tensor, device: torch.device) -> Tensor:
        return t if t.device == device else t.to(device)

    def rank(self) -> int:
        return dist.get_rank() if dist.is_initialized() else 0

    def all_reduce(self, t: Tensor, op: Any, group: Any) -> None:
        dist.all_reduce(t, op=op, group=group)

    def all_to_all_single(
        self, out: Tensor, inp: Tensor, out_splits: list[int] | None, in_splits: list[int] | None, group: Any
    ) -> None:
        dist.all_to_all_single(out, inp, out_splits, in_splits, group=group)

    def all_to_all_single_async(
        self, out: Tensor, inp: Tensor, out_splits: list[int] | None, in_splits: list[int] | None, group: Any
    ) -> Any:
        """Starts the all-to-all and returns its work handle (``wait()``), or None when it already finished.

        A backend that overrides only the blocking `all_to_all_single` (a simulation) runs that one here,
        so it sees every all-to-all; the result is then complete on return (nothing overlaps)."""
        if type(self).all_to_all_single is not CommBackend.all_to_all_single:
            self.all_to_all_single(out, inp, out_splits, in_splits, group)
            return None
        return dist.all_to_all_single(out, inp, out_splits, in_splits, group=group, async_op=True)

    def all_gather(self, outs: list[Tensor], t: Tensor, group: Any) -> None:
        dist.all_gather(outs, t, group=group)

    def broadcast(self, t: Tensor, src: int, group: Any) -> None:
        dist.broadcast(t, src=src, group=group)

    def barrier(self, group: Any) -> None:
        dist.barrier(group=group)

    def world_size(self, group: Any) -> int:
        return dist.get_world_size(group)


_backend: CommBackend = CommBackend()


def current_backend() -> CommBackend:
    return _backend


@contextmanager
def using_backend(backend: CommBackend) -> Iterator[CommBackend]:
    """Runs the body with every collective of the package going to `backend` (tests, simulations)."""
    global _backend
    saved, _backend = _backend, backend
    try:
        yield backend
    finally:
        _backend = saved


def comm_device(group: Any = None) -> torch.device:
    """Where `group` communicates: the current CUDA device under NCCL, the host otherwise."""
    return _backend.device(group)


@contextmanager
def named_collective(op: str) -> Iterator[None]:
    """Turns a failure inside the body into a `CollectiveError` naming `op` and this rank."""
    try:
        yield
    except RuntimeError as exc:
        if isinstance(exc, CollectiveError):
            raise
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise CollectiveError(
            f"collective '{op}' failed on rank {_backend.rank()}: {first} (a peer rank is probably hung or dead; "
            "the wait is bounded by parallel.timeout_s)"
        ) from exc


@contextmanager
def _run(name: str, stats: CommStats | None, nbytes: int) -> Iterator[None]:
    with named_collective(name), stats.timed(name, nbytes) if stats is not None else nullcontext():
        yield


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def all_reduce(
    tensor: Tensor, *, op: str = "sum", group: Any = None, name: str, stats: CommStats | None = None
) -> Tensor:
    """The reduction of `tensor` over `group`, on `tensor`'s device. When no copy was needed the
    reduction happened in place and the result is `tensor` itself."""
    b = _backend
    buf = b.to_comm(tensor, b.device(group))
    with _run(name, stats, _nbytes(buf)):
        b.all_reduce(buf, _OPS[op], group)
    return b.from_comm(buf, tensor.device)


def all_to_all_single(
    tensor: Tensor,
    out_splits: list[int] | None = None,
    in_splits: list[int] | None = None,
    *,
    group: Any = None,
    name: str,
    stats: CommStats | None = None,
) -> Tensor:
    """Rows of `tensor` (dim 0) split by `in_splits` go to the ranks of `group` in order; returns the rows
    received, by source rank (`out_splits` of them from each; equal splits when both are None)."""
    b = _backend
    inp = b.to_comm(tensor.contiguous(), b.device(group))
    rows = sum(out_splits) if out_splits is not None else inp.shape[0]
    out = inp.new_empty((rows,) + tuple(inp.shape[1:]))
    with _run(name, stats, _nbytes(inp)):
        b.all_to_all_single(out, inp, out_splits, in_splits, group)
    return b.from_comm(out, tensor.device)


class PendingCollective:
    """An all-to-all started by `all_to_all_single_async`; `wait()` returns its result on the caller's device.

    It holds the buffers until then (the collective writes into them in the background). A failure,
    at the start or in the wait, is a `CollectiveError` naming the collective. With a `CommStats`, the
    bytes and one call are counted, and the seconds are the host time spent starting and waiting:
    the time this rank was held up, not the transfer time (that overlaps with other work).
    """

    def __init__(
        self,
        work: Any,
        inp: Tensor,
        out: Tensor,
        device: torch.device,
        name: str,
        stats: CommStats | None,
        seconds: float,
    ):
        self._work: Any = work
        self._inp: Tensor | None = inp
        self._out, self._device = out, device
        self._name, self._stats, self._seconds = name, stats, seconds
        self._nbytes = _nbytes(inp)
        self._result: Tensor | None = None

    def wait(self) -> Tensor:
        if self._result is None:
            t0 = time.perf_counter()
            with named_collective(self._name):
                if self._work is not None:
                    self._work.wait()
            if self._stats is not None:
                self._stats.add(self._name, self._seconds + time.perf_counter() - t0, self._nbytes)
            self._result = _backend.from_comm(self._out, self._device)
            self._work = self._inp = None
        return self._result


def all_to_all_single_async(
    tensor: Tensor,
    out_splits: list[int] | None = None,
    in_splits: list[int] | None = None,
    *,
    group: Any = None,
    name: str,
    stats: CommStats | None = None,
) -> PendingCollective:
    """`all_to_all_single`, started and not waited for: returns a `PendingCollective` whose `wait()`
    gives the rows received. Every rank must start (and wait for) its asynchronous collectives on a
    group in the same order as its others; `tensor` must not change before the wait."""
    b = _backend
    inp = b.to_comm(tensor.contiguous(), b.device(group))
    rows = sum(out_splits) if out_splits is not None else inp.shape[0]
    out = inp.new_empty((rows,) + tuple(inp.shape[1:]))
    t0 = time.perf_counter()
    with named_collective(name):
        work = b.all_to_all_single_async(out, inp, out_splits, in_splits, group)
    return PendingCollective(work, inp, out, tensor.device, name, stats, time.perf_counter() - t0)


def all_gather(tensor: Tensor, *, group: Any = None, name: str, stats: CommStats | None = None) -> list[Tensor]:
    """Every rank's `tensor` (same shape on all), in rank order, on `tensor`'s device."""
    b = _backend
    inp = b.to_comm(tensor.contiguous(), b.device(group))
    outs = [torch.empty_like(inp) for _ in range(b.world_size(group))]
    with _run(name, stats, _nbytes(inp)):
        b.all_gather(outs, inp, group)
    return [b.from_comm(o, tensor.device) for o in outs]


def broadcast(tensor: Tensor, *, src: int, group: Any = None, name: str, stats: CommStats | None = None) -> Tensor:
    """Rank `src`'s `tensor` (global rank), on `tensor`'s device; in place when no copy was needed."""
    b = _backend
    buf = b.to_comm(tensor, b.device(group))
    with _run(name, stats, _nbytes(buf)):
        b.broadcast(buf, src, group)
    return b.from_comm(buf, tensor.device)


def barrier(group: Any = None, *, name: str, stats: CommStats | None = None) -> None:
    with _run(name, stats, 0):
        _backend.barrier(group)
