"""moe.overlap_chunks > 1 (the all-to-all pipelined with the experts, parallel/overlap.py) equals the blocking
exchange (overlap_chunks = 1) on 2 gloo ranks: outputs, input gradients and every parameter's gradient, for
a MoE layer (dropless and capacity mode, a rank whose experts receive no rows, 2 and 3 chunks, more chunks
than some blocks have rows, evaluation without a graph) and for a language model with every momentum kind.

Mutation checks (by hand, recorded in the note of the change): sending chunk c's return with the forward
splits swapped, or dropping one chunk's parameter gradient in `_PipelinedExperts.backward`, fails this file.
"""

import itertools

import pytest
import torch

from msmoe_dist.config.schema import ModelConfig, MoEConfig, MomentumConfig
from msmoe_dist.models import MoELanguageModel
from msmoe_dist.moe import MoELayer
from msmoe_dist.parallel import CommStats, ParallelLayout, apply_expert_parallel, build_process_groups
from msmoe_dist.parallel.all_to_all import TOKENS_FORWARD
from msmoe_dist.parallel.overlap import CHUNK_BACKWARD, CHUNK_FORWARD

E, D = 8, 16
TOL = dict(rtol=1e-5, atol=1e-6)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _same(a, b, label):
    torch.testing.assert_close(a, b, **TOL, msg=lambda m: f"{label}: {m}")


def _layer_cases(rank, groups):
    done = []
    for cf, chunks, dead in itertools.product([0.0, 1.0], [2, 3], [False, True]):
        cfg = MoEConfig(num_experts=E, top_k=2, expert_ffn_dim=24, capacity_factor=cf)
        torch.manual_seed(0)
        blocking = MoELayer(D, cfg)
        x = torch.randn(10, D, generator=torch.Generator().manual_seed(100 + rank))
        if dead:  # rank 1's experts are unreachable: it receives no rows in any chunk and must not hang
            x = x.abs()
            with torch.no_grad():
                blocking.router.weight.abs_()
                blocking.router.weight[E // 2 :] = -1.0
        g = torch.randn(10, D, generator=torch.Generator().manual_seed(200 + rank))
        overlapped = MoELayer(D, MoEConfig(**{**cfg.__dict__, "overlap_chunks": chunks}))
        overlapped.load_state_dict(blocking.state_dict())
        comm = CommStats()
        apply_expert_parallel(blocking, groups)
        apply_expert_parallel(overlapped, groups, comm)
        label = f"layer cf={cf} chunks={chunks} dead={dead}"
        outs, xgrads, grads, stats = [], [], [], []
        for layer in (blocking, overlapped):
            xi = x.clone().requires_grad_()
            o = layer(xi, collect_stats=True)
            (o.out * g).sum().backward()
            outs.append(o.out.detach())
            xgrads.append(xi.grad)
            grads.append(_grads(layer))
            stats.append(o.stats)
        _same(outs[1], outs[0], f"{label} out")
        _same(xgrads[1], xgrads[0], f"{label} x.grad")
        assert grads[1].keys() == grads[0].keys(), label
        for name in grads[0]:
            _same(grads[1][name], grads[0][name], f"{label} {name}.grad")
        assert stats[1].routed_per_expert == stats[0].routed_per_expert, label
        assert stats[1].num_dropped == stats[0].num_dropped, label
        # The overlapped layer ran only chunked exchanges: `chunks` each way per direction.
        assert comm[TOKENS_FORWARD].calls == 0, label
        assert comm[CHUNK_FORWARD].calls == 2 * chunks and comm[CHUNK_BACKWARD].calls == 2 * chunks, label
        with torch.no_grad():  # evaluation: the pipeline without a graph
            _same(overlapped(x).out, blocking(x).out, f"{label} no_grad out")
        done.append(label)
    return done


def _lm_cases(rank, groups):
    done = []
    for kind, cf in itertools.product(("none", "heavy_ball", "adam", "robust"), (0.0, 1.0)):
        mcfg = ModelConfig(num_layers=2, d_model=D, num_heads=2, max_seq_len=8)
        moe = dict(num_experts=E, top_k=2, expert_ffn_dim=24, capacity_factor=cf, balance_loss_coef=0.01)
        toks = torch.randint(0, 40, (2, 9), generator=torch.Generator().manual_seed(300 + rank))
        results = []
        for chunks in (1, 2):
            torch.manual_seed(0)
            model = MoELanguageModel(mcfg, MoEConfig(**moe, overlap_chunks=chunks), MomentumConfig(kind=kind), 40)
            apply_expert_parallel(model, groups)
            out = model(toks[:, :-1], toks[:, 1:])
            (out.loss + out.aux_loss).backward()
            results.append((out.loss.detach(), _grads(model)))
        label = f"lm kind={kind} cf={cf}"
        _same(results[1][0], results[0][0], f"{label} loss")
        for name, g in results[0][1].items():
            _same(results[1][1][name], g, f"{label} {name}.grad")
        done.append(label)
    return done


def _worker(rank, world):
    torch.use_deterministic_algorithms(False)
    groups = build_process_groups(ParallelLayout(world, world), rank)
    return {"layer": _layer_cases(rank, groups), "lm": _lm_cases(rank, groups)}


@pytest.mark.timeout(300)
def test_overlapped_exchange_equals_blocking(run_distributed):
    results = run_distributed(_worker, 2, timeout_s=240)
    assert all(len(r["layer"]) == 8 and len(r["lm"]) == 8 for r in results)
