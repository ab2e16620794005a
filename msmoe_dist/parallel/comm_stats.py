"""What the MoE collectives of this process cost: seconds, bytes and calls per collective name.

A `CommStats` is handed to whoever runs collectives (`AllToAllDispatcher(..., comm=stats)`,
`apply_expert_parallel(model, pg, comm=stats)`); nothing is global, so two models or two benchmarks
in one process never mix their figures. Reset it, run steps, read the totals or one name's entry:

    comm = CommStats()
    apply_expert_parallel(model, pg, comm)
    comm.reset(); step(); print(comm.seconds, comm["all_to_all (MoE token exchange, forward)"].bytes)

Names are the labels the collectives carry in error messages (`parallel.collectives.named_collective`).
`bytes` is the size of the buffer this rank hands to the collective (for an all-to-all: what it sends,
its own share included). `seconds` is host wall time around the call: on gloo that is the exchange;
under NCCL the call returns once the work is queued, so there it measures launch, not transfer.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass


@dataclass
class CollectiveTotals:
    seconds: float = 0.0
    bytes: int = 0
    calls: int = 0


class CommStats:
    def __init__(self) -> None:
        self.by_name: dict[str, CollectiveTotals] = {}

    def reset(self) -> None:
        self.by_name.clear()

    def add(self, name: str, seconds: float, nbytes: int) -> None:
        entry = self.by_name.setdefault(name, CollectiveTotals())
        entry.seconds += seconds
        entry.bytes += nbytes
        entry.calls += 1

    @contextmanager
    def timed(self, name: str, nbytes: int):
        """Adds the wall time of the body to `name` (only if it completes: a failed collective raises)."""
        t0 = time.perf_counter()
        yield
        self.add(name, time.perf_counter() - t0, nbytes)

    def __getitem__(self, name: str) -> CollectiveTotals:
        """One collective's totals; zeros for a name that has not run since the last reset."""
        return self.by_name.get(name, CollectiveTotals())

    @property
    def seconds(self) -> float:
        return sum(e.seconds for e in self.by_name.values())

    @property
    def bytes(self) -> int:
        return sum(e.bytes for e in self.by_name.values())

    @property
    def calls(self) -> int:
        return sum(e.calls for e in self.by_name.values())

    def __repr__(self) -> str:
        return f"CommStats({self.by_name!r})"
