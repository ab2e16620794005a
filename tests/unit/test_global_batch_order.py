"""The global batch of a step depends on the run's data layout (the world size D it started with), not on
the world size at hand: any (world size W, grad_accum G) with the same W * G and data.batch_size reads the
same samples, forward by forward (random and sequential LM samplers, the ImageNet order). A run that never
changed its world size reads exactly what it always read (micro-batch step * G + m of rank r of W)."""

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


def _lm_task(sampler: str, world: int, rank: int, G: int, start: int, data_world: int) -> LMTask:
    task = LMTask(None, DataConfig(sampler=sampler, batch_size=B, seq_len=S), TrainConfig(grad_accum_steps=G, seed=5))  # type: ignore[arg-type]
    task.train_ids = STREAM
    task.start(start, rank, world, data_world)
    return task


def _global_order(sampler: str, world: int, G: int, data_world: int, start: int = 0) -> list[torch.Tensor]:
    """Every forward's input tokens of steps start..STEPS-1, by (step, forward index m * world + rank)."""
    by_index = {}
    for rank in range(world):
        task = _lm_task(sampler, world, rank, G, start, data_world)
        for step in range(start, STEPS):
            micro, units = task.micro_batches(step)
            assert units == B * S * G * world
            for m, (x, _) in enumerate(micro):
                by_index[(step * G + m) * world + rank] = x
    return [by_index[g] for g in sorted(by_index)]


@pytest.mark.parametrize("sampler", ["random", "sequential"])
@pytest.mark.parametrize("data_world", [1, 2, 4])
def test_lm_order_depends_only_on_micro_batches_per_step(sampler, data_world):
    cfg = DataConfig(sampler=sampler, batch_size=B, seq_len=S)
    G0 = 4 // data_world
    ref = _global_order(sampler, data_world, G0, data_world)  # a run that started at world data_world
    # ... reads what the trainer always read there: micro-batch step * G + m of rank r (golden traces)
    old = {
        (s * G0 + m) * data_world + r: training_batch(cfg, STREAM, s * G0 + m, 5, r, data_world)[0]
        for s in range(STEPS)
        for m in range(G0)
        for r in range(data_world)
    }
    assert all(torch.equal(a, old[i]) for i, a in enumerate(ref))
    for world, G in LAYOUTS:
        # resumed at step 2 under another layout: the uninterrupted run's later token ids, forward by forward
        resumed = _global_order(sampler, world, G, data_world, start=2)
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
