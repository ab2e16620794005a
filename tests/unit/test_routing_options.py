"""Routing options on one process (docs/routing.md): aux-loss-free bias balancing, shared experts,
expert-choice routing, DeepSpeed's renormalise-after-drop and min_capacity, and their bad input.

Multi-process equivalence (EP 2 = EP 1) and the DeepSpeed engine are in tests/distributed/test_routing_ep.py.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.utils.checkpoint as ckpt
from conftest import tiny_lm_config

from msmoe_dist.config import ConfigError, load_config
from msmoe_dist.config.schema import MoEConfig
from msmoe_dist.moe import MoELayer
from msmoe_dist.moe.bias_balance import ExpertBias, update_expert_biases
from msmoe_dist.moe.drop_renormalize import kept_assignments
from msmoe_dist.moe.expert_choice import picks_per_expert
from msmoe_dist.train import trainer

# ---------------------------------------------------------------- bias balancing


def test_bias_update_rule_by_hand_on_a_scripted_load():
    b = ExpertBias(4, rate=0.25)  # powers of two: exact in fp32
    b.apply_update(torch.tensor([10, 2, 4, 0]))  # mean 4: sign(mean - load) = [-1, +1, 0, +1]
    # += 0.25 * [-1, 1, 0, 1] = [-.25, .25, 0, .25]; mean .0625 -> re-centred
    assert b.bias.tolist() == [-0.3125, 0.1875, -0.0625, 0.1875]
    b.apply_update(torch.tensor([1, 1, 1, 5]))  # mean 2: [+1, +1, +1, -1]
    # [-.0625, .4375, .1875, -.0625], mean .125 -> re-centred
    assert b.bias.tolist() == [-0.1875, 0.3125, 0.0625, -0.1875]
    assert b.bias.sum().item() == 0.0 and b.load.tolist() == [0, 0, 0, 0]


def _layer(**kw) -> MoELayer:
    torch.manual_seed(0)
    return MoELayer(8, MoEConfig(**{"num_experts": 4, "top_k": 2, "expert_ffn_dim": 8, **kw}))


@pytest.mark.parametrize("gate", ["topk_softmax", "softmax_topk"])
def test_bias_steers_the_choice_not_the_combine_weights(gate):
    layer = _layer(balance="bias", gate=gate)
    x = torch.randn(16, 8)
    layer.router.expert_bias.bias.copy_(torch.tensor([0.0, 0.0, 50.0, 40.0]))  # forces experts {2, 3}
    r = layer.router(x)
    assert sorted(set(r.experts_TK.reshape(-1).tolist())) == [2, 3]
    assert (r.experts_TK[:, 0] == 2).all()
    scores = r.logits_TE if gate == "topk_softmax" else r.probs_TE
    chosen = scores.gather(-1, r.experts_TK)  # the unbiased scores of the chosen experts
    want = torch.softmax(chosen, -1) if gate == "topk_softmax" else chosen
    torch.testing.assert_close(r.weights_TK, want, rtol=0, atol=0)
    # zero bias: exactly the plain router
    layer.router.expert_bias.bias.zero_()
    plain = _layer(gate=gate)
    a, p = layer.router(x), plain.router(x)
    assert torch.equal(a.experts_TK, p.experts_TK) and torch.equal(a.weights_TK, p.weights_TK)


@pytest.mark.parametrize("mode", ["plain", "reentrant", "non_reentrant"])
def test_loads_counted_once_per_forward_with_activation_checkpointing_and_never_in_eval(mode):
    layer = _layer(balance="bias")
    x = torch.randn(2, 6, 8, requires_grad=True)
    counter = layer.router.expert_bias.load

    def run(inp):
        return layer(inp).out

    for _ in range(2):  # two micro-batches of one step
        out = run(x) if mode == "plain" else ckpt.checkpoint(run, x, use_reentrant=mode == "reentrant")
        out.square().sum().backward()  # checkpointing re-runs the forward here: not counted again
    assert int(counter.sum()) == 2 * 12 * 2  # micro-batches * tokens * top_k
    layer.eval()
    with torch.no_grad():
        layer(x)
    assert int(counter.sum()) == 2 * 12 * 2


def _collapse_history(rate: float, steps: int) -> list[float]:
    """Load imbalance per step of a layer whose router sends every token's first choice to expert 0 (top-2,
    the default gate; imbalance ~1.9 of at most 2), trained by SGD on a task loss with no balance loss, the
    bias (if rate > 0) moving after each step."""
    torch.manual_seed(0)
    layer = MoELayer(8, MoEConfig(num_experts=4, top_k=2, balance="bias", bias_update_rate=rate))
    v = torch.ones(8) / 8**0.5
    with torch.no_grad():
        layer.router.weight.normal_(0, 0.5)
        layer.router.weight[0] += 2 * v  # inputs lie around 2v: expert 0 leads every token
    opt = torch.optim.SGD(layer.parameters(), lr=0.01)
    gen = torch.Generator().manual_seed(1)
    history = []
    for _ in range(steps):
        out = layer(torch.randn(256, 8, generator=gen) + 2 * v, collect_stats=True)
        history.append(out.stats.load_imbalance)
        opt.zero_grad()
        out.out.square().mean().backward()
        opt.step()
        update_expert_biases(layer)
    return history


def test_collapsed_router_recovers_balance_without_an_aux_loss():
    """N = 40 steps at rate 0.1: the imbalance starts at 1.87, falls below 1.5 (at step 13 on the author's
    machine) and stays there; with rate 0 (the same run without the bias) it stays above 1.5."""
    with_bias, without = _collapse_history(0.1, 40), _collapse_history(0.0, 40)
    assert with_bias[0] > 1.8 and without[0] > 1.8
    assert max(with_bias[-15:]) < 1.5, with_bias
    assert min(without) > 1.5, without


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_bias_native_engine_grad_accum_and_resume_bit_exact(tmp_path):
    """The native engine with grad_accum 2: each step moves each layer's bias once, from the loads of both
    micro-batches; a run resumed at step 2 ends with the same bias and losses, bit for bit, as the
    uninterrupted run."""
    opts = ("moe.balance=bias", "moe.bias_update_rate=0.015625", "train.grad_accum_steps=2")
    opts = (*opts, "logging.tensorboard=false")
    seen = []
    real = ExpertBias.apply_update

    def spy(self, load_E):
        seen.append(int(load_E.sum()))
        real(self, load_E)

    ExpertBias.apply_update = spy
    try:
        trainer.run(tiny_lm_config(tmp_path / "a", "train.max_steps=4", *opts))
    finally:
        ExpertBias.apply_update = real
    assert seen == [2 * 4 * 16 * 2] * (2 * 4)  # per layer and step: micro-batches * batch * seq * top_k
    trainer.run(tiny_lm_config(tmp_path / "b", "train.max_steps=2", *opts))
    trainer.run(tiny_lm_config(tmp_path / "b", "train.max_steps=4", "train.resume=true", *opts))
    states = [
        torch.load(p / "run/checkpoints/step_00000004/state.pt", weights_only=False)["model"]
        for p in (tmp_path / "a", tmp_path / "b")
    ]
    keys = [k for k in states[0] if k.endswith("expert_bias.bias")]
    assert len(keys) == 2 and all(states[0][k].abs().sum() > 0 for k in keys)
    for k in keys:
        assert torch.equal(states[0][k], states[1][k]), k
    losses = [[r["loss"] for r in _metrics(p / "run") if "loss" in r] for p in (tmp_path / "a", tmp_path / "b")]
    assert losses[0] == losses[1]


# ---------------------------------------------------------------- shared experts, expert choice, DeepSpeed options


def test_shared_experts_output_is_routed_plus_shared_by_hand():
    layer = _layer(num_shared_experts=2, shared_expert_ffn_dim=5)
    x = torch.randn(12, 8)
    out = layer(x).out
    s = layer.shared
    W1, b1, W2, b2 = s.fc1.weight, s.fc1.bias, s.fc2.weight, s.fc2.bias
    shared = sum(  # two experts of width 5, by hand
        torch.relu(x @ W1[i * 5 : (i + 1) * 5].t() + b1[i * 5 : (i + 1) * 5]) @ W2[:, i * 5 : (i + 1) * 5].t()
        for i in range(2)
    )
    shared = shared + b2
    layer.shared = None
    routed = layer(x).out
    torch.testing.assert_close(out, routed + shared, rtol=1e-6, atol=1e-6)


def test_expert_choice_selection_by_hand():
    layer = _layer(router="expert_choice", capacity_factor=1.5)
    x = torch.randn(10, 8)
    r = layer.router(x)
    C = picks_per_expert(1.5, 10, 2, 4)
    assert C == 8  # ceil(2 * 10 / 4 * 1.5)
    out = layer(x, collect_stats=True)
    ex = layer.experts
    want, picked = torch.zeros(10, 8), set()
    for e in range(4):
        scores = r.probs_TE[:, e].tolist()
        top = sorted(range(10), key=lambda t: (-scores[t], t))[:C]  # highest scores, lower index on ties
        picked |= set(top)
        for t in top:
            y = torch.relu(x[t] @ ex.w1[e] + ex.b1[e].reshape(-1)) @ ex.w2[e] + ex.b2[e].reshape(-1)
            want[t] += scores[t] * y
    torch.testing.assert_close(out.out, want, rtol=1e-5, atol=1e-6)
    assert out.stats.tokens_per_expert == [C] * 4
    row = out.stats.to_scalars("moe.layer0.")
    assert row["moe.layer0.unpicked"] == 10 - len(picked) and row["moe.layer0.load_imbalance"] == 1.0


def test_expert_choice_unpicked_tokens_pass_through_and_are_counted():
    torch.manual_seed(0)
    layer = MoELayer(8, MoEConfig(num_experts=4, top_k=1, router="expert_choice", capacity_factor=0.25))  # C = 1
    x = torch.randn(12, 8)
    out = layer(x, collect_stats=True)
    zero_rows = int((out.out.abs().sum(-1) == 0).sum())
    assert int(out.stats.unpicked_t) == zero_rows >= 12 - 4


def test_renormalize_after_drop_matches_deepspeed_semantics():
    """softmax_topk + renormalize, capacity ceil(0.5 * 3 * 2 / 4) = 1: token t's logits are 5 for expert 0 and
    3 for expert t+1, so tokens 1 and 2 lose their first route (expert 0 is full) and keep the second. Default:
    that route keeps p2/(p1+p2); renormalize_after_drop (DeepSpeed's top2gating): weight 1. Token 0 keeps both."""
    layer = _layer(gate="softmax_topk", renormalize=True, capacity_factor=0.5)
    x = torch.zeros(3, 8)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0, 0] = 5.0
        for e in (1, 2, 3):
            layer.router.weight[e, e] = 3.0
        for t in range(3):
            x[t, 0], x[t, t + 1] = 1.0, 1.0
    r = layer.router(x)
    assert r.experts_TK.tolist() == [[0, 1], [0, 2], [0, 3]]
    assert kept_assignments(r.experts_TK, 4, 1).tolist() == [[True, True], [False, True], [False, True]]
    before = layer(x).out
    layer.cfg = dataclasses.replace(layer.cfg, renormalize_after_drop=True)
    after = layer(x).out
    torch.testing.assert_close(after[0], before[0], rtol=0, atol=0)
    for t in (1, 2):
        assert 0 < r.weights_TK[t, 1] < 0.5
        torch.testing.assert_close(after[t], before[t] / r.weights_TK[t, 1], rtol=1e-5, atol=1e-6)


def test_per_expert_load_and_unpicked_reach_metrics_and_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from msmoe_dist.train.metrics import MetricsLogger

    stats = _layer(router="expert_choice", capacity_factor=0.5)(torch.randn(10, 8), collect_stats=True).stats
    log = MetricsLogger(tmp_path, tensorboard=True)
    log.log(1, stats.to_scalars("moe.layer0."))
    log.close()
    row = _metrics(tmp_path)[0]
    assert row["moe.layer0.tokens_per_expert"] == [3, 3, 3, 3] and "moe.layer0.unpicked" in row
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {f"moe/layer0/tokens_per_expert/expert{e}" for e in range(4)} <= tags
    assert {"moe/layer0/unpicked", "moe/layer0/router_entropy", "moe/layer0/dropped"} <= tags
    assert [e.value for e in acc.Scalars("moe/layer0/tokens_per_expert/expert2")] == [3.0]


def test_min_capacity_floors_the_capacity():
    x = torch.randn(8, 8)
    small = _layer(capacity_factor=0.1)(x, collect_stats=True).stats
    floored = _layer(capacity_factor=0.1, min_capacity=3)(x, collect_stats=True).stats
    assert max(small.tokens_per_expert) == 1 and max(floored.tokens_per_expert) == 3


def test_top1_router_learns_only_with_softmax_topk():
    """Why moe.top_k=1 with topk_softmax (or renormalize) is refused: the router's task gradient is exactly 0."""
    x = torch.randn(16, 8)
    grads = {}
    for gate, renorm in (("topk_softmax", False), ("softmax_topk", True), ("softmax_topk", False)):
        layer = _layer(top_k=1, gate=gate, renormalize=renorm)
        layer(x).out.square().sum().backward()
        grads[gate, renorm] = float(layer.router.weight.grad.norm())
    assert grads["topk_softmax", False] == 0.0  # weight softmax([l]) = 1 exactly
    assert grads["softmax_topk", True] < 1e-9  # p / p: 0 up to rounding
    assert grads["softmax_topk", False] > 1e-6


BAD = [
    (["moe.router=expert_choice"], "leak future tokens"),
    (["moe.router=stablemoe", "moe.top_k=1", "moe.balance=bias"], "moe.balance=bias"),
    (["moe.num_shared_experts=1", "moe.shared_expert_ffn_dim=0"], "moe.shared_expert_ffn_dim"),
    (["moe.balance=bias", "moe.bias_update_rate=-0.001"], "moe.bias_update_rate"),
    (["moe.top_k=1"], "moe.gate=softmax_topk"),
    (["moe.top_k=1", "moe.gate=softmax_topk", "moe.renormalize=true"], "moe.gate=softmax_topk"),
    (["moe.renormalize_after_drop=true"], "moe.renormalize=true"),
]


@pytest.mark.parametrize("overrides,needle", BAD)
def test_bad_routing_input_is_one_line(overrides, needle):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    msg = str(err.value)
    assert needle in msg and "\n" not in msg, msg


def test_bad_routing_input_exits_2(cli, tmp_path):
    proc = cli("train", "moe.router=expert_choice", f"train.run_dir={tmp_path}", timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "leak future tokens" in proc.stderr, proc.stderr
