"""StableMoE's MoE layer with the reference options, against a transcription of the reference.

Reference: Hunter-DDM/stablemoe at 73ea6ef, fairseq/modules/moe_layer.py (BaseLayer.forward, lines
140-209; MoESublayer, lines 309-321) and fairseq/models/transformer.py (lines 771-786: the MoE layer is
inserted into the decoder's layer list). `reference_stable_layer` is our own transcription: stage 1,
training, greedy assignment (the reference command's --assignment-algorithm GA), one expert sublayer
(--moe-sublayers 1; the paper's 3 are a documented difference), no token shuffle, no capacity overflow.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from msmoe_dist.config.loader import load_config
from msmoe_dist.models.blocks import Block
from msmoe_dist.models.inserted_moe import InsertedMoELayer
from msmoe_dist.models.lm import MoELanguageModel
from msmoe_dist.momentum import MomentumState

D, E, V, B, S = 16, 4, 40, 2, 10


def _model(router_input: str = "residual", insert: bool = True) -> MoELanguageModel:
    cfg = load_config(
        None,
        [
            "model.num_layers=4",
            f"model.d_model={D}",
            "model.num_heads=2",
            "model.ffn_dim=24",
            f"model.max_seq_len={S}",
            f"data.seq_len={S}",
            "model.layout=middle",
            f"model.layer_insert={str(insert).lower()}",
            "moe.router=stablemoe",
            "moe.top_k=1",
            f"moe.num_experts={E}",
            "moe.expert_ffn_dim=20",
            "moe.capacity_factor=0",
            f"moe.stable_router_input={router_input}",
            "moe.stable_switch_step=1000",
        ],
    )
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        model = MoELanguageModel(cfg.model, cfg.moe, cfg.momentum, V)
    finally:
        torch.set_default_dtype(old)
    with torch.no_grad():  # centroids of norm 0.1 barely separate the tokens: spread them
        g = torch.Generator().manual_seed(4)
        for p in model.parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model.train()


def reference_stable_layer(layer: InsertedMoELayer, x_TD: Tensor) -> tuple[Tensor, Tensor]:
    """BaseLayer.forward: affinities = features @ expert_centroids^T on the layer's raw input (line 163);
    greedy top-1 (lines 259-270); alpha = sigmoid(routed . centroid) (line 193); output
    alpha * expert_network(x) + (1 - alpha) * x, expert_network a MoESublayer x + ff2(act(ff1(LN(x))))
    (lines 320-321). Returns (output, assignment)."""
    router, ex = layer.moe.router, layer.moe.experts
    scores = F.linear(x_TD.float(), router.centroids.float())  # our scores are fp32 by design; so here
    a = scores.detach().argmax(dim=-1)
    alpha = torch.sigmoid(scores.gather(1, a[:, None])).to(x_TD.dtype)
    h = layer.norm(x_TD)  # MoESublayer's own LayerNorm
    expert_out = torch.einsum("tf,tfd->td", F.relu(torch.einsum("td,tdf->tf", h, ex.w1[a]) + ex.b1[a]), ex.w2[a])
    expert_out = x_TD + expert_out + ex.b2[a]
    return alpha * expert_out + (1 - alpha) * x_TD, a


def test_the_moe_layer_is_inserted_in_the_middle():
    """transformer.py lines 771-786: one MoE layer inserted at index ((0 + 1) * L) // 2 of the L blocks."""
    model = _model()
    kinds = [type(b) for b in model.blocks]
    assert kinds == [Block, Block, InsertedMoELayer, Block, Block]
    assert not any(b.is_moe for b in model.blocks if isinstance(b, Block))  # every block keeps its dense FFN
    assert model.num_moe_layers == 1
    assert model.moe_layers() == [model.blocks[2].moe]  # the trainer's set_step reaches its router
    model.set_step(1000)
    assert model.blocks[2].moe.router.stage == 2
    model.set_step(0)
    idx = torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(0))
    model(idx, idx).loss.backward()  # the whole model trains
    assert model.blocks[2].moe.router.centroids.grad.abs().sum() > 0


@pytest.mark.parametrize("router_input", ["residual", "normed"])
def test_stable_layer_matches_transcription(router_input):
    model = _model(router_input)
    layer = model.blocks[2]
    g = torch.Generator().manual_seed(1)
    x = (2.0 * torch.randn(B, S, D, generator=g, dtype=torch.float64) + 1.0).requires_grad_()
    tok = torch.randint(0, V, (B, S), generator=g)
    ours, _, _, _ = layer(x, MomentumState(), model.momentum, token_ids=tok)
    ref, assign = reference_stable_layer(layer, x.reshape(-1, D))
    r_in = x if router_input == "residual" else layer.norm(x)
    chosen = layer.moe.router(r_in.reshape(-1, D), tok.reshape(-1))
    if router_input == "normed":  # the old behaviour routes the normalised stream: another function
        assert not torch.equal(chosen.experts_TK[:, 0], assign)
        return
    assert torch.equal(chosen.experts_TK[:, 0], assign)
    torch.testing.assert_close(ours.reshape(-1, D), ref, rtol=0, atol=1e-6)
    w = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    params = [x] + [p for p in layer.parameters() if p.requires_grad]
    g_ours = torch.autograd.grad((ours.reshape(-1, D) * w).sum(), params, allow_unused=True)
    g_ref = torch.autograd.grad((ref * w).sum(), params, allow_unused=True)
    for a, b in zip(g_ours, g_ref):
        if a is None or b is None:  # the distilled router: only its own loss reaches it
            continue
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def _lm(*extra: str) -> MoELanguageModel:
    cfg = load_config(None, [f"model.d_model={D}", "model.num_heads=2", "model.ffn_dim=24", "model.num_layers=2",
                             f"model.max_seq_len={S}", f"data.seq_len={S}", *extra])  # fmt: skip
    torch.manual_seed(0)
    return MoELanguageModel(cfg.model, cfg.moe, cfg.momentum, V)


def test_embed_scale_multiplies_the_token_embedding_by_sqrt_d():
    """fairseq transformer.py line 927: x = embed_scale * embed_tokens(tokens), embed_scale = sqrt(d)."""
    scaled, plain = _lm("model.embed_scale=true", "model.tie_embeddings=false"), _lm("model.tie_embeddings=false")
    plain.load_state_dict(scaled.state_dict())
    with torch.no_grad():
        plain.tok_emb.weight.mul_(D**0.5)
    idx = torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(scaled.eval()(idx, idx).loss, plain.eval()(idx, idx).loss, rtol=0, atol=1e-6)


def test_fairseq_init():
    """model.init=fairseq (models/reference_init.fairseq_init): Embedding() N(0, d^-1/2) (transformer.py lines
    1081-1085), MultiheadAttention.reset_parameters (multihead_attention.py lines 94-108), MoESublayer's zero
    ff2 weight (moe_layer.py line 318)."""
    m = _lm("model.init=fairseq", "model.layout=middle", "model.layer_insert=true", "moe.router=stablemoe",
            "moe.top_k=1", "model.d_model=64", "model.num_layers=2")  # fmt: skip
    d = 64
    emb = m.tok_emb.weight.detach()
    assert abs(float(emb.std()) - d**-0.5) < 0.1 * d**-0.5 and m.head.weight is m.tok_emb.weight
    attn = m.blocks[0].attn
    bound = (1 / 2**0.5) * (6 / (2 * d)) ** 0.5  # xavier-uniform of a [d, d] kernel, gain 1/sqrt(2)
    for w in attn.qkv.weight.detach().view(3, d, d):
        assert float(w.abs().max()) <= bound and float(w.abs().max()) > 0.95 * bound
    assert float(attn.proj.bias.detach().abs().max()) == 0
    assert 0 < float(attn.qkv.bias.detach().abs().max()) <= d**-0.5  # nn.Linear's default bias
    ex = m.blocks[1].moe.experts
    assert float(ex.w2.detach().abs().max()) == 0 and float(ex.w1.detach().abs().max()) <= d**-0.5
    assert m.blocks[1].moe.router.centroids.detach().norm(dim=1).sub(0.1).abs().max() < 1e-6  # its own init


@pytest.mark.parametrize("router_input", ["residual", "normed"])
def test_replacing_block_routes_what_the_option_says(router_input, monkeypatch):
    """Without model.layer_insert the MoE replaces block 2's FFN; its router sees the residual stream x
    (after attention) or LN2(x), and the experts LN2(x) either way."""
    model = _model(router_input, insert=False)
    blk = model.blocks[2]
    assert isinstance(blk, Block) and blk.is_moe
    seen = {}
    real_router, real_norm = blk.moe.router.forward, blk.norm2.forward

    def router(x_TD, token_T=None):
        seen["router"] = x_TD
        return real_router(x_TD, token_T)

    def norm(x):
        seen["residual"] = x
        seen["normed"] = out = real_norm(x)
        return out

    monkeypatch.setattr(blk.moe.router, "forward", router)
    monkeypatch.setattr(blk.norm2, "forward", norm)
    idx = torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(0))
    model(idx, idx)
    torch.testing.assert_close(seen["router"], seen[router_input].reshape(-1, D), rtol=0, atol=0)
