"""StableMoE's router: losses against hand computations, the two stages, and the layer and model around it."""

import pytest
import torch
import torch.nn.functional as F

from msmoe_dist.config.moe_placement import lm_moe_blocks
from msmoe_dist.config.schema import ModelConfig, MoEConfig, MomentumConfig
from msmoe_dist.models import MoELanguageModel
from msmoe_dist.moe import MoELayer, StableMoERouter, stable_balance_loss
from msmoe_dist.moe.router import Routing

E, D, V = 4, 8, 30


def stable_cfg(**kw) -> MoEConfig:
    base = dict(
        router="stablemoe", num_experts=E, top_k=1, expert_ffn_dim=16, stable_switch_step=3, stable_distill_dim=6
    )
    return MoEConfig(**{**base, **kw})


def test_balance_loss_against_a_hand_computation():
    # T=5 tokens, E=2: tokens 0, 1, 2 on expert 0, tokens 3, 4 on expert 1; n = 5/2 = 2.5.
    scores = torch.tensor([[1.0, 0.0], [0.5, -1.0], [2.0, 1.0], [0.0, 0.3], [-1.0, 2.0]], requires_grad=True)
    experts = torch.tensor([0, 0, 0, 1, 1])
    s = torch.sigmoid
    expected = (
        (3 - 2.5) / 2.5 * (s(torch.tensor(1.0)) + s(torch.tensor(0.5)) + s(torch.tensor(2.0)))
        + (2 - 2.5) / 2.5 * (s(torch.tensor(0.3)) + s(torch.tensor(2.0)))
    ) / 5
    loss = stable_balance_loss(scores, experts)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    # |A_i| and n are constants: the gradient is (excess_i / T) * sigmoid'(s) on the chosen scores only.
    grad = torch.zeros(5, 2)
    for t, (i, c) in enumerate([(0, 0.2), (0, 0.2), (0, 0.2), (1, -0.2), (1, -0.2)]):
        v = scores[t, i].detach()
        grad[t, i] = c / 5 * s(v) * (1 - s(v))
    torch.testing.assert_close(scores.grad, grad)


def test_balance_loss_is_zero_when_balanced_and_for_no_tokens():
    scores = torch.randn(4, 2)
    assert float(stable_balance_loss(scores, torch.tensor([0, 1, 1, 0]))) == 0.0
    assert float(stable_balance_loss(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))) == 0.0


def _router(**kw):
    torch.manual_seed(0)
    return StableMoERouter(D, stable_cfg(**kw), V)


def test_stage1_routes_by_backbone_argmax_and_distils_it():
    r = _router()
    r.train()
    r.set_step(0)
    x = torch.randn(10, D)
    tok = torch.randint(0, V, (10,))
    out = r(x, tok)
    assert isinstance(out, Routing) and out.experts_TK.shape == (10, 1) and out.weights_TK.shape == (10, 1)
    scores = x @ r.centroids.t()
    target = scores.argmax(-1)
    assert torch.equal(out.experts_TK[:, 0], target)
    torch.testing.assert_close(out.weights_TK[:, 0], torch.sigmoid(scores.gather(1, target[:, None])[:, 0]))
    distill = F.cross_entropy(r.distill_emb[tok] @ r.distill_centroids.t(), target)
    torch.testing.assert_close(out.distill_loss, distill)
    torch.testing.assert_close(out.balance_loss, stable_balance_loss(scores, target))
    torch.testing.assert_close(out.aux_loss, 0.3 * out.balance_loss + 0.3 * distill)
    # The distillation target is detached: the distillation loss trains the distilled router only.
    out.distill_loss.backward()
    assert r.centroids.grad is None or not r.centroids.grad.any()
    assert r.distill_emb.grad is not None and r.distill_emb.grad.any() and r.distill_centroids.grad.any()


def test_stage2_routes_by_the_frozen_distilled_router_with_the_backbone_gate():
    r = _router()
    r.train()
    r.set_step(3)
    assert r.stage == 2 and not r.distill_emb.requires_grad and not r.distill_centroids.requires_grad
    x = torch.randn(12, D)
    tok = torch.randint(0, V, (12,))
    out = r(x, tok)
    expected = (r.distill_emb[tok] @ r.distill_centroids.t()).argmax(-1)
    assert torch.equal(out.experts_TK[:, 0], expected)
    scores = x @ r.centroids.t()
    torch.testing.assert_close(out.weights_TK[:, 0], torch.sigmoid(scores.gather(1, expected[:, None])[:, 0]))
    assert float(out.aux_loss) == 0.0 and float(out.balance_loss) == 0.0 and float(out.distill_loss) == 0.0
    out.weights_TK.sum().backward()
    assert r.centroids.grad is not None and r.centroids.grad.any()  # the centroids keep learning via the gate
    assert r.distill_emb.grad is None and r.distill_centroids.grad is None
    # The table does not follow later changes of the parameters; going back to stage 1 clears it.
    with torch.no_grad():
        r.distill_centroids.mul_(-1.0)
    assert torch.equal(r(x, tok).experts_TK[:, 0], expected)
    r.set_step(2)
    assert bool((r.frozen_V < 0).all()) and r.distill_emb.requires_grad


def test_evaluation_routes_like_the_last_training_step():
    r = _router()
    x, tok = torch.randn(9, D), torch.randint(0, V, (9,))
    r.eval()
    r.set_step(2)
    assert torch.equal(r(x).experts_TK[:, 0], (x @ r.centroids.t()).argmax(-1))  # stage 1: backbone, no ids needed
    r.set_step(5)
    assert torch.equal(r(x, tok).experts_TK[:, 0], (r.distill_emb[tok] @ r.distill_centroids.t()).argmax(-1))
    with pytest.raises(ValueError, match="token ids"):
        r(x)


def test_training_without_token_ids_is_an_error():
    r = _router()
    r.train()
    with pytest.raises(ValueError, match="distillation"):
        r(torch.randn(3, D))


def test_layer_output_is_the_gated_expert_output_and_overflow_passes_through():
    torch.manual_seed(1)
    layer = MoELayer(D, stable_cfg(capacity_factor=0.5, expert_impl="loop"), vocab_size=V)
    layer.router.set_step(0)
    x = torch.randn(2, 6, D)
    tok = torch.randint(0, V, (2, 6))
    out = layer(x, collect_stats=True, token_ids=tok)
    x_TD = x.reshape(-1, D)
    scores = x_TD @ layer.router.centroids.t()
    a = scores.argmax(-1)
    capacity = 2  # ceil(0.5 * 12 / 4): each expert keeps its first two tokens
    expected = torch.zeros_like(x_TD)
    seen = [0] * E
    for t in range(12):
        e = int(a[t])
        if seen[e] < capacity:
            w1, b1, w2, b2 = (p[e] for p in (layer.experts.w1, layer.experts.b1, layer.experts.w2, layer.experts.b2))
            h = torch.relu(x_TD[t] @ w1 + b1) @ w2 + b2
            expected[t] = torch.sigmoid(scores[t, e]) * h
        seen[e] += 1
    torch.testing.assert_close(out.out.reshape(-1, D), expected)
    assert out.stats.num_dropped == sum(max(0, n - capacity) for n in seen)


def lm(kind="none", layout="middle", **moe_kw):
    mcfg = ModelConfig(num_layers=3, d_model=D, num_heads=2, max_seq_len=8, layout=layout)
    return MoELanguageModel(mcfg, stable_cfg(**moe_kw), MomentumConfig(kind=kind), V)


def test_middle_layout_has_one_moe_block_in_the_middle():
    assert lm_moe_blocks(4, "middle") == [2] and lm_moe_blocks(1, "middle") == [0]
    model = lm()
    assert [b.is_moe for b in model.blocks] == [False, True, False] and model.num_moe_layers == 1


def _fixed_assignments(model, x):
    seen = []
    hook = model.blocks[1].moe.router.register_forward_hook(lambda m, i, o: seen.append(o.experts_TK[:, 0].clone()))
    model(x)
    hook.remove()
    return seen[0]


@pytest.mark.parametrize("kind", ["none", "heavy_ball"])
def test_after_the_switch_routing_is_frozen_and_the_distilled_router_untouched(kind):
    torch.manual_seed(2)
    model = lm(kind=kind, stable_switch_step=3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
    probe = torch.randint(0, V, (2, 8))
    router = model.blocks[1].moe.router
    routes = {}
    for step in range(8):
        model.set_step(step)
        x = torch.randint(0, V, (4, 9))
        out = model(x[:, :-1], x[:, 1:])
        opt.zero_grad(set_to_none=True)
        (out.loss + out.aux_loss).backward()
        if step >= 3:
            assert router.distill_emb.grad is None and router.distill_centroids.grad is None
            assert not router.distill_emb.requires_grad and float(out.aux_loss.detach()) == 0.0
            frozen = (router.distill_emb.detach().clone(), router.distill_centroids.detach().clone())
        else:
            assert router.distill_emb.grad is not None and float(out.aux_loss.detach()) > 0.0
        centroids = router.centroids.detach().clone()
        opt.step()
        if step >= 3:
            assert torch.equal(router.distill_emb, frozen[0]) and torch.equal(router.distill_centroids, frozen[1])
            assert not torch.equal(router.centroids, centroids)  # the backbone keeps training
        model.eval()
        routes[step] = _fixed_assignments(model, probe)
        model.train()
    for step in range(4, 8):
        assert torch.equal(routes[step], routes[3]), step


def test_token_ids_reach_the_router_through_the_model():
    torch.manual_seed(3)
    model = lm(stable_switch_step=0)
    model.set_step(0)
    x = torch.randint(0, V, (2, 8))
    router = model.blocks[1].moe.router
    expected = (router.distill_emb[x.reshape(-1)] @ router.distill_centroids.t()).argmax(-1)
    assert torch.equal(_fixed_assignments(model, x), expected)


def test_topk_router_models_are_unchanged_by_set_step():
    torch.manual_seed(4)
    mcfg = ModelConfig(num_layers=2, d_model=D, num_heads=2, max_seq_len=8)
    model = MoELanguageModel(mcfg, MoEConfig(num_experts=E, expert_ffn_dim=16), MomentumConfig(), V)
    x = torch.randint(0, V, (2, 8))
    before = model(x).aux_loss
    model.set_step(10)
    torch.testing.assert_close(model(x).aux_loss, before)


def test_frozen_table_is_saved_with_the_weights():
    torch.manual_seed(5)
    model = lm(stable_switch_step=1)
    model.set_step(1)
    x = torch.randint(0, V, (2, 8))
    model(x)
    state = model.state_dict()
    assert (state["blocks.1.moe.router.frozen_V"] >= 0).all()
    other = lm(stable_switch_step=1)
    other.load_state_dict(state)
    other.set_step(5)
    assert torch.equal(other.blocks[1].moe.router.frozen_V, state["blocks.1.moe.router.frozen_V"])


def test_the_host_knows_whether_the_table_is_filled():
    """Stage 2 reads no device value per forward: the router tracks the table's state on the host, and
    after a load (filled or not) it looks once."""
    torch.manual_seed(6)
    r = StableMoERouter(D, stable_cfg(stable_switch_step=1), V)
    r.set_step(1)
    x, tok = torch.randn(5, D), torch.randint(0, V, (5,))
    r(x, tok)
    table = r.frozen_V.clone()
    assert (table >= 0).all() and r._table_filled is True
    r.frozen_V.fill_(2)  # written behind the router's back: a filled table is not recomputed
    assert torch.equal(r(x, tok).experts_TK.view(-1), torch.full((5,), 2))
    unfilled = {**r.state_dict(), "frozen_V": torch.full((V,), -1)}
    r.load_state_dict(unfilled)
    assert r._table_filled is None
    r(x, tok)
    assert torch.equal(r.frozen_V, table)  # refilled from the (unchanged) distilled router
    r.set_step(0)  # back to stage 1 clears it, and the host knows
    assert r._table_filled is False and (r.frozen_V < 0).all()
