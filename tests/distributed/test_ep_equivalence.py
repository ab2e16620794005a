"""Expert parallelism over gloo equals one process holding every expert (outputs and gradients).

Each rank builds the full reference model from a shared seed, and a copy of it to which
apply_expert_parallel gives this rank's expert slice and the all-to-all dispatcher. Expected values per rank r:
  outputs, input grads, dense (router, attention, ...) grads: the reference on r's tokens alone;
  grads of r's experts: the sum over r's EP group of the reference grads (every rank of the EP
  group sends tokens to r's experts; averaging over EDP replicas comes later, in the optimiser).
"""

import itertools

import pytest
import torch

from msmoe_dist.config.schema import ModelConfig, MoEConfig, MomentumConfig
from msmoe_dist.models import MoELanguageModel
from msmoe_dist.moe import MoELayer, is_expert_param
from msmoe_dist.parallel import CommStats, ParallelLayout, apply_expert_parallel, build_process_groups
from msmoe_dist.parallel.all_to_all import COUNTS, TOKENS_BACKWARD, TOKENS_FORWARD

E, D = 8, 16
TOL = dict(rtol=1e-5, atol=1e-6)


def _expert_grad_slice(full_grads, name, lay, rank):
    per = E // lay.ep_size
    r0 = lay.ep_rank(rank) * per
    return full_grads[name][r0 : r0 + per]


def _check_grads(model, ref_grads_mine, ref_grads_group, lay, rank, label):
    for name, p in model.named_parameters():
        if is_expert_param(p):
            torch.testing.assert_close(
                p.grad,
                _expert_grad_slice(ref_grads_group, name, lay, rank),
                **TOL,
                msg=lambda m: f"{label} {name}: {m}",
            )
        else:
            torch.testing.assert_close(p.grad, ref_grads_mine[name], **TOL, msg=lambda m: f"{label} {name}: {m}")


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _layer_cases(rank, world, ep_size, groups, lay):
    results = []
    for top_k, cf, dead in itertools.product([1, 2], [0.0, 1.0], [False, True]):
        cfg = MoEConfig(num_experts=E, top_k=top_k, expert_ffn_dim=24, capacity_factor=cf)
        torch.manual_seed(0)
        ref = MoELayer(D, cfg)
        xs = [torch.randn(12, D, generator=torch.Generator().manual_seed(100 + s)) for s in range(world)]
        if dead:
            # Experts of the last EP rank are unreachable: it receives zero tokens and must not hang.
            xs = [x.abs() for x in xs]
            with torch.no_grad():
                ref.router.weight.abs_()
                ref.router.weight[E - E // ep_size :] = -1.0
        gs = [torch.randn(12, D, generator=torch.Generator().manual_seed(200 + s)) for s in range(world)]
        ep = MoELayer(D, cfg)
        ep.load_state_dict(ref.state_dict())
        apply_expert_parallel(ep, groups)
        x = xs[rank].clone().requires_grad_()
        out = ep(x, collect_stats=True)
        (out.out * gs[rank]).sum().backward()
        # reference: mine alone, then the sum over my EP group
        ref_group = {}
        for s in lay.ep_group_of(rank):
            ref.zero_grad()
            xr = xs[s].clone().requires_grad_()
            ro = ref(xr)
            (ro.out * gs[s]).sum().backward()
            g = _grads(ref)
            for k, v in g.items():
                ref_group[k] = ref_group.get(k, 0) + v
            if s == rank:
                mine, ref_out, ref_xgrad = g, ro.out.detach(), xr.grad
        label = f"layer top_k={top_k} cf={cf} dead={dead}"
        torch.testing.assert_close(out.out, ref_out, **TOL, msg=lambda m: f"{label} out: {m}")
        ref_stats = ref(xs[rank], collect_stats=True).stats
        assert out.stats.routed_per_expert == ref_stats.routed_per_expert, label
        assert out.stats.num_dropped == ref_stats.num_dropped, label
        torch.testing.assert_close(
            torch.tensor(out.stats.expert_out_norm), torch.tensor(ref_stats.expert_out_norm), **TOL
        )
        torch.testing.assert_close(x.grad, ref_xgrad, **TOL, msg=lambda m: f"{label} x.grad: {m}")
        _check_grads(ep, mine, ref_group, lay, rank, label)
        results.append(label)
    return results


def _lm_cases(rank, world, ep_size, groups, lay):
    bytes_by_case, comm = {}, CommStats()
    cases = [(k, cf, "pre_ln") for k in ("none", "heavy_ball", "adam", "robust") for cf in (0.0, 1.0)]
    for kind, cf, style in [*cases, ("heavy_ball", 0.0, "reference")]:
        mcfg = ModelConfig(num_layers=3, d_model=D, num_heads=2, max_seq_len=8, block_style=style)
        moe = MoEConfig(
            num_experts=E, top_k=2, expert_ffn_dim=24, capacity_factor=cf, balance_loss_coef=0.01, z_loss_coef=0.001
        )
        mom = MomentumConfig(kind=kind)
        torch.manual_seed(0)
        ref = MoELanguageModel(mcfg, moe, mom, 40)
        torch.manual_seed(0)  # built once from the seed, as a one-process run; then made expert parallel
        ep = MoELanguageModel(mcfg, moe, mom, 40)
        comm.reset()
        apply_expert_parallel(ep, groups, comm)
        toks = [torch.randint(0, 40, (2, 9), generator=torch.Generator().manual_seed(300 + s)) for s in range(world)]
        out = ep(toks[rank][:, :-1], toks[rank][:, 1:])
        (out.loss + out.aux_loss).backward()
        ref_group = {}
        for s in lay.ep_group_of(rank):
            ref.zero_grad()
            ro = ref(toks[s][:, :-1], toks[s][:, 1:])
            (ro.loss + ro.aux_loss).backward()
            g = _grads(ref)
            for k, v in g.items():
                ref_group[k] = ref_group.get(k, 0) + v
            if s == rank:
                mine, ref_loss = g, ro.loss.detach()
        label = f"lm kind={kind} cf={cf} style={style}"
        torch.testing.assert_close(out.loss.detach(), ref_loss, **TOL, msg=lambda m: f"{label} loss: {m}")
        _check_grads(ep, mine, ref_group, lay, rank, label)
        bytes_by_case[(kind, cf, style)] = comm[TOKENS_FORWARD].bytes
        # The backward all-to-alls send exactly as many rows back; counts are exchanged only when dropless.
        assert comm[TOKENS_BACKWARD].bytes == comm[TOKENS_FORWARD].bytes, label
        assert comm[TOKENS_FORWARD].calls == 3 * 2 and comm[COUNTS].calls == (3 if cf == 0.0 else 0), label
    return bytes_by_case


def _worker(rank, world, ep_size):
    torch.use_deterministic_algorithms(False)
    lay = ParallelLayout(world, ep_size)
    groups = build_process_groups(lay, rank)
    layer = _layer_cases(rank, world, ep_size, groups, lay)
    lm = _lm_cases(rank, world, ep_size, groups, lay)
    return {"layer": layer, "bytes": lm}


@pytest.mark.parametrize("world,ep_size", [(2, 2), (4, 4), (4, 2)])
def test_expert_parallel_equals_single_process(world, ep_size, run_distributed):
    results = run_distributed(_worker, world, ep_size, timeout_s=300)
    assert all(len(r["layer"]) == 8 for r in results)
    # Momentum stays home: only token rows cross the all-to-alls, whatever the momentum variant.
    # Dropless: each rank sends its T*K rows out and returns the rows it received, so summed over
    # ranks the payload is 3 layers x 2 directions x world x T*K rows x D x 4 bytes for every variant.
    # Capacity mode: fixed-size exchanges, so every rank's payload is the same for every variant.
    kinds = ("none", "heavy_ball", "adam", "robust")
    expected = 3 * 2 * world * (2 * 8 * 2) * D * 4
    for kind in kinds:
        assert sum(r["bytes"][(kind, 0.0, "pre_ln")] for r in results) == expected, kind
    for r in results:
        assert {r["bytes"][(k, 1.0, "pre_ln")] for k in kinds} == {r["bytes"][("none", 1.0, "pre_ln")]}
