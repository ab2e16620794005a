"""The DeepSpeed engine with expert parallelism, on gloo ranks, against one process.

- The global gradient norm under EP equals the single-process norm of the same model and global
  batch, and the clipped SGD update equals the single-process update (ZeRO 0 and 2).
- A checkpoint keeps every rank's experts and optimiser state; it reloads at another EP degree
  (weights only).
"""

import os
from pathlib import Path

import pytest
import torch

from msmoe_dist.checkpoint import Checkpointer, CheckpointMeta, load_full_weights, read_meta
from msmoe_dist.config import load_config
from msmoe_dist.data import train_batch
from msmoe_dist.models.build import build_model
from msmoe_dist.moe import is_expert_param
from msmoe_dist.parallel import ParallelLayout, is_expert_key
from msmoe_dist.parallel.runtime import Runtime
from msmoe_dist.train.trainer import build_engine, local_expert_ids

V, B, S = 60, 2, 8


def _cfg(*extra):
    return load_config(
        None,
        [
            "model.num_layers=2",
            "model.d_model=16",
            "model.num_heads=2",
            "model.max_seq_len=8",
            "data.seq_len=8",
            f"data.batch_size={B}",
            "moe.num_experts=8",
            "moe.expert_ffn_dim=16",
            "moe.z_loss_coef=0.001",
            "momentum.kind=heavy_ball",
            "optim.name=sgd",
            "optim.beta1=0.0",
            "optim.lr=0.5",
            "optim.grad_clip=0.05",
            "parallel.engine=deepspeed",
            "train.max_steps=10",
            *extra,
        ],
    )


def _model(cfg):
    torch.manual_seed(cfg.train.seed)
    return build_model(cfg.model, cfg.moe, cfg.momentum, cfg.vision, V)


def _engine(cfg, rank, world, init=None):
    """What msmoe-train does: build this rank's experts on one device from the seed (or load their slice
    of full weights), then parallelise."""
    runtime = Runtime(rank, world, rank, torch.device("cpu"))
    runtime.start_distributed(cfg.parallel)
    local = local_expert_ids(cfg, "deepspeed", runtime)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, cfg.moe, cfg.momentum, cfg.vision, V, local)
    if init is not None:
        model.load_state_dict(
            {n: t[local.start : local.stop] if local and is_expert_key(n) else t for n, t in init.items()}
        )
    return build_engine(cfg, "deepspeed", runtime, model)


STREAM = torch.randint(0, V, (5000,), generator=torch.Generator().manual_seed(0))


def _norm_worker(rank, world, ep, stage, gas):
    cfg = _cfg(f"parallel.ep_size={ep}", f"parallel.zero_stage={stage}", f"train.grad_accum_steps={gas}")
    eng = _engine(cfg, rank, world)
    micro = [train_batch(STREAM, m, B, S, 0, rank, world) for m in range(gas)]
    res = eng.train_step(micro, collect_stats=False)
    # single process, all experts, the global batch (every rank's micro-batch)
    ref = _model(cfg)
    before = {n: p.detach().clone() for n, p in ref.named_parameters()}
    losses = []
    for r in range(world):
        for m in range(gas):
            x, y = train_batch(STREAM, m, B, S, 0, r, world)
            out = ref(x, y)
            losses.append(out.loss + out.aux_loss)
    (sum(losses) / len(losses)).backward()  # the mean over the global batch
    ref_norm = float(torch.nn.utils.clip_grad_norm_(ref.parameters(), cfg.optim.grad_clip))
    assert abs(res.grad_norm - ref_norm) <= 1e-5 * ref_norm, (res.grad_norm, ref_norm)
    assert ref_norm > cfg.optim.grad_clip  # clipping was active
    lay, per = ParallelLayout(world, ep), 8 // ep
    mine = dict(eng.model.named_parameters())
    for n, p in ref.named_parameters():
        expect = before[n] - cfg.optim.lr * p.grad
        if is_expert_param(p):
            expect = expect[lay.ep_rank(rank) * per : (lay.ep_rank(rank) + 1) * per]
        torch.testing.assert_close(mine[n].detach(), expect, rtol=1e-5, atol=1e-6, msg=lambda m: f"{n}: {m}")
    return res.grad_norm


@pytest.mark.parametrize("world,ep,stage,gas", [(2, 2, 0, 1), (2, 2, 2, 1), (4, 2, 1, 1), (2, 2, 2, 2)])
def test_global_grad_norm_and_update_equal_single_process(world, ep, stage, gas, run_distributed):
    norms = run_distributed(_norm_worker, world, ep, stage, gas, timeout_s=300)
    assert len(set(norms)) == 1  # every rank reports the same global norm


def _ckpt_worker(rank, world, root):
    root = Path(root)
    cfg = _cfg("parallel.ep_size=2", "parallel.zero_stage=1", "optim.name=adamw", "optim.lr=0.01")
    eng = _engine(cfg, rank, world)
    for step in range(2):
        eng.train_step([train_batch(STREAM, step, B, S, 0, rank, world)], collect_stats=False)
    meta = CheckpointMeta(2, eng.layout_meta(), {}, {"vocab_size": V})
    step_dir = Checkpointer(root, 2, eng.is_main, eng.barrier).save(meta, eng, "")
    before = {n: p.detach().clone() for n, p in eng.model.named_parameters()}
    nxt = [train_batch(STREAM, 2, B, S, 0, rank, world)]
    eng.train_step(nxt, collect_stats=False)
    after_one = {n: p.detach().clone() for n, p in eng.model.named_parameters()}

    # a fresh engine from another seed, then load: every rank gets its own experts back
    other = _engine(
        _cfg("parallel.ep_size=2", "parallel.zero_stage=1", "optim.name=adamw", "optim.lr=0.01", "train.seed=7"),
        rank,
        world,
    )
    assert read_meta(step_dir).step == 2
    other.load_files(step_dir, read_meta(step_dir))
    for n, p in other.model.named_parameters():
        assert torch.equal(p.detach(), before[n]), f"rank {rank} {n} differs after load"
    other.train_step(nxt, collect_stats=False)  # optimiser state restored too: the next step matches
    for n, p in other.model.named_parameters():
        torch.testing.assert_close(p.detach(), after_one[n], rtol=0, atol=0, msg=lambda m: f"{n}: {m}")

    # weights only, at other EP degrees with the same 8 experts
    full, _ = load_full_weights(step_dir)
    lay2 = ParallelLayout(world, 2)
    for n, p in before.items():
        if is_expert_key(n):
            r0 = lay2.ep_rank(rank) * 4
            assert torch.equal(full[n][r0 : r0 + 4], p), n
    # one rank's slice at another EP degree (within one shard file, across two, all): only those experts come back
    for part in (range(0, 2), range(6, 8), range(2, 6), range(0, 8)):
        sliced, _ = load_full_weights(step_dir, part)
        assert sliced.keys() == full.keys()
        for n, t in sliced.items():
            assert torch.equal(t, full[n][part.start : part.stop] if is_expert_key(n) else full[n]), (part, n)
    for ep in (1, 4):
        e = _engine(_cfg(f"parallel.ep_size={ep}", "parallel.zero_stage=1"), rank, world, init=full)
        per, r = 8 // ep, ParallelLayout(world, ep).ep_rank(rank)
        for n, p in e.model.named_parameters():
            expect = full[n][r * per : (r + 1) * per] if is_expert_key(n) else full[n]
            assert torch.equal(p.detach(), expect), f"ep {ep} rank {rank} {n}"
    return sorted(os.listdir(step_dir))


def test_checkpoint_keeps_every_rank_experts_and_reshards(tmp_path, run_distributed):
    files = run_distributed(_ckpt_worker, 4, str(tmp_path), timeout_s=400)[0]
    assert {"experts_ep000.pt", "experts_ep001.pt", "complete.json"} <= set(files)
    assert {f"rank{r:05d}.pt" for r in range(4)} <= set(files)
    assert (tmp_path / "latest").read_text().strip() == "step_00000002"
