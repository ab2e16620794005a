"""Router math against hand computations (T=2 tokens, E=4 experts, weight = identity so logits = x)."""

import math

import pytest
import torch
import torch.nn.functional as F

from msmoe_dist.config.schema import MoEConfig
from msmoe_dist.moe import Router, router_z_loss, switch_balance_loss

X = [[1.0, 3.0, 2.0, 0.0], [0.5, -1.0, 2.0, 2.5]]


def identity_router(**kw) -> Router:
    cfg = MoEConfig(num_experts=4, top_k=2, **kw)
    r = Router(4, cfg)
    with torch.no_grad():
        r.weight.copy_(torch.eye(4))
    return r


def softmax(row):
    z = sum(math.exp(v) for v in row)
    return [math.exp(v) / z for v in row]


def test_topk_softmax_by_hand():
    r = identity_router(gate="topk_softmax")
    out = r(torch.tensor(X))
    # token 0: top-2 logits 3 (expert 1), 2 (expert 2); token 1: 2.5 (expert 3), 2.0 (expert 2)
    assert out.experts_TK.tolist() == [[1, 2], [3, 2]]
    assert out.experts_TK.dtype == torch.int64
    e1 = math.exp(1.0)
    e05 = math.exp(0.5)
    expected = [[e1 / (e1 + 1), 1 / (e1 + 1)], [e05 / (e05 + 1), 1 / (e05 + 1)]]  # softmax of [3,2], [2.5,2]
    torch.testing.assert_close(out.weights_TK, torch.tensor(expected), atol=1e-6, rtol=0)
    assert out.weights_TK.dtype == torch.float32
    torch.testing.assert_close(out.probs_TE, torch.tensor([softmax(X[0]), softmax(X[1])]), atol=1e-6, rtol=0)
    torch.testing.assert_close(out.logits_TE, torch.tensor(X))


@pytest.mark.parametrize("renormalize", [False, True])
def test_softmax_topk_by_hand(renormalize):
    r = identity_router(gate="softmax_topk", renormalize=renormalize)
    out = r(torch.tensor(X))
    assert out.experts_TK.tolist() == [[1, 2], [3, 2]]
    p0, p1 = softmax(X[0]), softmax(X[1])
    w = [[p0[1], p0[2]], [p1[3], p1[2]]]
    if renormalize:
        w = [[a / (a + b), b / (a + b)] for a, b in w]
        # renormalised softmax over the chosen = softmax over the chosen logits
        torch.testing.assert_close(out.weights_TK, identity_router()(torch.tensor(X)).weights_TK)
    else:
        assert abs(w[0][0] - 20.0855369 / 31.1929092) < 1e-6  # e^3 / (e^1+e^3+e^2+e^0)
    torch.testing.assert_close(out.weights_TK, torch.tensor(w), atol=1e-6, rtol=0)


def test_balance_and_z_loss_by_hand():
    r = identity_router(balance_loss_coef=0.01, z_loss_coef=0.001)
    out = r(torch.tensor(X))
    p0, p1 = softmax(X[0]), softmax(X[1])
    # assignments: token 0 -> {1, 2}, token 1 -> {3, 2}: f = [0, 1, 2, 1] / (T*K = 4)
    f = [0.0, 0.25, 0.5, 0.25]
    P = [(a + b) / 2 for a, b in zip(p0, p1)]
    balance = 4 * sum(fe * pe for fe, pe in zip(f, P))
    lse0 = math.log(math.exp(1) + math.exp(3) + math.exp(2) + math.exp(0))
    lse1 = math.log(math.exp(0.5) + math.exp(-1) + math.exp(2) + math.exp(2.5))
    z = (lse0**2 + lse1**2) / 2
    assert out.balance_loss.item() == pytest.approx(balance, abs=1e-6)
    assert out.z_loss.item() == pytest.approx(z, abs=1e-5)
    assert out.aux_loss.item() == pytest.approx(0.01 * balance + 0.001 * z, abs=1e-7)
    # the pure functions agree with the module
    assert switch_balance_loss(out.probs_TE, out.experts_TK).item() == pytest.approx(balance, abs=1e-6)
    assert router_z_loss(out.logits_TE).item() == pytest.approx(z, abs=1e-5)
    # both losses reach the gate weight
    out.aux_loss.backward()
    assert r.weight.grad is not None and r.weight.grad.abs().sum() > 0


def test_uniform_routing_gives_balance_one():
    # perfectly uniform probs and assignments: E * sum (1/E)(1/E) = 1
    probs = torch.full((4, 4), 0.25)
    experts = torch.tensor([[0, 1], [2, 3], [0, 1], [2, 3]])
    assert switch_balance_loss(probs, experts).item() == pytest.approx(1.0)


def test_zero_coefficients_skip_terms():
    out = identity_router()(torch.tensor(X))
    assert out.balance_loss.item() == 0.0 and out.z_loss.item() == 0.0 and out.aux_loss.item() == 0.0
    assert out.aux_loss.shape == ()
    only_z = identity_router(z_loss_coef=1.0)(torch.tensor(X))
    assert only_z.balance_loss.item() == 0.0 and only_z.aux_loss.item() == pytest.approx(only_z.z_loss.item())


def test_weights_carry_router_gradient():
    r = identity_router()
    r(torch.tensor(X)).weights_TK[:, 0].sum().backward()
    assert r.weight.grad.abs().sum() > 0


def test_noisy_gating_scale_and_training_only():
    torch.manual_seed(0)
    E, D, T = 8, 16, 20000
    cfg = MoEConfig(num_experts=E, top_k=2, noisy_gating=True, noise_std=2.0)
    r = Router(D, cfg)
    x = torch.randn(T, D)
    clean = F.linear(x, r.weight)
    r.eval()
    torch.testing.assert_close(r(x).logits_TE, clean)
    r.train()
    out = r(x)
    noise = out.logits_TE - clean
    # V-MoE scale: std = noise_std / E = 0.25; 160k samples put the estimate within ~0.5%
    assert noise.std().item() == pytest.approx(2.0 / E, rel=0.02)
    assert abs(noise.mean().item()) < 0.01
    # the losses and stats see the noisy logits
    torch.testing.assert_close(out.probs_TE, torch.softmax(out.logits_TE, -1))
    assert torch.equal(out.experts_TK, out.logits_TE.topk(2, dim=-1).indices)
    # no noise in training when noisy_gating is off
    quiet = Router(D, MoEConfig(num_experts=E, top_k=2))
    quiet.train()
    torch.testing.assert_close(quiet(x).logits_TE, F.linear(x, quiet.weight))


def test_fp32_logits_under_bf16_autocast():
    torch.manual_seed(0)
    r = Router(32, MoEConfig(num_experts=8, top_k=2, gate="softmax_topk"))
    x = torch.randn(64, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = r(x)
        out_bf16_in = r(x.to(torch.bfloat16))
    for t in (out.logits_TE, out.probs_TE, out.weights_TK):
        assert t.dtype == torch.float32
    torch.testing.assert_close(out.logits_TE, F.linear(x, r.weight), atol=1e-6, rtol=1e-6)
    # bf16 activations are upcast, not the weight downcast
    torch.testing.assert_close(out_bf16_in.logits_TE, F.linear(x.to(torch.bfloat16).float(), r.weight))


def test_init_and_validation():
    torch.manual_seed(0)
    r = Router(512, MoEConfig(num_experts=64, top_k=2))
    assert r.weight.shape == (64, 512)
    assert r.weight.std().item() == pytest.approx(0.02, rel=0.05)
    with pytest.raises(ValueError):
        Router(8, MoEConfig(num_experts=4, top_k=5))
    with pytest.raises(ValueError):
        Router(8, MoEConfig(gate="nope"))
