"""V-MoE under expert parallelism (2 gloo ranks) equals one process holding every expert.

Each rank builds the full reference from a shared seed, and the EP copy the same way, then
apply_expert_parallel keeps its expert slice.
Per rank r: logits and non-expert gradients equal the reference's on r's images alone; expert
gradients equal the sum of the reference's over the EP group. Every momentum variant; dropless and
capacity modes; ranks with different batch sizes (the capacity is agreed across the EP group).
"""

import pytest
import torch

from msmoe_dist.config.loader import load_config
from msmoe_dist.models import VisionMoE
from msmoe_dist.moe import is_expert_param
from msmoe_dist.parallel import ParallelLayout, apply_expert_parallel, build_process_groups

TOL = dict(rtol=1e-5, atol=1e-6)
BASE = [
    "model.kind=vit",
    "data.kind=synthetic_images",
    "vision.image_size=16",
    "vision.patch_size=4",
    "vision.num_classes=7",
    "vision.synthetic_classes=7",
    "model.num_layers=4",
    "model.d_model=16",
    "model.num_heads=2",
    "moe.num_experts=4",
    "moe.expert_ffn_dim=24",
    "moe.gate=softmax_topk",
    "moe.activation=gelu",
    "vision.pooling=gap",
]
CASES = [  # (momentum, capacity factor, images per rank)
    ("none", 0.0, (3, 2)),
    ("heavy_ball", 1.05, (2, 2)),
    ("adam", 0.0, (2, 3)),
    ("robust", 8.0, (3, 1)),
    ("heavy_ball", 8.0, (1, 3)),
]


def _worker(rank, world):
    lay = ParallelLayout(world, 2)
    groups = build_process_groups(lay, rank)
    for kind, cf, sizes in CASES:
        cfg = load_config(None, BASE + [f"momentum.kind={kind}", f"moe.capacity_factor={cf}"])
        parts = (cfg.model, cfg.moe, cfg.momentum, cfg.vision)
        torch.manual_seed(0)
        ref = VisionMoE(*parts)
        torch.manual_seed(0)
        ep = VisionMoE(*parts)
        apply_expert_parallel(ep, groups)
        xs = [torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(10 + s)) for s, n in enumerate(sizes)]
        ys = [torch.randint(0, 7, (n,), generator=torch.Generator().manual_seed(20 + s)) for s, n in enumerate(sizes)]
        label = f"{kind} cf={cf} sizes={sizes}"
        out = ep(xs[rank], ys[rank])
        (out.loss + out.aux_loss).backward()
        group, mine, ref_logits = {}, None, None
        for s in lay.ep_group_of(rank):
            ref.zero_grad(set_to_none=True)
            r = ref(xs[s], ys[s])
            (r.loss + r.aux_loss).backward()
            g = {n: p.grad.clone() for n, p in ref.named_parameters() if p.grad is not None}
            for k, v in g.items():
                group[k] = group.get(k, 0) + v
            if s == rank:
                mine, ref_logits = g, r.logits.detach()
        torch.testing.assert_close(out.logits, ref_logits, **TOL, msg=lambda m: f"{label} logits: {m}")
        for name, p in ep.named_parameters():
            if name not in mine:
                assert p.grad is None, f"{label} {name}: a gradient the reference does not have"
                continue
            want = (
                group[name][lay.ep_rank(rank) * 2 : (lay.ep_rank(rank) + 1) * 2] if is_expert_param(p) else mine[name]
            )
            torch.testing.assert_close(p.grad, want, **TOL, msg=lambda m: f"{label} {name}: {m}")
    return len(CASES)


@pytest.mark.timeout(300)
def test_vmoe_expert_parallel_equals_single_process(run_distributed):
    assert run_distributed(_worker, 2, timeout_s=240, collective_timeout_s=60) == [len(CASES)] * 2
