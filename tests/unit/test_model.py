"""The momentum SMoE language model: every variant runs, and structural promises hold."""

import itertools

import pytest
import torch

from msmoe_dist.config.moe_placement import lm_moe_blocks
from msmoe_dist.config.schema import ModelConfig, MoEConfig, MomentumConfig
from msmoe_dist.models import MoELanguageModel
from msmoe_dist.momentum import MomentumState

V = 50


def make(kind="heavy_ball", style="pre_ln", layout="switch", position="learned", seed=0, **mom):
    torch.manual_seed(seed)
    mcfg = ModelConfig(
        num_layers=4,
        d_model=32,
        num_heads=4,
        ffn_dim=48,
        max_seq_len=16,
        block_style=style,
        layout=layout,
        position=position,
    )
    moe = MoEConfig(num_experts=4, top_k=2, expert_ffn_dim=24, balance_loss_coef=0.01, z_loss_coef=0.001)
    return MoELanguageModel(mcfg, moe, MomentumConfig(kind=kind, **mom), V)


def batch(seed=1, b=3, s=12):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, V, (b, s + 1), generator=g)
    return idx[:, :-1], idx[:, 1:]


@pytest.mark.parametrize(
    "kind,style,layout",
    list(itertools.product(["none", "heavy_ball", "adam", "robust"], ["pre_ln", "reference"], ["switch", "glam"])),
)
def test_every_variant_trains_a_step(kind, style, layout):
    model = make(kind, style, layout)
    x, y = batch()
    out = model(x, y, collect_stats=True)
    assert torch.isfinite(out.loss) and out.aux_loss > 0
    assert len(out.stats) == model.num_moe_layers == len(lm_moe_blocks(4, layout))
    (out.loss + out.aux_loss).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    if kind != "none":
        assert all("momentum_norm" in s for s in out.stats)


def test_heavy_ball_with_mu_zero_gamma_one_is_smoe():
    x, y = batch()
    base = make("none").eval()
    hb = make("heavy_ball", mu=0.0, gamma=1.0).eval()
    hb.load_state_dict(base.state_dict())
    torch.testing.assert_close(hb(x, y).loss, base(x, y).loss, rtol=0, atol=1e-6)


def test_momentum_changes_the_function():
    x, y = batch()
    base = make("none").eval()
    hb = make("heavy_ball", mu=0.7).eval()
    hb.load_state_dict(base.state_dict())
    with torch.no_grad():
        assert abs(hb(x, y).loss.item() - base(x, y).loss.item()) > 1e-6


def test_glam_dense_blocks_pass_momentum_through():
    model = make("heavy_ball", layout="glam").eval()
    dense = model.blocks[1]
    assert not dense.is_moe and model.blocks[0].is_moe and model.blocks[2].is_moe
    state = MomentumState(p=torch.randn(2, 5, 32))
    _, out_state, aux, _ = dense(torch.randn(2, 5, 32), state, model.momentum)
    assert out_state is state and aux is None


@pytest.mark.parametrize("position", ["learned", "rotary"])
def test_causal(position):
    model = make("robust", position=position).eval()
    x, _ = batch(s=10)
    x2 = x.clone()
    x2[:, 7:] = (x2[:, 7:] + 1) % V
    l1 = model(x, return_logits=True).logits
    l2 = model(x2, return_logits=True).logits
    torch.testing.assert_close(l1[:, :7], l2[:, :7])
    assert not torch.allclose(l1[:, 7:], l2[:, 7:])


def test_tied_and_untied_embeddings():
    model = make()
    assert model.head.weight is model.tok_emb.weight
    torch.manual_seed(0)
    untied = MoELanguageModel(
        ModelConfig(num_layers=2, d_model=32, num_heads=4, max_seq_len=16, tie_embeddings=False),
        MoEConfig(num_experts=4, top_k=1, expert_ffn_dim=8),
        MomentumConfig(),
        V,
    )
    assert untied.head.weight is not untied.tok_emb.weight


def test_no_tensor_state_left_on_modules_after_forward():
    model = make("adam")
    x, y = batch()
    tensors_before = {
        (n, k) for n, m in model.named_modules() for k, v in vars(m).items() if isinstance(v, torch.Tensor)
    }
    model(x, y)
    tensors_after = {
        (n, k) for n, m in model.named_modules() for k, v in vars(m).items() if isinstance(v, torch.Tensor)
    }
    assert tensors_after == tensors_before


def test_sequence_longer_than_table_is_refused():
    model = make()
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 17, dtype=torch.long))
