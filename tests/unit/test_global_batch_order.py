"""The global batch of a step is a function of the step and the global micro-batch index only: any
(world size W, grad_accum G) with the same W * G and data.batch_size reads the same samples, forward by
forward, in the same global order (random and sequential LM samplers, the ImageNet order). At W = 1 the
trainer reads exactly what it always read (micro-batch index step * G + m, rank 0 of 1)."""

from __future__ import annotations

import pytest
import torch

from msmoe_dist.config.schema import DataConfig, TrainConfig
from msmoe_dist.data import training_batch
from msmoe_dist.data.images import train_sample_keys
from msmoe_dist.train.tasks import LMTask

B, S, STEPS = 3, 8, 5
STREAM = torch.arange(5000) % 997  # token ids that say roughly where a window was cut
LAYOUTS = [(1, 4), (2, 2), (4, 1)]  # (world, grad_accum): 4 micro-batches per step


def _lm_task(sampler: str, world: int, rank: int, G: int, start: int) -> LMTask:
    task = LMTask(None, DataConfig(sampler=sampler, batch_size=B, seq_len=S), TrainConfig(grad_accum_steps=G, seed=5))  # type: ignore[arg-type]
    task.train_ids = STREAM
    task.start(start, rank, world)
    return task


def _global_order(sampler: str, world: int, G: int, start: int = 0) -> list[torch.Tensor]:
    """Every forward's input tokens of steps start..STEPS-1, sorted by global micro-batch index."""
    by_index = {}
    for rank in range(world):
        task = _lm_task(sampler, world, rank, G, start)
        for step in range(start, STEPS):
            micro, units = task.micro_batches(step)
            assert units == B * S * G * world
            for m, (x, _) in enumerate(micro):
                by_index[(step * G + m) * world + rank] = x
    return [by_index[g] for g in sorted(by_index)]


@pytest.mark.parametrize("sampler", ["random", "sequential"])
def test_lm_order_depends_only_on_micro_batches_per_step(sampler):
    ref = _global_order(sampler, 1, 4)
    # world 1: the index the trainer always used (step * G + m, rank 0 of 1): golden traces unchanged
    old = [training_batch(DataConfig(sampler=sampler, batch_size=B, seq_len=S), STREAM, i, 5)[0] for i in range(20)]
    assert all(torch.equal(a, b) for a, b in zip(ref, old, strict=True))
    for world, G in LAYOUTS[1:]:
        got = _global_order(sampler, world, G)
        assert all(torch.equal(a, b) for a, b in zip(ref, got, strict=True)), (world, G)
        # a resume at step 2 under this layout reads the uninterrupted run's later token ids
        resumed = _global_order(sampler, world, G, start=2)
        assert all(torch.equal(a, b) for a, b in zip(ref[2 * 4 :], resumed, strict=True)), (world, G)
    assert len({tuple(x.flatten().tolist()) for x in ref}) == len(ref)  # the micro-batches differ


def test_image_order_depends_only_on_micro_batches_per_step():
    def keys(world: int, G: int) -> list:
        out = {}
        for rank in range(world):
            for step in range(STEPS):
                for m in range(G):  # the trainer's loader: micro-batch index step * G + m of this rank
                    out[(step * G + m) * world + rank] = train_sample_keys(40, B, step * G + m, 3, rank, world)
        return [out[g] for g in sorted(out)]

    ref = keys(1, 4)
    for world, G in LAYOUTS[1:]:
        assert keys(world, G) == ref, (world, G)
