"""data.sampler=sequential: contiguous per-rank lanes, every token once per epoch, position = step."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from msmoe_dist.config.schema import DataConfig
from msmoe_dist.data import DataError, sequential_batch, train_batch, training_batch
from msmoe_dist.data.batches import sequential_layout


def _targets(stream, steps, batch_size, seq_len, world_size):
    """Counter of target token values over steps x ranks x rows (the stream holds its own positions)."""
    seen = Counter()
    for step in steps:
        for rank in range(world_size):
            _, y = sequential_batch(stream, step, batch_size, seq_len, rank, world_size)
            seen.update(y.flatten().tolist())
    return seen


def test_one_epoch_covers_every_token_exactly_once():
    B, S, world, windows = 3, 5, 2, 4
    n = world * B * windows * S + 1  # an exact fit: every token from index 1 on is a target
    stream = torch.arange(n)
    assert sequential_layout(n, B, S, world) == (windows * S, windows)
    seen = _targets(stream, range(windows), B, S, world)
    assert seen == Counter(range(1, n))


def test_uneven_stream_covers_the_documented_set_once():
    B, S, world, n = 2, 7, 3, 1000
    lane_len, windows = sequential_layout(n, B, S, world)
    assert (lane_len, windows) == ((n - 1) // (world * B), ((n - 1) // (world * B)) // S)
    seen = _targets(torch.arange(n), range(windows), B, S, world)
    expected = Counter(
        t for lane in range(world * B) for t in range(lane * lane_len + 1, lane * lane_len + windows * S + 1)
    )
    assert seen == expected and max(seen.values()) == 1


def test_ranks_read_contiguous_shards_in_order_and_wrap():
    B, S, world = 4, 8, 2
    stream = torch.arange(2000)
    lane_len, windows = sequential_layout(2000, B, S, world)
    for rank in range(world):
        x0, y0 = sequential_batch(stream, 0, B, S, rank, world)
        # row b starts lane rank*B+b; a rank's lanes are adjacent, so its shard is one contiguous range
        assert x0[:, 0].tolist() == [(rank * B + b) * lane_len for b in range(B)]
        for step in range(windows - 1):
            x, y = sequential_batch(stream, step, B, S, rank, world)
            x_next, _ = sequential_batch(stream, step + 1, B, S, rank, world)
            assert torch.equal(y, x + 1) and torch.equal(x_next[:, 0], y[:, -1])  # the next window continues
        for step in (windows, 2 * windows + 3):  # epoch boundary: back to the lane's start
            assert torch.equal(
                sequential_batch(stream, step, B, S, rank, world)[0],
                sequential_batch(stream, step % windows, B, S, rank, world)[0],
            )


def test_resumed_steps_equal_the_uninterrupted_ones():
    B, S, world, n_steps, k = 2, 6, 2, 30, 13
    stream = torch.randint(0, 500, (1500,))
    full = [[sequential_batch(stream, s, B, S, r, world) for r in range(world)] for s in range(n_steps)]
    # a "resumed" process: a fresh copy of the stream, steps k.. asked for in another order
    fresh = stream.clone()
    for s in reversed(range(k, n_steps)):
        for r in range(world):
            x, y = sequential_batch(fresh, s, B, S, r, world)
            assert torch.equal(x, full[s][r][0]) and torch.equal(y, full[s][r][1])
    # and a resume neither repeats nor skips: steps 0..k-1 then k..n-1 read each epoch target once
    lane_len, windows = sequential_layout(1500, B, S, world)
    positions = torch.arange(1500)
    before, after = _targets(positions, range(k), B, S, world), _targets(positions, range(k, windows), B, S, world)
    assert _targets(positions, range(windows), B, S, world) == before + after and not set(before) & set(after)


def test_any_integer_stream_gives_int64_batches():
    base = torch.arange(400)
    for dtype in (torch.uint16, torch.int32, torch.uint32, torch.int64):
        x, y = sequential_batch(base.to(dtype), 3, 2, 8, 1, 2)
        ref = sequential_batch(base, 3, 2, 8, 1, 2)
        assert x.dtype == y.dtype == torch.int64 and torch.equal(x, ref[0]) and torch.equal(y, ref[1])
        assert train_batch(base.to(dtype), 3, 2, 8, seed=1)[0].dtype == torch.int64


def test_dispatch_follows_data_sampler():
    stream = torch.arange(3000)
    cfg = DataConfig(batch_size=3, seq_len=10, sampler="random")
    x, y = training_batch(cfg, stream, 5, 7, 1, 2)
    rx, ry = train_batch(stream, 5, 3, 10, 7, 1, 2)
    assert torch.equal(x, rx) and torch.equal(y, ry)
    cfg.sampler = "sequential"
    x, y = training_batch(cfg, stream, 5, 7, 1, 2)
    sx, sy = sequential_batch(stream, 5, 3, 10, 1, 2)
    assert torch.equal(x, sx) and torch.equal(y, sy)
    cfg.sampler = "shuffled"
    with pytest.raises(DataError, match="data.sampler"):
        training_batch(cfg, stream, 0, 0)


def test_errors():
    with pytest.raises(DataError, match="fewer than data.seq_len=16"):
        sequential_batch(torch.arange(100), 0, 4, 16, 0, 2)  # 8 lanes of 12 targets
    with pytest.raises(DataError, match="rank"):
        sequential_batch(torch.arange(100), 0, 1, 4, 2, 2)
    with pytest.raises(DataError, match="step"):
        sequential_batch(torch.arange(100), -1, 1, 4)
    with pytest.raises(DataError, match="integer ids"):
        sequential_batch(torch.arange(100).float(), 0, 1, 4)
