"""V-MoE with the rachtsy/vmoe reference options, against a transcription of the reference forward pass.

Reference: rachtsy/vmoe (the authors' JAX/flax fork of V-MoE), heavy-ball at commit 2f980dd and robust
momentum at commit adb1a70, files vmoe/nn/vit_moe.py (EncoderBlock, EncoderMoe, VisionTransformerMoe),
vmoe/nn/routing.py (NoisyTopExpertsPerItemRouter), vmoe/vit_jax/models_vit.py (MlpBlock) and
vmoe/train/trainer.py (get_loss_fn, sigmoid_xent). `reference_vmoe_loss` is our own transcription of
those equations as plain tensor code, fed our model's parameters (the experts' last layer negated where
the reference subtracts its momentum); loss and gradients must agree to 1e-6 in fp64 (evaluation mode,
no gating noise, dropless: the reference's token groups and capacity are documented differences).
The attention sublayer is flax's standard multi-head attention with biases, as ours; the transcription
calls our attention module (and our patch embedding) for it.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from msmoe_dist.config.loader import load_config
from msmoe_dist.models import VisionMoE

D, E, K, C, B = 32, 4, 2, 10, 3
EPS = 1e-6  # flax nn.LayerNorm's default epsilon

REFERENCE_OPTIONS = [
    "model.norm_eps=1e-6",
    "moe.activation=gelu_tanh",
    "vision.pre_logits=true",
    "vision.head_bias=neg_log_classes",
    "vision.loss=sigmoid_ce",
]


def _model(kind: str, *extra: str) -> VisionMoE:
    momentum = {
        "none": ["momentum.kind=none"],
        "heavy_ball": ["momentum.kind=heavy_ball", "momentum.mu=0.8", "momentum.gamma=1.0", "model.post_mlp_norm=true"],
        "robust": [
            "momentum.kind=robust",
            "momentum.rho=0.2",
            "momentum.kappa=1.25",
            "model.post_mlp_norm=true",
            "momentum.lookahead=normed",
            "momentum.lookahead_dense=true",
        ],
    }[kind]
    cfg = load_config(
        None,
        [
            "model.kind=vit",
            "data.kind=synthetic_images",
            "vision.image_size=32",
            "vision.patch_size=8",
            f"vision.num_classes={C}",
            "model.num_layers=4",
            f"model.d_model={D}",
            "model.num_heads=4",
            "model.ffn_dim=48",
            f"moe.num_experts={E}",
            f"moe.top_k={K}",
            "moe.expert_ffn_dim=40",
            "moe.gate=softmax_topk",
            "moe.capacity_factor=0",
            *REFERENCE_OPTIONS,
            *momentum,
            *extra,
        ],
    )
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        model = VisionMoE(cfg.model, cfg.moe, cfg.momentum, cfg.vision)
    finally:
        torch.set_default_dtype(old)
    with torch.no_grad():  # away from the zero head (whose zero weight would stop every other gradient)
        g = torch.Generator().manual_seed(3)
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model.eval()


def ln(mod, x: Tensor) -> Tensor:
    """flax nn.LayerNorm: epsilon 1e-6."""
    return F.layer_norm(x, (D,), mod.weight, mod.bias, EPS)


def gelu(x: Tensor) -> Tensor:
    """flax nn.gelu: approximate=True by default (the tanh form)."""
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def ref_mlp(x: Tensor, w1, b1, w2, b2) -> Tensor:
    """models_vit.py MlpBlock.__call__ (2f980dd lines 79-102): Dense, gelu, Dropout, Dense, Dropout."""
    return gelu(x @ w1 + b1) @ w2 + b2


def ref_moe(x_BND: Tensor, moe, sign: float) -> Tensor:
    """routing.py NoisyTopExpertsPerItemRouter (adb1a70 lines 63-91, deterministic): logits = Dense(E,
    use_bias=False)(x), softmax over all experts, the top-k probabilities are the combine weights; each
    expert is an MlpBlock (vit_moe.py MlpMoeBlock)."""
    x = x_BND.reshape(-1, D)
    probs = torch.softmax(F.linear(x.float(), moe.router.weight.float()), dim=-1)  # our gate: fp32 by design
    top_p, top_e = probs.topk(K, dim=-1)
    ex = moe.experts
    out = torch.zeros_like(x)
    for j in range(K):
        e = top_e[:, j]
        y = torch.einsum("tf,tfd->td", gelu(torch.einsum("td,tdf->tf", x, ex.w1[e]) + ex.b1[e]), ex.w2[e]) + ex.b2[e]
        out = out + top_p[:, j, None].to(x.dtype) * sign * y
    return out.view_as(x_BND)


def reference_vmoe_loss(model: VisionMoE, images: Tensor, labels_BC: Tensor, kind: str) -> Tensor:
    """VisionTransformerMoe.__call__ (adb1a70 vit_moe.py lines 378-426), EncoderMoe.__call__ (lines 268-305),
    EncoderBlock.__call__ (heavy-ball: 2f980dd lines 166-206; robust: adb1a70 lines 166-220)."""
    momentum = kind != "none"
    rho, kappa = 0.2, 1.25  # the reference's mu and gamma in robust mode (adb1a70 common.py lines 248-251)
    eps_r = rho**3 / ((kappa - 1) * (1 - rho) ** 2 * (1 + rho))  # adb1a70 vit_moe.py lines 199-202
    beta_r = kappa * (1 - rho) ** 2 * (1 + rho)
    alpha_r = kappa * rho**3 / (kappa - 1)
    mu, gamma = 0.8, 1.0  # heavy-ball (2f980dd common.py)
    x = model.patch_proj(images).flatten(2).transpose(1, 2)
    x = torch.cat([model.cls_token.expand(images.shape[0], -1, -1), x], dim=1) + model.pos_emb  # lines 396-402
    moment = torch.zeros_like(x)  # line 295
    for blk in model.blocks:
        inputs = x
        x = blk.attn(ln(blk.norm1, inputs)) + inputs  # lines 168-179 (dropout off)
        y = ln(blk.norm2, x)  # line 181
        if kind == "robust":  # adb1a70 lines 197-204: the look-ahead after the LayerNorm, for every block
            y = y + eps_r * beta_r * moment
        if not blk.is_moe:
            y = ref_mlp(y, blk.ffn.fc1.weight.t(), blk.ffn.fc1.bias, blk.ffn.fc2.weight.t(), blk.ffn.fc2.bias)
            x = ln(blk.post_norm, x + y) if momentum else x + y  # adb1a70 lines 207-212
            continue
        y = ref_moe(y, blk.moe, -1.0 if momentum else 1.0)
        if kind == "heavy_ball":  # 2f980dd lines 198-203
            moment = mu * moment + gamma * y
            x = ln(blk.post_norm, x - moment)
        elif kind == "robust":  # adb1a70 lines 213-217
            moment = -y + alpha_r * moment
            x = ln(blk.post_norm, x + beta_r * moment)
        else:
            x = x + y  # line 220
    x = ln(model.final_norm, x)[:, 0]  # encoder_norm (line 303); classifier='token'
    x = torch.tanh(model.pre_logits[0](x))  # lines 412-414: representation_size = hidden_size
    logits = model.head(x).float()  # lines 418-423; the loss in fp32, as ours
    # trainer.py get_loss_fn sigmoid_xent (2f980dd lines 451-454), mean over images (line 671)
    bce = -(labels_BC * F.logsigmoid(logits) + (1 - labels_BC) * F.logsigmoid(-logits))
    return bce.sum(-1).mean()


@pytest.mark.parametrize("kind", ["none", "heavy_ball", "robust"])
def test_vmoe_matches_transcription(kind):
    model = _model(kind)
    g = torch.Generator().manual_seed(1)
    images = torch.randn(B, 3, 32, 32, generator=g, dtype=torch.float64)
    labels = torch.randint(0, C, (B,), generator=g)
    mixed = 0.7 * F.one_hot(labels, C).double() + 0.3 * F.one_hot(labels.roll(1), C).double()  # mixup rows
    params = [p for p in model.parameters() if p.requires_grad]
    for targets, rows in ((labels, F.one_hot(labels, C).double()), (mixed, mixed)):
        ours = model(images, targets).loss
        ref = reference_vmoe_loss(model, images, rows, kind)
        torch.testing.assert_close(ours, ref.to(ours.dtype), rtol=1e-6, atol=1e-6)  # both fp32 losses
    g_ours = torch.autograd.grad(ours, params)
    g_ref = torch.autograd.grad(ref, params)
    for (name, _), a, b in zip(model.named_parameters(), g_ours, g_ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)


def test_vmoe_head_starts_at_minus_log_k():
    """common.py get_vmoe_config (adb1a70 lines 204-207): head_bias_init = -log(num_classes), a zero head
    kernel (vit_moe.py lines 369-374); pre-logits of representation_size = hidden_size."""
    cfg = load_config(None, ["model.kind=vit", "data.kind=synthetic_images", "vision.image_size=32",
                             "vision.patch_size=8", "vision.num_classes=10", *REFERENCE_OPTIONS])  # fmt: skip
    m = VisionMoE(cfg.model, cfg.moe, cfg.momentum, cfg.vision)
    assert torch.equal(m.head.bias.detach(), torch.full((10,), -math.log(10)))
    assert float(m.head.weight.detach().abs().max()) == 0
    assert m.pre_logits[0].weight.shape == (cfg.model.d_model, cfg.model.d_model)
    assert all(n.eps == 1e-6 for n in m.modules() if isinstance(n, torch.nn.LayerNorm))
    # every sigmoid starts at 1/(K+1): the expected positives, 1/K of the classes, cost log(K+1) each
    logits = m(torch.randn(2, 3, 32, 32)).logits
    torch.testing.assert_close(torch.sigmoid(logits), torch.full((2, 10), 1 / 11))


def test_vmoe_init_is_the_forks_flax_init():
    """model.init=vmoe (models/reference_init.vmoe_init): xavier-uniform MLP/attention kernels, N(0, 1e-6) MLP
    biases (models_vit.py MlpBlock lines 74-77; vit_moe.py EncoderBlock kernel_init), LeCun-normal router
    (routing.py nn.Dense(use_bias=False): flax's default kernel init), one draw for all experts
    (common.py: encoder.moe.split_rngs = False), zero head kernel."""
    torch.manual_seed(0)
    cfg = load_config(None, ["model.kind=vit", "data.kind=synthetic_images", "vision.image_size=32",
                             "vision.patch_size=8", "vision.num_classes=10", "model.d_model=64", "model.ffn_dim=96",
                             "moe.expert_ffn_dim=96", "moe.num_experts=4", "model.num_layers=2",
                             "model.init=vmoe", *REFERENCE_OPTIONS])  # fmt: skip
    m = VisionMoE(cfg.model, cfg.moe, cfg.momentum, cfg.vision)
    dense, moe = m.blocks[0], m.blocks[1]
    ex = moe.moe.experts
    for t in (ex.w1, ex.w2, ex.b1, ex.b2):
        assert all(torch.equal(t[0], t[e]) for e in range(1, 4))

    def uniform(t: Tensor, bound: float) -> None:
        t = t.detach()
        assert float(t.abs().max()) <= bound and float(t.abs().max()) > 0.95 * bound
        assert abs(float(t.std()) - bound / math.sqrt(3)) < 0.08 * bound

    uniform(ex.w1[0], math.sqrt(6 / (64 + 96)))
    uniform(dense.ffn.fc1.weight, math.sqrt(6 / (64 + 96)))
    for w in dense.attn.qkv.weight.view(3, 64, 64):  # each of q, k, v is its own [d, d] kernel
        uniform(w, math.sqrt(6 / 128))
    for b in (ex.b1, dense.ffn.fc2.bias):
        assert 0 < float(b.detach().abs().max()) < 1e-5
    router = moe.moe.router.weight.detach()
    std = math.sqrt(1 / 64) / 0.87962566103423978
    assert float(router.abs().max()) <= 2 * std and abs(float(router.std()) - math.sqrt(1 / 64)) < 0.2 / 8
    assert float(m.head.weight.detach().abs().max()) == 0 and torch.equal(
        m.head.bias.detach(), torch.full((10,), -math.log(10))
    )


def test_expert_dropout_placement(monkeypatch):
    """The paper configs' dropout: encoder 0 (no call), experts 0.2 after the gelu and on each expert's output,
    as every expert is an MlpBlock (models_vit.py lines 90-101) inside MlpMoeBlock."""
    model = _model("heavy_ball", "moe.expert_dropout=0.2", "moe.expert_output_dropout=0.2").train()
    seen: list[tuple[tuple[int, ...], float]] = []
    real = F.dropout

    def spy(t, p=0.5, training=True, inplace=False):
        if training and p > 0:
            seen.append((tuple(t.shape), p))
        return real(t, p, training, inplace)

    monkeypatch.setattr(F, "dropout", spy)
    model(torch.randn(B, 3, 32, 32, dtype=torch.float64), torch.randint(0, C, (B,)))
    rows = B * 17 * K  # 16 patches + the class token, top-2
    assert seen == [((rows, 40), 0.2), ((rows, D), 0.2)] * 2  # two MoE blocks; nothing else drops
