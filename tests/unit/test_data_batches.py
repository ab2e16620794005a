"""Step-addressed training windows and exhaustive in-order evaluation windows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from msmoe_dist.data import DataError, eval_batches, num_eval_batches, train_batch

REPO = Path(__file__).resolve().parents[2]
STREAM = torch.arange(5000, dtype=torch.int64)  # token value == position, so windows reveal their offsets


def _starts(step, seed=0, rank=0, world_size=1, batch_size=8, seq_len=16):
    inputs, targets = train_batch(STREAM, step, batch_size, seq_len, seed, rank, world_size)
    return inputs[:, 0].tolist()


def test_windows_are_contiguous_and_targets_shifted():
    inputs, targets = train_batch(STREAM, step=3, batch_size=8, seq_len=16, seed=1)
    assert inputs.shape == targets.shape == (8, 16) and inputs.dtype == torch.int64
    assert torch.equal(targets, inputs + 1)
    assert torch.equal(inputs, inputs[:, :1] + torch.arange(16))
    assert int(targets.max()) < STREAM.numel()


def test_pure_function_of_seed_step_rank():
    assert _starts(4) == _starts(4)
    torch.manual_seed(123)  # the global RNG plays no part
    a = _starts(4)
    torch.manual_seed(456)
    assert a == _starts(4)
    assert _starts(4) != _starts(5)
    assert _starts(4, seed=0) != _starts(4, seed=1)


def test_ranks_read_different_windows():
    per_rank = [_starts(7, rank=r, world_size=4) for r in range(4)]
    assert len({tuple(s) for s in per_rank}) == 4
    # world_size does not enter the offsets: rank r reads the same windows at any world size.
    assert _starts(7, rank=1, world_size=2) == _starts(7, rank=1, world_size=8)


def test_resumed_run_reads_what_an_uninterrupted_one_would():
    uninterrupted = {step: _starts(step, seed=11) for step in range(10)}
    resumed = {step: _starts(step, seed=11) for step in reversed(range(5, 10))}
    assert all(resumed[s] == uninterrupted[s] for s in range(5, 10))
    code = (
        "import json, torch; from msmoe_dist.data import train_batch\n"
        "s = torch.arange(5000, dtype=torch.int64)\n"
        "print(json.dumps({k: train_batch(s, k, 8, 16, 11)[0][:, 0].tolist() for k in range(5, 10)}))"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True, timeout=120)
    fresh = {int(k): v for k, v in json.loads(out.stdout).items()}
    assert fresh == {s: uninterrupted[s] for s in range(5, 10)}


def test_train_batch_edges_and_errors():
    short = torch.arange(17)
    inputs, targets = train_batch(short, 0, 4, 16, seed=0)  # exactly seq_len + 1 tokens: one possible window
    assert torch.equal(inputs, torch.arange(16).expand(4, 16)) and torch.equal(targets, inputs + 1)
    with pytest.raises(DataError, match="has 16 tokens, expected at least 17") as info:
        train_batch(torch.arange(16), 0, 4, 16, seed=0)
    assert "\n" not in str(info.value)
    with pytest.raises(DataError, match="rank"):
        train_batch(STREAM, 0, 4, 16, seed=0, rank=2, world_size=2)
    with pytest.raises(DataError, match="1-D"):
        train_batch(STREAM.view(50, 100), 0, 4, 16, seed=0)
    with pytest.raises(DataError, match="integer ids"):
        train_batch(STREAM.float(), 0, 4, 16, seed=0)
    with pytest.raises(DataError, match="step"):
        train_batch(STREAM, -1, 4, 16, seed=0)
    with pytest.raises(DataError, match="batch_size"):
        train_batch(STREAM, 0, 0, 16, seed=0)


@pytest.mark.parametrize("n, batch_size, seq_len", [(1000, 4, 7), (1001, 4, 10), (41, 3, 10), (2, 5, 8), (9, 2, 4)])
def test_eval_scores_every_target_exactly_once_in_order(n, batch_size, seq_len):
    stream = torch.arange(n, dtype=torch.int64)
    batches = list(eval_batches(stream, batch_size, seq_len))
    assert len(batches) == num_eval_batches(n, batch_size, seq_len)
    targets = torch.cat([t.reshape(-1) for _, t in batches])
    assert torch.equal(targets, torch.arange(1, n))  # each of tokens 1..n-1 once, in order
    for inputs, tgt in batches:
        assert inputs.shape == tgt.shape and torch.equal(tgt, inputs + 1)
        assert inputs.shape[0] <= batch_size and inputs.shape[1] <= seq_len
    assert all(x.shape[1] == seq_len for x, _ in batches[:-1])


def test_eval_max_batches_and_errors():
    stream = torch.arange(1000)
    assert len(list(eval_batches(stream, 4, 7, max_batches=3))) == 3
    assert len(list(eval_batches(stream, 4, 7, max_batches=10_000))) == num_eval_batches(1000, 4, 7)
    first = next(iter(eval_batches(stream, 4, 7, max_batches=1)))
    assert torch.equal(first[0], torch.arange(28).view(4, 7))
    with pytest.raises(DataError, match="at least 2"):
        eval_batches(torch.arange(1), 4, 7)  # raised at the call, not at the first next()
    with pytest.raises(DataError, match="seq_len"):
        eval_batches(stream, 4, 0)
    with pytest.raises(DataError, match="max_batches"):
        eval_batches(stream, 4, 7, max_batches=-1)
