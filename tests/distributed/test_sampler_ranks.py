"""data.sampler=sequential on 2 real gloo ranks: disjoint per-rank shards, one epoch reads every window
exactly once, and a restarted run (fresh processes, starting at step k) reads the windows the
uninterrupted run read; then the trainer itself, checkpointed at step k and resumed, reproduces the
uninterrupted run's metrics trace.

The stream holds its own positions (stream[i] = i), so a window's tokens say where it was cut.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist

from msmoe_dist.config.schema import DataConfig
from msmoe_dist.data import training_batch
from msmoe_dist.data.batches import sequential_layout

WORLD, B, S = 2, 3, 5
N_TOKENS = WORLD * B * 4 * S + 1 + 13  # 4 windows per lane, plus 13 tokens: some are never read
G = 2  # micro-batches per step (train.grad_accum_steps): micro-batch index = step * G + m
STEPS = 7  # 14 micro-batches = 3.5 epochs of 4 windows


def _draw(rank: int, world: int, steps: range) -> torch.Tensor:
    """This rank's windows (inputs plus the last target: S+1 tokens) for `steps`, as the trainer's
    LM task asks for them: [len(steps), G, B, S+1]."""
    cfg = DataConfig(sampler="sequential", batch_size=B, seq_len=S)
    stream = torch.arange(N_TOKENS)
    out = []
    for step in steps:
        micro = [training_batch(cfg, stream, step * G + m, 0, rank, world) for m in range(G)]
        for x, y in micro:
            assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one
        out.append(torch.stack([torch.cat([x, y[:, -1:]], dim=1) for x, y in micro]))
    return torch.stack(out)


def _gather(mine: torch.Tensor, world: int) -> torch.Tensor:
    """[world, ...]: every rank's tensor, on every rank."""
    parts = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(parts, mine)
    return torch.stack(parts)


def _sampler_worker(rank: int, world: int, first_steps: tuple[int, ...]) -> list[list] | None:
    """Every rank's windows from each of `first_steps` to STEPS: [world, steps, G, B, S+1] each, as
    nested lists (a tensor sent through the harness's queue is shared by file descriptor, which
    fails if the rank exits before the parent has read it)."""
    everyone = [_gather(_draw(rank, world, range(k, STEPS)), world) for k in first_steps]
    if rank != 0:
        return None
    if first_steps[0] == 0:
        _check_epochs(everyone[0])
    return [t.tolist() for t in everyone]


def _check_epochs(windows: torch.Tensor) -> None:
    """On rank 0, all ranks' windows of an uninterrupted run from step 0."""
    lane_len, per_lane = sequential_layout(N_TOKENS, B, S, WORLD)
    assert per_lane == 4
    micro = windows.flatten(1, 2)  # [world, micro-batch index, B, S+1], micro-batch index = step * G + m
    expected_starts = sorted(lane * lane_len + w * S for lane in range(WORLD * B) for w in range(per_lane))
    for epoch in range(micro.shape[1] // per_lane):
        ep = micro[:, epoch * per_lane : (epoch + 1) * per_lane]  # [world, per_lane, B, S+1]
        targets = [set(ep[r, :, :, 1:].flatten().tolist()) for r in range(WORLD)]
        # (a) the ranks never read the same target within an epoch: rank r reads only inside its own
        # contiguous shard, lanes r*B .. r*B+B-1, i.e. positions (r*B*lane_len, (r+1)*B*lane_len]
        assert not targets[0] & targets[1]
        for r in range(WORLD):
            assert r * B * lane_len < min(targets[r]) and max(targets[r]) <= (r + 1) * B * lane_len
        # (b) together they cut every window of the stream exactly once, nothing more
        starts = sorted(ep[..., 0].flatten().tolist())
        assert starts == expected_starts
        assert len(targets[0]) + len(targets[1]) == WORLD * B * per_lane * S
        if epoch:  # a new epoch re-reads the first one's windows in the same order
            torch.testing.assert_close(ep, micro[:, :per_lane], rtol=0, atol=0)
    # the last lane's last window ends short of the stream: each lane's lane_len mod S last targets and
    # the stream's last (N_TOKENS - 1) mod (WORLD * B) tokens are never read
    assert int(micro.max()) == (WORLD * B - 1) * lane_len + per_lane * S < N_TOKENS - 1


def test_two_ranks_disjoint_exact_cover_and_restart_matches(run_distributed):
    timeouts = dict(timeout_s=120, collective_timeout_s=60)
    uninterrupted = torch.tensor(run_distributed(_sampler_worker, WORLD, (0,), **timeouts)[0][0])
    assert uninterrupted.shape == (WORLD, STEPS, G, B, S + 1)
    # (c) a restart: fresh processes that start at step k, mid-epoch (micro-batch 6 of 4-window epochs)
    # or at an epoch boundary (micro-batch 8)
    ks = (3, 4)
    for k, restarted in zip(ks, run_distributed(_sampler_worker, WORLD, ks, **timeouts)[0]):
        torch.testing.assert_close(torch.tensor(restarted), uninterrupted[:, k:], rtol=0, atol=0)


# ------------------------------------------------------------------------------------------
# the trainer: checkpoint at step k, resume, same metrics


def _train_args(root: Path, run: str, *extra: str) -> list[str]:
    return [
        f"train.run_dir={root / run}",
        f"data.path={root / 'data'}",
        "data.kind=synthetic",
        "data.synthetic_lines=400",
        "data.sampler=sequential",
        "data.batch_size=2",
        "data.seq_len=16",
        "model.num_layers=2",
        "model.d_model=32",
        "model.num_heads=2",
        "model.max_seq_len=16",
        "model.dropout=0.1",
        "moe.num_experts=4",
        "moe.expert_ffn_dim=32",
        "momentum.kind=heavy_ball",
        "parallel.engine=deepspeed",
        "parallel.ep_size=2",
        "parallel.zero_stage=1",
        "parallel.timeout_s=60",
        "optim.schedule=constant",
        "optim.warmup_steps=0",
        "train.progress=false",
        "train.eval_every=0",
        "train.eval_batches=1",
        "logging.log_every=1",
        "logging.tensorboard=false",
        "checkpoint.every_steps=3",
        *extra,
    ]


def _trainer_worker(rank: int, world: int, root: str) -> list | None:
    from msmoe_dist.config import load_config
    from msmoe_dist.train.trainer import run

    root = Path(root)
    run(load_config(None, _train_args(root, "full", "train.max_steps=6")))
    run(load_config(None, _train_args(root, "part", "train.max_steps=3")))
    run(load_config(None, _train_args(root, "part", "train.max_steps=6", "train.resume=true")))
    if rank != 0:
        return None

    def trace(run_name):
        rows = map(json.loads, (root / run_name / "metrics.jsonl").read_text().splitlines())
        return [(r["step"], r["loss"], r["grad_norm"]) for r in rows if "loss" in r]

    return [trace("full"), trace("part")]


def test_trainer_resume_with_sequential_sampler_matches_uninterrupted(tmp_path, run_distributed):
    full, part = run_distributed(_trainer_worker, WORLD, str(tmp_path), timeout_s=240, collective_timeout_s=60)[0]
    assert [s for s, _, _ in full] == list(range(1, 7))
    assert part == full  # steps 4..6 after the resume read the same windows, bit for bit
