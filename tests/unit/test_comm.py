"""msmoe_dist.parallel.comm: placement on the group's device, results on the caller's, names in errors,
counts in CommStats; and the dropless regroup index against the obviously correct host loop."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from msmoe_dist.parallel import CommStats, comm
from msmoe_dist.parallel.all_to_all import AllToAllDispatcher
from msmoe_dist.parallel.collectives import CollectiveError as ReExported
from msmoe_dist.parallel.comm import CollectiveError, CommBackend, using_backend


class Placed(torch.Tensor):
    """Stands for a tensor on the communication device."""


class Double(CommBackend):
    """One rank; records what each call was handed; optionally fails like a dead peer."""

    def __init__(self, fail: Exception | None = None) -> None:
        self.handed: list[tuple[str, bool]] = []
        self.fail = fail

    def device(self, group=None):
        return torch.device("cuda", 1)

    def to_comm(self, t, device):
        assert device == torch.device("cuda", 1)
        return t.as_subclass(Placed)

    def from_comm(self, t, device):
        return t.as_subclass(torch.Tensor)

    def rank(self):
        return 3

    def world_size(self, group):
        return 2

    def _call(self, op, *ts):
        if self.fail is not None:
            raise self.fail
        self.handed += [(op, isinstance(t, Placed)) for t in ts]

    def all_reduce(self, t, op, group):
        self._call("all_reduce", t)
        t.mul_(2)  # a world of two equal ranks

    def all_to_all_single(self, out, inp, out_splits, in_splits, group):
        self._call("all_to_all_single", out, inp)
        out.copy_(inp.flip(0))

    def all_gather(self, outs, t, group):
        self._call("all_gather", *outs, t)
        for o in outs:
            o.copy_(t)

    def broadcast(self, t, src, group):
        self._call("broadcast", t)

    def barrier(self, group):
        self._call("barrier")


def test_every_collective_is_placed_returned_and_counted():
    stats, backend = CommStats(), Double()
    x = torch.arange(4.0)
    with using_backend(backend):
        r = comm.all_reduce(x.clone(), name="sum", stats=stats)
        a = comm.all_to_all_single(x, [2, 2], [2, 2], name="a2a", stats=stats)
        g = comm.all_gather(x, name="gather", stats=stats)
        b = comm.broadcast(x.clone(), src=0, name="bcast", stats=stats)
        comm.barrier(name="wait", stats=stats)
    assert all(placed for _, placed in backend.handed), backend.handed
    for t in (r, a, b, *g):
        assert type(t) is torch.Tensor  # back on the caller's device, not the communication one
    assert r.tolist() == [0.0, 2.0, 4.0, 6.0] and a.tolist() == [3.0, 2.0, 1.0, 0.0] and len(g) == 2
    assert stats["a2a"].bytes == 16 and stats["gather"].bytes == 16 and stats["wait"].bytes == 0
    assert stats.calls == 5


def test_a_failure_names_the_collective_and_the_rank():
    with using_backend(Double(RuntimeError("Connection closed by peer\ndetails"))):
        with pytest.raises(CollectiveError) as exc:
            comm.all_reduce(torch.zeros(1), name="all_reduce (loss / evaluation sums)")
    assert str(exc.value) == (
        "collective 'all_reduce (loss / evaluation sums)' failed on rank 3: Connection closed by peer "
        "(a peer rank is probably hung or dead; the wait is bounded by parallel.timeout_s)"
    )
    assert ReExported is CollectiveError
    stats = CommStats()
    with using_backend(Double(CollectiveError("inner"))), pytest.raises(CollectiveError, match="^inner$"):
        comm.barrier(name="outer", stats=stats)
    assert stats.calls == 0  # a failed collective is not counted


def test_the_device_rule(monkeypatch):
    backend = CommBackend()
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 2)
    assert backend.device() == torch.device("cuda", 2)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "gloo")
    assert backend.device() == torch.device("cpu")
    x = torch.ones(2)
    assert backend.to_comm(x, torch.device("cpu")) is x  # no copy when it is already there


def test_using_backend_restores_the_default():
    before = comm.current_backend()
    with pytest.raises(ValueError), using_backend(Double()):
        raise ValueError
    assert comm.current_backend() is before


def _regroup_reference(counts_PL: torch.Tensor) -> torch.Tensor:
    """The former host loop: one arange per (local expert, source rank) block."""
    P, L = counts_PL.shape
    starts = (torch.cumsum(counts_PL.reshape(-1), 0) - counts_PL.reshape(-1)).view(P, L)
    pieces = [torch.arange(int(starts[p, e]), int(starts[p, e] + counts_PL[p, e])) for e in range(L) for p in range(P)]
    return torch.cat(pieces)


@pytest.mark.parametrize("P,L", [(1, 1), (2, 4), (8, 2), (3, 5)])
def test_regroup_index_equals_the_host_loop(P, L):
    g = torch.Generator().manual_seed(P * 10 + L)
    for _ in range(5):
        counts = torch.randint(0, 4, (P, L), generator=g)
        counts[0, 0] = 0  # empty blocks at the edges too
        got = AllToAllDispatcher._regroup_index(counts, int(counts.sum()))
        assert torch.equal(got, _regroup_reference(counts)), counts
