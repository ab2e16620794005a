"""Training and evaluation batches cut from a 1-D token stream.

Training windows are random, but their offsets are a pure function of (seed, step, rank):
no sampler state, no epoch counter.  The data position of a run is therefore just its
step, and a run resumed at step N reads exactly the windows an uninterrupted run would,
whatever happened before (a different process, batches asked for in another order).

Evaluation walks the stream in order with non-overlapping windows so that every token
from index 1 to the end is a target exactly once; perplexity is then over the whole
stream, as in the reference.  All windows have ``seq_len`` tokens except the final one,
which holds the remainder and comes alone in a last batch of one row.  Average the loss
weighted by target-token count (sum of token losses / total targets), not per batch.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import torch

from .errors import DataError


def _check_stream(stream, min_len: int, what: str) -> int:
    if not isinstance(stream, torch.Tensor) or stream.dim() != 1:
        raise DataError(f"{what}: token stream must be a 1-D tensor, got {_describe(stream)}")
    if stream.dtype.is_floating_point or stream.dtype.is_complex or stream.dtype == torch.bool:
        raise DataError(f"{what}: token stream must hold integer ids, got dtype {stream.dtype}")
    if stream.numel() < min_len:
        raise DataError(f"{what}: token stream has {stream.numel()} tokens, expected at least {min_len}")
    return stream.numel()


def _check_int(name: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise DataError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _describe(x) -> str:
    return f"a {x.dim()}-D tensor" if isinstance(x, torch.Tensor) else type(x).__name__


def window_seed(seed: int, step: int, rank: int) -> int:
    """The 63-bit generator seed of one (seed, step, rank): a hash, so nearby steps are unrelated."""
    digest = hashlib.sha256(f"msmoe_dist.train_batch/{seed}/{step}/{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def train_batch(stream: torch.Tensor, step: int, batch_size: int, seq_len: int, seed: int,
                rank: int = 0, world_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch_size`` random windows: (inputs, targets), both [batch_size, seq_len], targets shifted by one.

    Offsets depend only on (seed, step, rank), so ranks read different windows and a
    resumed run matches an uninterrupted one.  world_size only validates rank.  The
    result lives on ``stream``'s device.
    """
    _check_int("batch_size", batch_size)
    _check_int("seq_len", seq_len)
    _check_int("step", step, 0)
    _check_int("world_size", world_size)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise DataError(f"rank must be an integer in [0, {world_size}), got {rank!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise DataError(f"seed must be an integer, got {seed!r}")
    n = _check_stream(stream, seq_len + 1, f"train batches of seq_len={seq_len}")
    gen = torch.Generator(device="cpu")
    gen.manual_seed(window_seed(seed, step, rank))
    # A window of seq_len + 1 tokens starting at s ends at s + seq_len, so s <= n - seq_len - 1.
    starts = torch.randint(0, n - seq_len, (batch_size,), generator=gen)
    index = (starts[:, None] + torch.arange(seq_len + 1)).to(stream.device)
    windows = stream[index]
    return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()


def num_eval_batches(num_tokens: int, batch_size: int, seq_len: int) -> int:
    """How many batches eval_batches yields for a stream of ``num_tokens`` (max_batches=0)."""
    targets = max(num_tokens - 1, 0)
    full = targets // seq_len
    return -(-full // batch_size) + (1 if targets % seq_len else 0)


def eval_batches(stream: torch.Tensor, batch_size: int, seq_len: int,
                 max_batches: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Consecutive non-overlapping (inputs, targets) windows over the whole stream, in order.

    Full windows come ``batch_size`` per batch (the last full batch may have fewer rows);
    the remainder, if any, follows as a [1, r] batch with r < seq_len.  Every token at
    index 1..len-1 is a target exactly once.  max_batches > 0 stops after that many
    batches (a prefix of the stream); 0 means all.
    """
    _check_int("batch_size", batch_size)
    _check_int("seq_len", seq_len)
    _check_int("max_batches", max_batches, 0)
    n = _check_stream(stream, 2, "eval batches")
    return _eval_iter(stream, n - 1, batch_size, seq_len, max_batches)


def _eval_iter(stream, targets: int, batch_size: int, seq_len: int, max_batches: int):
    # A generator of its own so eval_batches validates eagerly, at the call, not at first next().
    full = targets // seq_len
    yielded = 0
    for first in range(0, full, batch_size):
        if max_batches and yielded >= max_batches:
            return
        rows = min(batch_size, full - first)
        block = stream[first * seq_len: (first + rows) * seq_len + 1]
        yield block[:-1].reshape(rows, seq_len), block[1:].reshape(rows, seq_len)
        yielded += 1
    rest = targets - full * seq_len
    if rest and not (max_batches and yielded >= max_batches):
        start = full * seq_len
        yield stream[start: start + rest].reshape(1, rest), stream[start + 1: start + rest + 1].reshape(1, rest)
