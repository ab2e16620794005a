"""Dispatch/combine, capacity drops, stats and the whole layer against independent references."""

import math

import pytest
import torch
import torch.nn.functional as F

from msmoe_dist.config.schema import MoEConfig
from msmoe_dist.moe import Combined, Dispatcher, LocalDispatcher, MoELayer, Routing, compute_stats, expert_capacity
from msmoe_dist.moe.dispatcher import run_blocking


def hand_routing(experts, weights, E) -> Routing:
    experts_TK = torch.tensor(experts)
    z = torch.zeros(())
    return Routing(
        experts_TK=experts_TK,
        weights_TK=weights,
        logits_TE=torch.zeros(len(experts), E),
        probs_TE=torch.full((len(experts), E), 1.0 / E),
        balance_loss=z,
        z_loss=z,
        aux_loss=z,
    )


# Capacity case: T=6, K=2, E=3, capacity 2.  Priority = all first choices in token order,
# then all second choices.  Expert 0 gets first choices t0 t1 t2 t4 and second choice t3:
# keeps t0 t1.  Expert 1 gets first choice t3, second choices t0 t2 t4 t5: keeps t3, t0.
# Expert 2 gets t5 (first) and t1 (second): keeps both.  6 of 12 dropped; t2 and t4 lose both.
CAP_EXPERTS = [[0, 1], [0, 2], [0, 1], [1, 0], [0, 1], [2, 1]]
CAP_KEPT = [[True, True], [True, True], [False, False], [True, False], [False, False], [True, False]]
CAP_X = [[2.0, 1.0, 0.0], [2.0, 0.0, 1.0], [2.0, 1.0, 0.0], [1.0, 2.0, 0.0], [2.0, 1.0, 0.0], [0.0, 1.0, 2.0]]


@pytest.mark.parametrize("normalised", [False, True])
def test_dispatch_identity_combine(normalised):
    torch.manual_seed(0)
    T, K, E, D = 7, 3, 5, 4
    experts = torch.stack([torch.randperm(E)[:K] for _ in range(T)]).tolist()
    raw = torch.rand(T, K) + 0.1
    w = (raw / raw.sum(-1, keepdim=True) if normalised else raw).requires_grad_()
    x = torch.randn(T, D, requires_grad=True)
    d = LocalDispatcher(E)
    x_RD, counts, state = d.dispatch(x, hand_routing(experts, w, E), capacity=None)
    assert sum(counts) == T * K and state.num_dropped == 0 and state.kept_TK is None
    combined = d.combine(x_RD, state)  # identity experts
    assert combined.home is state and combined.home_rows_RD is x_RD
    out = combined.out_TD
    expected = x * w.sum(-1, keepdim=True)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)
    if normalised:
        torch.testing.assert_close(out, x, atol=1e-6, rtol=1e-6)
    g = torch.randn(T, D)
    out.backward(g)
    torch.testing.assert_close(x.grad, g * w.sum(-1, keepdim=True).detach(), atol=1e-6, rtol=1e-6)
    # d out_t / d w_tk = x_t, so the weight gradient is <g_t, x_t> for every k
    torch.testing.assert_close(w.grad, (g * x).sum(-1, keepdim=True).detach().expand(T, K), atol=1e-5, rtol=1e-5)


def test_dispatch_rows_sorted_by_expert():
    x = torch.arange(4.0).unsqueeze(1)
    routing = hand_routing([[2, 0], [0, 1], [2, 1], [1, 0]], torch.ones(4, 2), E=3)
    x_RD, counts, state = LocalDispatcher(3).dispatch(x, routing, None)
    assert counts == [3, 3, 2]
    # e0: first choice of t1, then second choices of t0, t3; e1: t3, then t1, t2; e2: t0, t2
    assert state.token_R.tolist() == [1, 0, 3, 3, 1, 2, 0, 2]
    assert x_RD.squeeze(1).tolist() == [1.0, 0.0, 3.0, 3.0, 1.0, 2.0, 0.0, 2.0]


def test_capacity_drops_exactly():
    w = torch.rand(6, 2) + 0.1
    x = torch.randn(6, 4)
    d = LocalDispatcher(3)
    x_RD, counts, state = d.dispatch(x, hand_routing(CAP_EXPERTS, w, 3), capacity=2)
    assert counts == [2, 2, 2] and list(state.tokens_per_expert) == [2, 2, 2]
    assert list(state.routed_per_expert) == [5, 5, 2]
    assert state.num_dropped == 6
    assert state.kept_TK.tolist() == CAP_KEPT
    assert state.token_R.tolist() == [0, 1, 3, 0, 5, 1]
    out = d.combine(x_RD, state).out_TD  # identity experts
    kept_w = (w * torch.tensor(CAP_KEPT)).sum(-1, keepdim=True)  # dropped weights are not renormalised
    torch.testing.assert_close(out, x * kept_w)
    assert not out[2].any() and not out[4].any()
    # capacity above every load drops nothing
    _, _, none_dropped = d.dispatch(x, hand_routing(CAP_EXPERTS, w, 3), capacity=5)
    assert none_dropped.num_dropped == 0


def test_expert_capacity():
    assert expert_capacity(0.0, 100, 2, 8) is None
    assert expert_capacity(1.0, 8, 2, 4) == 4
    assert expert_capacity(1.25, 6, 2, 4) == 4  # ceil(3.75)
    assert expert_capacity(1.1, 10, 1, 1) == 11  # 1.1 * 10 is 11.000000000000002 in floats
    assert expert_capacity(0.5, 12, 2, 3) == 4


def test_local_dispatcher_is_a_dispatcher_and_owns_the_capacity():
    d = LocalDispatcher(4)
    assert isinstance(d, Dispatcher) and d.num_local_experts == 4
    assert d.capacity(1.25, 6, 2, torch.device("cpu")) == expert_capacity(1.25, 6, 2, 4) == 4
    assert d.capacity(0.0, 6, 2, torch.device("cpu")) is None


class SpyDispatcher:
    """A Dispatcher that wraps LocalDispatcher, records the calls and imposes its own capacity."""

    def __init__(self, num_experts, capacity):
        self._local = LocalDispatcher(num_experts)
        self.num_local_experts = num_experts
        self._capacity = capacity
        self.calls = []

    def capacity(self, factor, num_tokens, top_k, device):
        self.calls.append(("capacity", factor, num_tokens, top_k))
        return self._capacity

    def dispatch(self, x_TD, routing, capacity):
        self.calls.append(("dispatch", capacity))
        return self._local.dispatch(x_TD, routing, capacity)

    def combine(self, y_RD, state):
        self.calls.append(("combine",))
        c = self._local.combine(y_RD, state)
        return Combined(c.out_TD, c.home_rows_RD, c.home)

    def exchange_and_compute(self, x_TD, routing, capacity, experts, overlap_chunks=1):
        return run_blocking(self, x_TD, routing, capacity, experts)


def test_layer_takes_the_capacity_from_its_dispatcher():
    # The dispatcher owns the capacity: the layer passes on what it says (here 1 instead of the config's 2).
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=3, top_k=2, expert_ffn_dim=5, capacity_factor=0.5)
    spy = SpyDispatcher(3, capacity=1)
    layer = MoELayer(3, cfg, dispatcher=spy)
    assert isinstance(spy, Dispatcher) and layer.num_local_experts == 3
    with torch.no_grad():
        layer.router.weight.copy_(torch.eye(3))
    stats = layer(torch.tensor(CAP_X), collect_stats=True).stats
    assert [c[0] for c in spy.calls] == ["capacity", "dispatch", "combine"]
    assert spy.calls[0] == ("capacity", 0.5, 6, 2) and spy.calls[1] == ("dispatch", 1)
    assert stats.tokens_per_expert == [1, 1, 1] and stats.num_dropped == 9


def test_layer_set_step_reaches_the_router_and_topk_ignores_it():
    torch.manual_seed(0)
    layer = MoELayer(4, MoEConfig(num_experts=4, top_k=2, expert_ffn_dim=8))
    x = torch.randn(5, 4)
    before = layer(x).out
    layer.set_step(1000)
    assert torch.equal(layer(x).out, before)
    # one call signature for every router: token ids are accepted and not read by top-k
    assert torch.equal(layer.router(x, torch.arange(5)).experts_TK, layer.router(x).experts_TK)


class _Owns:
    def __init__(self, n):
        self._local = LocalDispatcher(n)
        self.num_local_experts = n


def test_shard_experts_keeps_a_slice_once():
    torch.manual_seed(0)
    layer = MoELayer(4, MoEConfig(num_experts=4, top_k=1, expert_ffn_dim=8))
    full = {n: p.detach().clone() for n, p in layer.experts.named_parameters()}
    with pytest.raises(ValueError, match="delivers rows for 3"):
        layer.shard_experts(range(2, 4), _Owns(3))
    dispatcher = _Owns(2)
    layer.shard_experts(range(2, 4), dispatcher)
    assert layer.dispatcher is dispatcher and layer.num_local_experts == layer.experts.num_experts == 2
    for n, p in layer.experts.named_parameters():
        assert torch.equal(p, full[n][2:4]), n
    with pytest.raises(RuntimeError, match="already sharded"):
        layer.shard_experts(range(0, 2), _Owns(2))


def capacity_layer(impl="grouped") -> MoELayer:
    torch.manual_seed(0)
    layer = MoELayer(3, MoEConfig(num_experts=3, top_k=2, expert_ffn_dim=5, capacity_factor=0.5, expert_impl=impl))
    with torch.no_grad():
        layer.router.weight.copy_(torch.eye(3))  # logits = x, so CAP_X reproduces CAP_EXPERTS
        layer.experts.b2.normal_()  # a dropped token must not even receive the output bias
    return layer


def test_layer_capacity_passes_dropped_tokens_through_residual():
    layer = capacity_layer()
    x = torch.tensor(CAP_X)
    moe = layer(x, collect_stats=True)
    assert moe.stats.num_dropped == 6 and moe.stats.drop_fraction == 0.5
    assert moe.stats.tokens_per_expert == [2, 2, 2] and moe.stats.routed_per_expert == [5, 5, 2]
    y = x + moe.out
    for t in (2, 4):
        assert torch.equal(moe.out[t], torch.zeros(3)) and torch.equal(y[t], x[t])
    for t in (0, 1, 3, 5):
        assert moe.out[t].abs().sum() > 0


def dense_reference(layer: MoELayer, x_TD, kept_TK=None):
    """Every token through every expert, mixed by a [T, E] mask of its top-k gate weights."""
    cfg, ex = layer.cfg, layer.experts
    logits = x_TD @ layer.router.weight.t()
    if cfg.gate == "topk_softmax":
        top, idx = logits.topk(cfg.top_k, dim=-1)
        w = torch.softmax(top, -1)
    else:
        w, idx = torch.softmax(logits, -1).topk(cfg.top_k, dim=-1)
        if cfg.renormalize:
            w = w / w.sum(-1, keepdim=True)
    if kept_TK is not None:
        w = w * kept_TK
    mask_TE = torch.zeros_like(logits).scatter(1, idx, w)
    act = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}[cfg.activation]
    h_TEF = act(torch.einsum("td,edf->tef", x_TD, ex.w1) + ex.b1)
    y_TED = torch.einsum("tef,efd->ted", h_TEF, ex.w2) + ex.b2
    return torch.einsum("te,ted->td", mask_TE, y_TED)


def priority_keep(experts_TK, E, capacity):
    """Independent plain-Python capacity rule: first choices in token order, then second, ..."""
    T, K = len(experts_TK), len(experts_TK[0])
    load, kept = [0] * E, [[False] * K for _ in range(T)]
    for k in range(K):
        for t in range(T):
            e = experts_TK[t][k]
            if load[e] < capacity:
                load[e] += 1
                kept[t][k] = True
    return torch.tensor(kept)


def run(layer, x, g):
    for p in (x, *layer.parameters()):
        p.grad = None
    out = layer(x).out
    out.backward(g)
    return out.detach(), {"x": x.grad.clone(), **{n: p.grad.clone() for n, p in layer.named_parameters()}}


CASES = [
    dict(num_experts=4, top_k=2),
    dict(num_experts=4, top_k=1, activation="gelu"),
    dict(num_experts=4, top_k=4, activation="silu"),  # top_k = E
    dict(num_experts=6, top_k=2, gate="softmax_topk", renormalize=True),
    dict(num_experts=6, top_k=3, gate="softmax_topk"),
    dict(num_experts=4, top_k=2, capacity_factor=0.75),
    dict(num_experts=5, top_k=1, capacity_factor=1.0, gate="softmax_topk"),
]


@pytest.mark.parametrize("kw", CASES, ids=[str(i) for i in range(len(CASES))])
def test_layer_grouped_loop_and_dense_reference(kw):
    torch.manual_seed(1)
    D = 8
    layers = {}
    for impl in ("grouped", "loop"):
        layers[impl] = MoELayer(D, MoEConfig(expert_ffn_dim=12, expert_impl=impl, **kw), init_std=0.3)
    layers["loop"].load_state_dict(layers["grouped"].state_dict())
    with torch.no_grad():
        for p in (layers["grouped"].experts.b1, layers["grouped"].experts.b2):
            p.normal_()
        layers["loop"].load_state_dict(layers["grouped"].state_dict())
        if kw["top_k"] < kw["num_experts"]:
            # x > 0 and a negative gate row: expert 0 never chosen, so it gets zero rows
            for layer in layers.values():
                layer.router.weight[0] = -1.0
    x = (torch.rand(2, 15, D) + 0.05).requires_grad_()
    g = torch.randn(2, 15, D)
    out_g, grads_g = run(layers["grouped"], x, g)
    out_l, grads_l = run(layers["loop"], x, g)
    assert out_g.shape == x.shape
    torch.testing.assert_close(out_g, out_l, atol=1e-5, rtol=1e-5)
    for name in grads_g:
        torch.testing.assert_close(grads_g[name], grads_l[name], atol=1e-5, rtol=1e-5, msg=name)
    if not (kw["top_k"] == 1 and kw.get("gate", "topk_softmax") == "topk_softmax"):
        # (softmax over a single selected logit is constant 1: no gate gradient, by design)
        assert grads_g["router.weight"].abs().sum() > 0

    # dense reference, computed without the router, dispatcher or experts code
    layer = layers["grouped"]
    x_TD = x.detach().reshape(-1, D).requires_grad_()
    kept = None
    cap = layer.cfg.capacity_factor
    if cap:
        idx = (x_TD @ layer.router.weight.t()).topk(kw["top_k"], -1).indices.tolist()
        capacity = math.ceil(cap * x_TD.shape[0] * kw["top_k"] / kw["num_experts"])
        kept = priority_keep(idx, kw["num_experts"], capacity)
        assert not kept.all(), "the capacity case should drop something"
    for p in layer.parameters():
        p.grad = None
    ref = dense_reference(layer, x_TD, kept)
    ref.backward(g.reshape(-1, D))
    torch.testing.assert_close(out_g.reshape(-1, D), ref.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads_g["x"].reshape(-1, D), x_TD.grad, atol=1e-5, rtol=1e-5)
    for name, p in layer.named_parameters():
        torch.testing.assert_close(grads_g[name], p.grad, atol=1e-5, rtol=1e-5, msg=name)


def test_layer_aux_loss_and_bf16_autocast():
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=4, top_k=2, expert_ffn_dim=16, balance_loss_coef=0.01, z_loss_coef=0.001)
    layer = MoELayer(8, cfg)
    x = torch.randn(3, 5, 8, requires_grad=True)
    ref = layer(x)
    assert ref.aux_loss.shape == () and ref.aux_loss.item() > 0 and ref.stats is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.out.dtype == torch.float32 and out.out.shape == x.shape
    torch.testing.assert_close(out.out, ref.out, atol=2e-3, rtol=5e-2)
    (out.out.sum() + out.aux_loss).backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in layer.parameters())


def test_stats_by_hand():
    # E=4: expert 3 unused.  Kept rows (capacity 2), in expert order: e0: t0 t1, e1: t3 t0, e2: t5 t1.
    routing = hand_routing(CAP_EXPERTS, torch.ones(6, 2), E=4)
    probs = torch.tensor([[0.5, 0.5, 0.0, 0.0]] * 3 + [[0.25] * 4] * 3)
    routing = Routing(**{**routing.__dict__, "probs_TE": probs})
    _, _, state = LocalDispatcher(4).dispatch(torch.zeros(6, 2), routing, capacity=2)
    y_RD = torch.tensor([[3.0, 4.0], [1.0, 0.0], [2.0, 0.0], [0.0, 2.0], [6.0, 8.0], [0.0, 0.0]])
    s = compute_stats(routing, state, y_RD)
    assert s.tokens_per_expert == [2, 2, 2, 0] and s.routed_per_expert == [5, 5, 2, 0]
    assert s.num_dropped == 6 and s.drop_fraction == 0.5
    assert s.load_imbalance == pytest.approx(5 / 3)  # max 5 over mean 12/4
    assert s.router_entropy == pytest.approx((3 * math.log(2) + 3 * math.log(4)) / 6)
    assert s.expert_out_norm == pytest.approx([3.0, 2.0, 5.0, 0.0])  # (5+1)/2, (2+2)/2, (10+0)/2
    assert s.selection_by_norm == [2, 5, 5, 0]  # routed counts of experts 2, 0, 1, 3
    assert s.to_scalars("moe.layer0.") == {
        "moe.layer0.load_imbalance": pytest.approx(5 / 3),
        "moe.layer0.drop_fraction": 0.5,
        "moe.layer0.dropped": 6,
        "moe.layer0.router_entropy": pytest.approx(s.router_entropy),
        "moe.layer0.tokens_per_expert": [2, 2, 2, 0],
        "moe.layer0.selection_by_norm": [2, 5, 5, 0],
    }


def test_layer_stats_are_detached_python_values():
    layer = capacity_layer()
    s = layer(torch.tensor(CAP_X), collect_stats=True).stats
    for v in (s.drop_fraction, s.load_imbalance, s.router_entropy, *s.expert_out_norm):
        assert type(v) is float
    assert all(type(v) is int for v in s.tokens_per_expert + s.routed_per_expert + s.selection_by_norm)
    p = torch.softmax(torch.tensor(CAP_X), -1)
    assert s.router_entropy == pytest.approx(-(p * p.log()).sum(-1).mean().item(), rel=1e-6)


def test_layer_bench_smoke():
    """msmoe-bench layer runs on a tiny shape and reports consistent figures (no timing is asserted;
    the DeepSpeed comparison, which builds a process group, stays off in a unit test)."""
    import argparse

    from msmoe_dist.bench.layer import add_layer_args, run_layer_bench

    args = add_layer_args(argparse.ArgumentParser()).parse_args(
        "--tokens 64 --d-model 16 --ffn 32 --experts 4 --top-k 2 --repeats 2 --warmup 1 --no-deepspeed".split()
    )
    r = run_layer_bench(args)
    assert r["shapes"]["rows_per_expert"] == 32 and r["floor_ms"] == min(r["floor_bmm_ms"], r["floor_loop_ms"])
    assert r["ratio"] == pytest.approx(r["ours_ms"] / r["floor_ms"], rel=1e-2)
    assert {"machine", "date", "ours_ms"} <= set(r)
