"""Training and evaluation batches cut from a 1-D token stream.

Two training samplers (data.sampler), both without state: the windows of a step are a pure
function of the step (and seed, rank), so the data position of a run is just its step, and a
run resumed at step N reads exactly the windows an uninterrupted run would, whatever happened
before (a different process, batches asked for in another order).

- ``random`` (:func:`train_batch`): offsets drawn from a generator seeded by (seed, step, rank).
- ``sequential`` (:func:`sequential_batch`): the reference's order.  The stream is cut into
  world_size * batch_size contiguous lanes; rank r owns lanes r*B .. r*B+B-1 (one contiguous
  shard of the stream), row b of its batch reads lane r*B+b, and step s reads the lane's
  window s mod W (W windows per lane), wrapping to the lane's start at the end of an epoch.
  Lanes overlap by one token so that their targets tile the stream: over one epoch every
  token from index 1 to L*W*seq_len (L lanes) is a target exactly once.

The rank layout of the data is the run's *data world* D (the world size it started with, kept in its
checkpoints): micro-batch g of data rank d is the ``(g, d)`` above, and :func:`data_slot` maps a rank of
a resumed run at another world size W (same data.batch_size and grad_accum_steps x world size) onto it,
so the resumed run reads the samples, forward by forward, the old run would have read.

Streams may hold any integer dtype (the uint16/uint32 memory maps of a prepared corpus);
only the cut windows are converted to int64, so a memory-mapped stream is never copied whole.

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


def data_slot(step: int, micro: int, grad_accum: int, rank: int, world: int, data_world: int) -> tuple[int, int]:
    """(micro-batch index, data rank) that rank ``rank`` of ``world`` reads as micro-batch ``micro`` of ``step``.

    A step reads grad_accum * world forwards; forward j = micro * world + rank of the step is, in the run's
    data layout of ``data_world`` ranks, micro-batch step * (grad_accum * world / data_world) + j // data_world
    of data rank j % data_world. With world == data_world this is (step * grad_accum + micro, rank), the
    order of every run that never changed its world size; it depends on the layout at hand only through
    grad_accum * world (the forwards per step), which a resume keeps.
    """
    per_step = grad_accum * world
    if per_step % data_world:
        raise DataError(
            f"grad_accum_steps x world size = {grad_accum} x {world} is not a multiple of the run's data world "
            f"size {data_world}; expected the same micro-batches per step as the saved run"
        )
    j = micro * world + rank
    return step * (per_step // data_world) + j // data_world, j % data_world


def window_seed(seed: int, step: int, rank: int) -> int:
    """The 63-bit generator seed of one (seed, step, rank): a hash, so nearby steps are unrelated."""
    digest = hashlib.sha256(f"msmoe_dist.train_batch/{seed}/{step}/{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _check_batch_args(batch_size: int, seq_len: int, step: int, rank: int, world_size: int) -> None:
    """The argument checks shared by both training samplers."""
    _check_int("batch_size", batch_size)
    _check_int("seq_len", seq_len)
    _check_int("step", step, 0)
    _check_int("world_size", world_size)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise DataError(f"rank must be an integer in [0, {world_size}), got {rank!r}")


def train_batch(
    stream: torch.Tensor, step: int, batch_size: int, seq_len: int, seed: int, rank: int = 0, world_size: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch_size`` random windows: (inputs, targets), both [batch_size, seq_len], targets shifted by one.

    Offsets depend only on (seed, step, rank), so ranks read different windows and a
    resumed run matches an uninterrupted one.  world_size only validates rank.  The
    result lives on ``stream``'s device.
    """
    _check_batch_args(batch_size, seq_len, step, rank, world_size)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise DataError(f"seed must be an integer, got {seed!r}")
    n = _check_stream(stream, seq_len + 1, f"train batches of seq_len={seq_len}")
    gen = torch.Generator(device="cpu")
    gen.manual_seed(window_seed(seed, step, rank))
    # A window of seq_len + 1 tokens starting at s ends at s + seq_len, so s <= n - seq_len - 1.
    starts = torch.randint(0, n - seq_len, (batch_size,), generator=gen)
    index = (starts[:, None] + torch.arange(seq_len + 1)).to(stream.device)
    windows = stream[index].long()
    return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()


def sequential_layout(num_tokens: int, batch_size: int, seq_len: int, world_size: int) -> tuple[int, int]:
    """(lane length, windows per lane) of the sequential sampler for a stream of ``num_tokens``.

    A lane holds lane_len + 1 tokens starting at lane * lane_len (consecutive lanes share one
    token), so lane_len = (num_tokens - 1) // lanes; a window takes seq_len targets, so
    W = lane_len // seq_len and each lane's last lane_len mod seq_len targets are not read.
    """
    lanes = world_size * batch_size
    lane_len = (num_tokens - 1) // lanes
    windows = lane_len // seq_len
    if windows < 1:
        raise DataError(
            f"sequential batches: a stream of {num_tokens} tokens cut into world_size*batch_size = "
            f"{lanes} lanes leaves {lane_len} targets per lane, fewer than data.seq_len={seq_len}; "
            "expected a longer training split or a smaller batch/seq_len"
        )
    return lane_len, windows


def sequential_batch(
    stream: torch.Tensor, step: int, batch_size: int, seq_len: int, rank: int = 0, world_size: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s (inputs, targets) at ``step``: window step mod W of each of its B lanes, in order.

    See the module docstring for the lane layout; both tensors are int64 [batch_size, seq_len].
    """
    _check_batch_args(batch_size, seq_len, step, rank, world_size)
    n = _check_stream(stream, seq_len + 1, f"sequential train batches of seq_len={seq_len}")
    lane_len, windows = sequential_layout(n, batch_size, seq_len, world_size)
    lanes = torch.arange(rank * batch_size, (rank + 1) * batch_size)
    starts = lanes * lane_len + (step % windows) * seq_len
    index = (starts[:, None] + torch.arange(seq_len + 1)).to(stream.device)
    rows = stream[index].long()
    return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()


def training_batch(
    data_cfg, stream: torch.Tensor, index: int, seed: int, rank: int = 0, world_size: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """The trainer's one call: micro-batch ``index`` (step * grad_accum + micro) by ``data_cfg.sampler``."""
    if data_cfg.sampler == "sequential":
        return sequential_batch(stream, index, data_cfg.batch_size, data_cfg.seq_len, rank, world_size)
    if data_cfg.sampler != "random":
        raise DataError(f"data.sampler is {data_cfg.sampler!r}, expected 'random' or 'sequential'")
    return train_batch(stream, index, data_cfg.batch_size, data_cfg.seq_len, seed, rank, world_size)


def num_eval_batches(num_tokens: int, batch_size: int, seq_len: int) -> int:
    """How many batches eval_batches yields for a stream of ``num_tokens`` (max_batches=0)."""
    targets = max(num_tokens - 1, 0)
    full = targets // seq_len
    return -(-full // batch_size) + (1 if targets % seq_len else 0)


def check_lm_streams(train: torch.Tensor, valid: torch.Tensor, seq_len: int) -> None:
    """At load time, not at the first batch: the train split holds one window (seq_len inputs and their
    targets) and the valid split at least one target."""
    if train.numel() < seq_len + 1:
        raise DataError(
            f"the train split has {train.numel()} tokens, fewer than one window of data.seq_len={seq_len} "
            f"(+1 target); expected at least {seq_len + 1} tokens or a smaller data.seq_len"
        )
    if valid.numel() < 2:
        raise DataError(
            f"the valid split has {valid.numel()} tokens, expected at least 2 (one input and its target): "
            "is valid.txt empty?"
        )


def eval_batches(
    stream: torch.Tensor, batch_size: int, seq_len: int, max_batches: int = 0
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
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
        block = stream[first * seq_len : (first + rows) * seq_len + 1].long()
        yield block[:-1].reshape(rows, seq_len), block[1:].reshape(rows, seq_len)
        yielded += 1
    rest = targets - full * seq_len
    if rest and not (max_batches and yielded >= max_batches):
        start = full * seq_len
        block = stream[start : start + rest + 1].long()
        yield block[:-1].reshape(1, rest), block[1:].reshape(1, rest)
