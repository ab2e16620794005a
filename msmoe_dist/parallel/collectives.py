"""Collectives that fail with a name: which operation, on which rank, and what to look at.

A peer that hangs or dies turns into a timeout (parallel.timeout_s) or a connection error
inside torch.distributed, whose message does not say which of our collectives was waiting.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch.distributed as dist


class CollectiveError(RuntimeError):
    """A collective failed (timeout or lost peer); the message names it. The CLI exits with code 4."""


@contextmanager
def named_collective(op: str):
    try:
        yield
    except RuntimeError as exc:
        if isinstance(exc, CollectiveError):
            raise
        rank = dist.get_rank() if dist.is_initialized() else 0
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise CollectiveError(
            f"collective '{op}' failed on rank {rank}: {first} (a peer rank is probably hung or dead; "
            "the wait is bounded by parallel.timeout_s)"
        ) from exc
