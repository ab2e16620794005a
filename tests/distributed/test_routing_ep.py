"""Routing options under expert parallelism, on 2 gloo ranks (docs/routing.md).

- Shared experts (top-k routing) and expert-choice routing (with and without shared experts), every
  momentum kind: the EP 2 V-MoE equals ONE process running the concatenation of both ranks' images
  (logits of each rank's images; non-expert gradients summed over the ranks; each rank's expert
  gradients), ranks holding different numbers of images. For expert choice this is the claim that each
  expert picks among every token of the EP group exactly as one process would.
- Bias balancing in the DeepSpeed engine, gradient accumulation 2: EP 2 = EP 1 (bias values exactly,
  losses), each step's loads cover every micro-batch of both ranks once, the bias is the same on every
  rank, and it resumes bit for bit from a checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import torch

from msmoe_dist.checkpoint import Checkpointer, CheckpointMeta
from msmoe_dist.config import load_config
from msmoe_dist.data import train_batch
from msmoe_dist.models import VisionMoE
from msmoe_dist.models.build import build_model
from msmoe_dist.moe import is_expert_param
from msmoe_dist.moe.bias_balance import ExpertBias, expert_biases
from msmoe_dist.parallel import ParallelLayout, apply_expert_parallel, build_process_groups, comm
from msmoe_dist.parallel.runtime import Runtime
from msmoe_dist.train.trainer import build_engine

TOL = dict(rtol=1e-5, atol=1e-6)
VIT = [
    "model.kind=vit",
    "data.kind=synthetic_images",
    "vision.image_size=8",
    "vision.patch_size=4",
    "vision.num_classes=5",
    "vision.synthetic_classes=5",
    "model.num_layers=2",
    "vision.moe_every=1",
    "model.d_model=8",
    "model.num_heads=2",
    "moe.num_experts=4",
    "moe.expert_ffn_dim=8",
    "moe.gate=softmax_topk",
    "vision.pooling=gap",
]
CASES = [  # (momentum kind, overrides)
    ("none", ["moe.num_shared_experts=1", "moe.shared_expert_ffn_dim=6"]),
    ("heavy_ball", ["moe.num_shared_experts=2", "moe.shared_expert_ffn_dim=4"]),
    ("adam", ["moe.num_shared_experts=1", "moe.shared_expert_ffn_dim=6"]),
    ("robust", ["moe.num_shared_experts=1", "moe.shared_expert_ffn_dim=6"]),
    ("none", ["moe.router=expert_choice", "moe.capacity_factor=0.5"]),
    ("heavy_ball", ["moe.router=expert_choice"]),
    ("adam", ["moe.router=expert_choice", "moe.num_shared_experts=1", "moe.shared_expert_ffn_dim=6"]),
    ("robust", ["moe.router=expert_choice", "moe.capacity_factor=2.0", "moe.min_capacity=7"]),
]
SIZES = (3, 2)  # images per rank: 3 * 5 and 2 * 5 tokens (4 patches + nothing: gap pooling -> 4 tokens each)


def _vit_equivalence(rank, world, groups):
    lay = groups.layout
    per = 4 // lay.ep_size
    for kind, extra in CASES:
        cfg = load_config(None, [*VIT, f"momentum.kind={kind}", "momentum.adam_layers=1", *extra])
        parts = (cfg.model, cfg.moe, cfg.momentum, cfg.vision)
        torch.manual_seed(0)
        ref = VisionMoE(*parts)
        torch.manual_seed(0)
        ep = VisionMoE(*parts)
        apply_expert_parallel(ep, groups)
        xs = [torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(10 + s)) for s, n in enumerate(SIZES)]
        ys = [torch.randint(0, 5, (n,), generator=torch.Generator().manual_seed(20 + s)) for s, n in enumerate(SIZES)]
        label = f"{kind} {extra}"
        out = ep(xs[rank], ys[rank], reduction="sum")
        out.loss.backward()
        r = ref(torch.cat(xs), torch.cat(ys), reduction="sum")
        r.loss.backward()
        lo = sum(SIZES[:rank])
        torch.testing.assert_close(out.logits, r.logits[lo : lo + SIZES[rank]], **TOL, msg=lambda m: f"{label}: {m}")
        want = dict(ref.named_parameters())
        for name, p in ep.named_parameters():
            g = want[name].grad
            if is_expert_param(p):
                e0 = lay.ep_rank(rank) * per
                torch.testing.assert_close(p.grad, g[e0 : e0 + per], **TOL, msg=lambda m: f"{label} {name}: {m}")
            elif g is not None:
                total = comm.all_reduce(p.grad.clone(), name="test grads")
                torch.testing.assert_close(total, g, **TOL, msg=lambda m: f"{label} {name}: {m}")
    return len(CASES)


V, B, S, GAS = 50, 2, 8, 2
STREAM = torch.randint(0, V, (4000,), generator=torch.Generator().manual_seed(0))


def _lm_cfg(ep, *extra):
    return load_config(
        None,
        [
            "model.num_layers=2",
            "model.d_model=16",
            "model.num_heads=2",
            "model.max_seq_len=8",
            f"data.seq_len={S}",
            f"data.batch_size={B}",
            "moe.num_experts=4",
            "moe.expert_ffn_dim=16",
            "moe.balance=bias",
            "moe.bias_update_rate=0.0078125",
            "momentum.kind=heavy_ball",
            "optim.lr=0.01",
            "parallel.engine=deepspeed",
            "parallel.zero_stage=1",
            f"parallel.ep_size={ep}",
            f"train.grad_accum_steps={GAS}",
            "train.max_steps=10",
            *extra,
        ],
    )


def _engine(cfg, rank, world):
    runtime = Runtime(rank, world, rank, torch.device("cpu"))
    runtime.start_distributed(cfg.parallel)
    torch.manual_seed(cfg.train.seed)
    return build_engine(cfg, "deepspeed", runtime, build_model(cfg.model, cfg.moe, cfg.momentum, cfg.vision, V))


def _micro(step, rank, world):
    return [train_batch(STREAM, step * GAS + m, B, S, 0, rank, world) for m in range(GAS)]


def _biases(eng):
    return [b.bias.detach().clone() for b in expert_biases(eng.model)]


def _bias_runs(rank, world, root):
    loads: list[int] = []
    real = ExpertBias.apply_update

    def spy(self, load_E):
        loads.append(int(load_E.sum()))
        real(self, load_E)

    ExpertBias.apply_update = spy
    results = {}
    for ep in (1, 2):
        eng = _engine(_lm_cfg(ep), rank, world)
        losses = [eng.train_step(_micro(step, rank, world), collect_stats=False).loss for step in range(3)]
        results[ep] = (losses, _biases(eng))
    ExpertBias.apply_update = real
    (l1, b1), (l2, b2) = results[1], results[2]
    torch.testing.assert_close(torch.tensor(l1), torch.tensor(l2), rtol=1e-5, atol=0)
    assert all(torch.equal(a, b) for a, b in zip(b1, b2, strict=True)), (b1, b2)
    assert all(b.abs().sum() > 0 for b in b2)
    others = comm.all_gather(torch.cat(b2), name="test biases")
    assert all(torch.equal(o, others[0]) for o in others)

    # checkpoint at step 2, one more step; a fresh engine (other seed) loads it and takes the same step
    eng = _engine(_lm_cfg(2), rank, world)
    for step in range(2):
        eng.train_step(_micro(step, rank, world), collect_stats=False)
    saved = _biases(eng)
    step_dir = Checkpointer(Path(root), 2, eng.is_main, eng.barrier).save(
        CheckpointMeta(2, eng.layout_meta(), {}, {"vocab_size": V}), eng, ""
    )
    loss3 = eng.train_step(_micro(2, rank, world), collect_stats=False).loss
    after3 = _biases(eng)
    other = _engine(_lm_cfg(2, "train.seed=7"), rank, world)
    other.load_files(step_dir, None)
    assert all(torch.equal(a, b) for a, b in zip(_biases(other), saved, strict=True))
    assert other.train_step(_micro(2, rank, world), collect_stats=False).loss == loss3
    assert all(torch.equal(a, b) for a, b in zip(_biases(other), after3, strict=True))
    return loads


def _worker(rank, world, root):
    groups = build_process_groups(ParallelLayout(world, 2), rank)
    n = _vit_equivalence(rank, world, groups)
    return n, _bias_runs(rank, world, root)


def test_routing_options_under_expert_parallelism(tmp_path, run_distributed):
    results = run_distributed(_worker, 2, str(tmp_path), timeout_s=400)
    for n, loads in results:
        assert n == len(CASES)
        # 2 layers x 3 steps x 2 EP degrees: every step's loads = ranks * micro-batches * tokens * top_k
        assert loads == [2 * GAS * B * S * 2] * (2 * 3 * 2), loads
