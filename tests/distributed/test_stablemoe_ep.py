"""StableMoE under expert parallelism (2 gloo ranks) equals one process holding every expert.

As in test_ep_equivalence: each rank builds the full reference from a shared seed, and the EP copy
the same way, then apply_expert_parallel keeps its expert slice. Per rank r, outputs, losses and
non-expert gradients equal the reference on r's tokens alone; expert gradients equal the sum of the
reference's over the EP group.
Both stages: stage 1 (backbone routing, balance + distillation losses) and stage 2 (the frozen
distilled router, whose parameters must get no gradient on any rank).
"""

import pytest
import torch

from msmoe_dist.config.schema import ModelConfig, MoEConfig, MomentumConfig
from msmoe_dist.models import MoELanguageModel
from msmoe_dist.moe import MoELayer, is_expert_param
from msmoe_dist.parallel import ParallelLayout, apply_expert_parallel, build_process_groups

E, D, V = 4, 16, 40
TOL = dict(rtol=1e-5, atol=1e-6)
SWITCH = 5


def _cfg(cf):
    return MoEConfig(
        router="stablemoe",
        num_experts=E,
        top_k=1,
        expert_ffn_dim=24,
        capacity_factor=cf,
        stable_switch_step=SWITCH,
        stable_distill_dim=8,
    )


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _check(model, mine, group, lay, rank, label):
    per = E // lay.ep_size
    r0 = lay.ep_rank(rank) * per
    for name, p in model.named_parameters():
        if name not in mine:
            assert p.grad is None, f"{label} {name}: has a gradient the reference does not"
            continue
        want = group[name][r0 : r0 + per] if is_expert_param(p) else mine[name]
        torch.testing.assert_close(p.grad, want, **TOL, msg=lambda m: f"{label} {name}: {m}")


def _run_pair(ref, ep, forward, inputs, rank, lay):
    """forward(model, inputs) -> (value to compare, scalar to backprop).

    Returns (value, mine, group) of the reference."""
    ep_val, ep_loss = forward(ep, inputs[rank])
    ep_loss.backward()
    group = {}
    for s in lay.ep_group_of(rank):
        ref.zero_grad(set_to_none=True)
        val, loss = forward(ref, inputs[s])
        loss.backward()
        g = _grads(ref)
        for k, v in g.items():
            group[k] = group.get(k, 0) + v
        if s == rank:
            mine, ref_val = g, val.detach()
    return ep_val, ref_val, mine, group


def _worker(rank, world, ep_size):
    lay = ParallelLayout(world, ep_size)
    groups = build_process_groups(lay, rank)
    done = []
    for step, cf in [(0, 0.0), (0, 1.0), (SWITCH, 0.0), (SWITCH + 3, 1.0)]:
        # The layer alone.
        torch.manual_seed(0)
        ref = MoELayer(D, _cfg(cf), vocab_size=V)
        torch.manual_seed(0)
        ep = MoELayer(D, _cfg(cf), vocab_size=V)
        apply_expert_parallel(ep, groups)
        for m in (ref, ep):
            m.router.set_step(step)
        xs = [torch.randn(2, 6, D, generator=torch.Generator().manual_seed(100 + s)) for s in range(world)]
        toks = [torch.randint(0, V, (2, 6), generator=torch.Generator().manual_seed(200 + s)) for s in range(world)]
        gs = [torch.randn(2, 6, D, generator=torch.Generator().manual_seed(300 + s)) for s in range(world)]

        def layer_fwd(m, s):
            out = m(xs[s], collect_stats=True, token_ids=toks[s])
            return out.out, (out.out * gs[s]).sum() + out.aux_loss

        ep_out, ref_out, mine, group = _run_pair(ref, ep, layer_fwd, list(range(world)), rank, lay)
        label = f"layer step={step} cf={cf}"
        torch.testing.assert_close(ep_out, ref_out, **TOL, msg=lambda m: f"{label} out: {m}")
        _check(ep, mine, group, lay, rank, label)
        if step >= SWITCH:
            assert ep.router.distill_emb.grad is None and ep.router.distill_centroids.grad is None

        # The language model, with and without momentum.
        for kind in ("none", "heavy_ball"):
            mcfg = ModelConfig(num_layers=3, d_model=D, num_heads=2, max_seq_len=8, layout="middle")
            torch.manual_seed(0)
            ref = MoELanguageModel(mcfg, _cfg(cf), MomentumConfig(kind=kind), V)
            torch.manual_seed(0)
            ep = MoELanguageModel(mcfg, _cfg(cf), MomentumConfig(kind=kind), V)
            apply_expert_parallel(ep, groups)
            for m in (ref, ep):
                m.set_step(step)
            seqs = [torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(400 + s)) for s in range(world)]

            def lm_fwd(m, s):
                out = m(seqs[s][:, :-1], seqs[s][:, 1:])
                return torch.stack([out.loss, out.aux_loss]), out.loss + out.aux_loss

            ep_val, ref_val, mine, group = _run_pair(ref, ep, lm_fwd, list(range(world)), rank, lay)
            label = f"lm kind={kind} step={step} cf={cf}"
            torch.testing.assert_close(ep_val.detach(), ref_val, **TOL, msg=lambda m: f"{label} loss: {m}")
            _check(ep, mine, group, lay, rank, label)
            done.append(label)
    return done


@pytest.mark.parametrize("world,ep_size", [(2, 2)])
def test_stablemoe_expert_parallel_equals_single_process(world, ep_size, run_distributed):
    results = run_distributed(_worker, world, ep_size, timeout_s=300)
    assert all(len(r) == 8 for r in results)
