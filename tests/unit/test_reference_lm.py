"""The MomentumSMoE language model with its reference options, against a transcription of the reference.

Reference: rachtsy/MomentumSMoE at b43846f (models.py, custom_gates.py, custom_layers.py,
custom_transformer.py). `reference_lm_loss` below is our own transcription of the reference's forward
pass as plain tensor code (no reference code is imported or copied); it is fed the very parameters of
our model (transposed to the reference's layouts, the sign of the experts' last layer flipped where the
reference subtracts its momentum) and must give the same loss and the same gradients to 1e-6 in fp64.

What the transcription does NOT follow (docs/reference_differences.md): the reference's Transformer-XL
attention (relative key position embeddings, a hidden-state cache, attention spans) -- the transcription
calls our attention module and our learned position table, so the test isolates everything else.
Our gate runs in fp32 by design (routing decisions must not depend on autocast); the transcription
computes its gate in fp32 too, the rest in fp64.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from msmoe_dist.config.loader import load_config
from msmoe_dist.models.lm import MoELanguageModel
from msmoe_dist.moe.expert_dropout import experts_with_hidden_dropout

V, D, FF, E, K, B, S = 50, 16, 24, 4, 2, 2, 8


def _cfg(kind: str, layout: str, *extra: str):
    return load_config(
        None,
        [
            f"model.num_layers={4 if layout == 'glam' else 3}",
            f"model.d_model={D}",
            "model.num_heads=2",
            f"model.ffn_dim={FF}",
            f"model.max_seq_len={S}",
            f"data.seq_len={S}",
            "model.block_style=reference",
            f"model.layout={layout}",
            "model.tie_embeddings=false",
            "model.output_bias=true",
            "model.init=torch_default",
            "model.dropout_at=reference",
            "model.attention_bias=false",
            f"moe.num_experts={E}",
            f"moe.top_k={K}",
            f"moe.expert_ffn_dim={FF}",
            "moe.gate_bias=true",
            f"momentum.kind={kind}",
            "momentum.mu=0.7",
            "momentum.gamma=1.0",
            "momentum.adam_gamma=0.8",
            *extra,
        ],
    )


def _build(cfg) -> MoELanguageModel:
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        model = MoELanguageModel(cfg.model, cfg.moe, cfg.momentum, V)
    finally:
        torch.set_default_dtype(old)
    return model.eval()


def ref_gate(x_TD: Tensor, w_ED: Tensor, b_E: Tensor) -> tuple[Tensor, Tensor]:
    """custom_gates.py CustomNaiveGate_Balance_SMoE.forward (lines 46-67): gate = nn.Linear(d, E) WITH bias
    (line 22); top-k of the raw scores (sorted=False), softmax over those k."""
    logits = F.linear(x_TD.float(), w_ED.float(), b_E.float())
    val, idx = torch.topk(logits, k=K, dim=-1, largest=True, sorted=False)
    return idx, F.softmax(val, dim=-1).to(x_TD.dtype)


def ref_moe(x_TD: Tensor, gate_w, gate_b, w1_EFD, b1_EF, w2_EDF, b2_ED) -> Tensor:
    """custom_layers.py FMoE.forward (lines 187-310) with custom_transformer.py _Expert (lines 11-31):
    each chosen expert computes h4toh(act(htoh4(x))) with FMoELinear weights [E, out, in]; activation is
    models.py line 200 Sequential(ReLU, Dropout) (dropout off here, eval); the k outputs are combined by
    bmm(gate_score [T,1,k], out [T,k,D]) (custom_layers.py lines 276-283)."""
    idx_TK, score_TK = ref_gate(x_TD, gate_w, gate_b)
    outs = []
    for j in range(K):
        e = idx_TK[:, j]
        h = torch.einsum("tfd,td->tf", w1_EFD[e], x_TD) + b1_EF[e]
        outs.append(torch.einsum("tdf,tf->td", w2_EDF[e], F.relu(h)) + b2_ED[e])
    out_TKD = torch.stack(outs, dim=1)
    return torch.bmm(score_TK[:, None, :], out_TKD).squeeze(1)


def reference_lm_loss(model: MoELanguageModel, idx: Tensor, tgt: Tensor, kind: str, layout: str) -> Tensor:
    """models.py TransformerSeq.forward (lines 711-735) and TransformerSeqLayer.forward (lines 554-571)."""
    sign = 1.0 if kind == "none" else -1.0  # the reference subtracts its momentum: its experts are -ours
    mu, gamma2, gamma1, beta1, beta2 = 0.7, 1.0, 0.8, 0.9, 0.999
    h = model.tok_emb(idx) + model.pos_emb(torch.arange(S))  # line 714 (+ our positions: documented)
    zeros = torch.zeros_like(h)
    moment = (zeros, zeros, zeros) if kind == "adam" else zeros  # lines 717-720
    moe_i = 0
    for blk in model.blocks:
        h = blk.norm1(h + blk.attn(h))  # lines 558-561 (attention: ours, documented)
        if not blk.is_moe:  # GLaM dense layer: FeedForwardLayer (lines 175-187), h = norm3(h + ff(h)), line 569
            h = blk.norm2(h + blk.ffn.fc2(F.relu(blk.ffn.fc1(h))))
            continue
        m, ex = blk.moe, blk.moe.experts
        core = ref_moe(
            h.reshape(-1, D),
            m.router.weight,
            m.router.bias,
            ex.w1.transpose(1, 2),
            ex.b1,
            sign * ex.w2.transpose(1, 2),
            sign * ex.b2,
        ).view_as(h)  # + self.dropout(core_out): off in eval
        ln = blk.moe_norm  # the sublayer's own layer_norm (models.py line 210/258/315)
        if kind == "none":  # CustomizedMoEPositionwiseFF.forward, lines 213-229
            out = ln(h + core)
        elif kind == "heavy_ball":  # CustomizedMoEPositionwiseFFMoM.forward, lines 267-286
            moment = mu * moment + gamma2 * core
            out = ln(h - moment)
        elif moe_i < 1:  # CustomizedMoEPositionwiseFFAdam.forward, lines 324-373 (layerth < 1: the Adam step)
            momentum = mu * moment[2] + gamma2 * core
            p = beta1 * moment[0] + (1 - beta1) * core
            v = beta2 * moment[1] + (1 - beta2) * core**2
            adam = (gamma1 / torch.sqrt(v + 1e-8)) * p + h
            out, moment = ln(h - adam), (p, v, momentum)
        else:
            momentum = mu * moment[2] + gamma2 * core
            out, moment = ln(h - momentum), (moment[0], moment[1], momentum)
        h = blk.norm2(h + out)  # line 566
        moe_i += 1
    # line 734: out_emb = nn.Linear(H, V) WITH bias (line 605). The loss in fp32, as ours computes it (the
    # reference runs in fp32 throughout).
    logp = F.log_softmax(model.head(h).float(), dim=-1)
    return F.nll_loss(logp.reshape(-1, V), tgt.reshape(-1))


@pytest.mark.parametrize(
    "kind,layout",
    [("none", "switch"), ("heavy_ball", "switch"), ("adam", "switch"), ("heavy_ball", "glam")],
)
def test_reference_lm_matches_transcription(kind, layout):
    model = _build(_cfg(kind, layout))
    g = torch.Generator().manual_seed(1)
    idx, tgt = torch.randint(0, V, (B, S), generator=g), torch.randint(0, V, (B, S), generator=g)
    params = [p for p in model.parameters() if p.requires_grad]
    ours = model(idx, tgt).loss
    ref = reference_lm_loss(model, idx, tgt, kind, layout)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)
    g_ours = torch.autograd.grad(ours, params, allow_unused=True)
    g_ref = torch.autograd.grad(ref, params, allow_unused=True)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    for name, a, b in zip(names, g_ours, g_ref):
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
    # the gate bias and the output bias take part (and have a gradient)
    assert model.blocks[0].moe.router.bias.abs().sum() > 0 and model.head.bias.abs().sum() > 0


def test_chunked_output_with_bias_equals_full():
    cfg_full = _cfg("heavy_ball", "switch", "model.output_layer=full")
    cfg_chunk = _cfg("heavy_ball", "switch", "model.output_layer=chunked", "model.output_chunk_tokens=5")
    a, b = _build(cfg_full), _build(cfg_chunk)
    b.load_state_dict(a.state_dict())
    idx = torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(2))
    la, lb = a(idx, idx).loss, b(idx, idx).loss
    torch.testing.assert_close(la, lb, rtol=0, atol=1e-6)  # both take the softmax in fp32
    la.backward()
    lb.backward()
    assert float(a.head.bias.grad.abs().max()) > 0
    torch.testing.assert_close(a.head.bias.grad, b.head.bias.grad, rtol=0, atol=1e-7)
    torch.testing.assert_close(a.head.weight.grad, b.head.weight.grad, rtol=0, atol=1e-7)


def test_torch_default_init_is_pytorchs():
    """Bounds and spreads of PyTorch's defaults (models/reference_init.py lists them)."""
    torch.manual_seed(0)
    cfg = load_config(
        None,
        [
            "model.d_model=64",
            "model.num_layers=2",
            "model.ffn_dim=96",
            "model.block_style=reference",
            "model.init=torch_default",
            "model.tie_embeddings=false",
            "model.output_bias=true",
            "moe.num_experts=8",
            "moe.expert_ffn_dim=96",
            "moe.gate_bias=true",
        ],
    )
    m = MoELanguageModel(cfg.model, cfg.moe, cfg.momentum, 3000)
    emb = m.tok_emb.weight.detach()
    assert abs(float(emb.std()) - 1.0) < 0.02  # nn.Embedding: N(0, 1)

    def uniform(t: Tensor, bound: float) -> None:
        t = t.detach()
        assert float(t.abs().max()) <= bound
        assert abs(float(t.std()) - bound / math.sqrt(3)) < 0.06 * bound  # U(-b, b) has std b / sqrt(3)

    uniform(m.head.weight, 1 / math.sqrt(64))
    uniform(m.head.bias, 1 / math.sqrt(64))
    r = m.blocks[0].moe.router
    uniform(r.weight, 1 / math.sqrt(64))
    bias = r.bias.detach()
    assert float(bias.abs().max()) <= 1 / math.sqrt(64) and float(bias.abs().min()) > 0
    ex = m.blocks[0].moe.experts
    uniform(ex.w1, 1 / math.sqrt(64 * 96))  # FMoELinear: fan_in of a [E, out, in] tensor is out * in
    uniform(ex.w2, 1 / math.sqrt(64 * 96))
    assert float(ex.b1.detach().abs().max()) == 0 and float(ex.b2.detach().abs().max()) == 0
    assert bool((m.blocks[0].norm1.weight.detach() == 1).all())


@pytest.mark.parametrize("activation", ["relu", "gelu_tanh"])
def test_expert_hidden_dropout_is_after_the_activation(activation):
    """models.py line 200: the expert activation is Sequential(ReLU, Dropout(p)), so the mask multiplies
    relu(h) before the second FMoELinear (V-MoE's expert MlpBlock: gelu, then Dropout; for relu the order
    would not matter, for gelu it does). The same seed gives the same mask (CPU dropout draws by shape)."""
    torch.manual_seed(0)
    cfg = _cfg("none", "switch", f"moe.activation={activation}")
    act = F.relu if activation == "relu" else (lambda t: F.gelu(t, approximate="tanh"))
    ex = _build(cfg).blocks[0].moe.experts
    counts = [3, 0, 4, 2]
    x = torch.randn(sum(counts), D, dtype=torch.float64)
    torch.manual_seed(7)
    ours = experts_with_hidden_dropout(ex, x, counts, 0.4)
    torch.manual_seed(7)
    mask = F.dropout(torch.ones(sum(counts), FF, dtype=torch.float64), 0.4, training=True)
    rows, s = [], 0
    for e, n in enumerate(counts):
        hidden = act(x[s : s + n] @ ex.w1[e] + ex.b1[e]) * mask[s : s + n]
        rows.append(hidden @ ex.w2[e] + ex.b2[e])
        s += n
    torch.testing.assert_close(ours, torch.cat(rows), rtol=0, atol=1e-12)
    assert float((mask == 0).double().mean()) > 0.2  # the mask did drop something


def _dropout_calls(model, idx, monkeypatch) -> list[tuple[int, ...]]:
    seen: list[tuple[int, ...]] = []
    real = F.dropout

    def spy(t, p=0.5, training=True, inplace=False):
        if training and p > 0:
            seen.append(tuple(t.shape))
        return real(t, p, training, inplace)

    monkeypatch.setattr(F, "dropout", spy)
    model.train()(idx, idx)
    return seen


def test_dropout_placement(monkeypatch):
    """dropout_at=reference: dropout on the MoE output (models.py lines 217/224) and inside experts and dense
    FFNs (lines 183-184, 200); none on the embeddings (line 714) or the attention/FFN outputs (lines 561, 569).
    (Attention-probability dropout runs inside scaled_dot_product_attention in both, not through F.dropout.)"""
    idx = torch.randint(0, V, (B, S))
    ref = _build(_cfg("heavy_ball", "glam", "model.dropout=0.3", "moe.expert_dropout=0.3"))
    shapes = _dropout_calls(ref, idx, monkeypatch)
    bsd = (B, S, D)
    # 2 MoE blocks: expert hidden rows [T*K, FF] + MoE output [B, S, D]; 2 dense blocks: FFN hidden [B, S, FF]
    assert sorted(shapes) == sorted([(B * S * K, FF), bsd, (B * S * K, FF), bsd, (B, S, FF), (B, S, FF)])
    monkeypatch.undo()
    old = _build(_cfg("heavy_ball", "glam", "model.dropout=0.3", "model.dropout_at=all"))
    shapes = _dropout_calls(old, idx, monkeypatch)
    # embeddings + per block the attention output, and the MoE output or the FFN hidden and output
    assert sorted(shapes) == sorted([bsd] + [bsd, bsd] * 2 + [bsd, (B, S, FF), bsd] * 2)


def test_attention_without_biases():
    """models.py lines 101-104: the reference's query/key/value/output projections have no bias."""
    m = _build(_cfg("heavy_ball", "switch"))
    attn = m.blocks[0].attn
    assert attn.qkv.bias is None and attn.proj.bias is None
    idx = torch.randint(0, V, (B, S))
    m(idx, idx).loss.backward()
    assert attn.qkv.weight.grad is not None
