"""V-MoE: router losses (importance, load) by hand and by Monte Carlo, capacity in evaluation, the ViT."""

import math
from pathlib import Path

import pytest
import torch

from msmoe_dist.config.loader import load_config
from msmoe_dist.config.moe_placement import vit_moe_blocks
from msmoe_dist.models import VisionMoE, classification_loss
from msmoe_dist.moe import MoELayer
from msmoe_dist.moe.router import Router, importance_loss, load_loss
from msmoe_dist.momentum import MomentumState

TINY = [
    "model.kind=vit",
    "data.kind=synthetic_images",
    "vision.image_size=32",
    "vision.patch_size=8",
    "vision.num_classes=10",
    "model.num_layers=4",
    "model.d_model=32",
    "model.num_heads=4",
    "moe.num_experts=4",
    "moe.expert_ffn_dim=32",
    "moe.activation=gelu",
    "moe.gate=softmax_topk",
]


def tiny_cfg(*extra):
    return load_config(None, TINY + list(extra))


def test_importance_loss_by_hand():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3]])
    imp = torch.tensor([0.8, 0.8, 0.4])  # column sums
    mean = imp.mean()
    expected = ((imp - mean) ** 2).mean() / mean**2
    assert torch.allclose(importance_loss(probs), expected)
    assert float(importance_loss(torch.full((5, 4), 0.25))) == 0.0


def test_load_loss_matches_monte_carlo():
    """p[t, e] = P(clean[t, e] + fresh noise >= k-th largest noisy logit of t), estimated by sampling."""
    g = torch.Generator().manual_seed(0)
    T, E, k, std = 6, 5, 2, 0.3
    clean = torch.randn(T, E, generator=g)
    noisy = clean + std * torch.randn(T, E, generator=g)
    threshold = noisy.topk(k, dim=-1).values[:, -1:]
    draws = clean[None] + std * torch.randn(200_000, T, E, generator=g)
    p_mc = (draws >= threshold[None]).double().mean(0)
    p_mean = p_mc.mean(0)
    expected = p_mean.var(unbiased=False) / p_mean.mean() ** 2
    got = load_loss(clean, noisy, std, k)
    assert abs(float(got) - float(expected)) < 0.02 * float(expected) + 1e-3


def test_vmoe_router_losses_in_training_and_eval():
    cfg = tiny_cfg("moe.balance_loss=vmoe", "moe.balance_loss_coef=0.5", "moe.noisy_gating=true").moe
    torch.manual_seed(0)
    router = Router(16, cfg)
    router.reset_parameters(1.0)
    x = torch.randn(64, 16)
    train_r = router(x)
    assert train_r.aux_loss.requires_grad
    router.eval()
    eval_r = router(x)
    clean = torch.softmax(x @ router.weight.T, dim=-1)
    # Evaluation: no noise, so no load loss: the importance loss alone.
    assert torch.allclose(eval_r.balance_loss, importance_loss(clean))
    assert torch.allclose(eval_r.aux_loss, 0.5 * importance_loss(clean))
    # Training: importance on the clean softmax plus a positive load loss.
    assert float(train_r.balance_loss.detach()) > float(importance_loss(clean).detach())


def test_eval_capacity_factor_applies_in_eval_only():
    cfg = tiny_cfg("moe.capacity_factor=0.5", "moe.eval_capacity_factor=4.0").moe
    layer = MoELayer(32, cfg)
    x = torch.randn(2, 40, 32)
    train_drop = layer(x, collect_stats=True).stats.num_dropped
    layer.eval()
    assert layer.capacity_factor == 4.0
    assert int(layer(x, collect_stats=True).stats.num_dropped) == 0 < int(train_drop)
    same = tiny_cfg("moe.capacity_factor=0.5").moe  # eval_capacity_factor < 0: as in training
    layer2 = MoELayer(32, same).eval()
    assert layer2.capacity_factor == 0.5


def test_moe_block_layouts():
    assert vit_moe_blocks(8, "every", 2, 0) == [1, 3, 5, 7]  # V-MoE "Every-2"
    assert vit_moe_blocks(8, "every", 1, 0) == list(range(8))
    assert vit_moe_blocks(8, "last", 2, 2) == [6, 7]
    assert VisionMoE(*_parts(tiny_cfg())).moe_blocks == [1, 3]


def _parts(cfg):
    return cfg.model, cfg.moe, cfg.momentum, cfg.vision


def test_vit_shapes_loss_and_backward():
    cfg = tiny_cfg("momentum.kind=heavy_ball", "vision.pooling=gap")
    torch.manual_seed(0)
    model = VisionMoE(*_parts(cfg))
    x, y = torch.randn(3, 3, 32, 32), torch.tensor([1, 2, 3])
    out = model(x, y, collect_stats=True)
    assert out.logits.shape == (3, 10) and len(out.stats) == 2
    assert math.isclose(out.loss.item(), math.log(10), rel_tol=1e-5)  # zero-initialised head
    out.loss.backward()
    assert model.patch_proj.weight.grad is not None
    with pytest.raises(ValueError, match="vision.image_size"):
        model(torch.randn(1, 3, 16, 16))


def test_soft_targets_equal_hard_for_one_hot():
    logits = torch.randn(4, 6)
    y = torch.tensor([0, 5, 2, 2])
    soft = torch.nn.functional.one_hot(y, 6).float()
    for red in ("mean", "sum"):
        assert torch.allclose(classification_loss(logits, soft, red), classification_loss(logits, y, red))


def test_grouped_equals_loop_in_the_vit():
    torch.manual_seed(0)
    a = VisionMoE(*_parts(tiny_cfg("momentum.kind=robust")))
    b = VisionMoE(*_parts(tiny_cfg("momentum.kind=robust", "moe.expert_impl=loop")))
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(a(x).logits, b(x).logits, atol=1e-6)


@pytest.mark.parametrize("kind", ["heavy_ball", "adam", "robust"])
def test_momentum_state_passes_through_dense_blocks(kind):
    cfg = tiny_cfg(f"momentum.kind={kind}")
    torch.manual_seed(0)
    model = VisionMoE(*_parts(cfg)).eval()
    x = model.patch_proj(torch.randn(2, 3, 32, 32)).flatten(2).transpose(1, 2)
    x = torch.cat([model.cls_token.expand(2, -1, -1), x], 1) + model.pos_emb
    state = MomentumState()
    for i, block in enumerate(model.blocks):
        x, new_state, _, _ = block(x, state, model.momentum)
        if i in model.moe_blocks:
            assert new_state.p is not None and new_state is not state
        else:
            assert new_state is state  # dense block: the state passes through untouched
        state = new_state


def test_heavy_ball_with_mu_zero_equals_smoe():
    torch.manual_seed(0)
    a = VisionMoE(*_parts(tiny_cfg()))
    b = VisionMoE(*_parts(tiny_cfg("momentum.kind=heavy_ball", "momentum.mu=0.0", "momentum.gamma=1.0")))
    b.load_state_dict(a.state_dict(), strict=False)
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(a(x).logits, b(x).logits, atol=1e-6)


def test_vit_benchmark_prints_every_variant_against_vmoe():
    """msmoe-bench vit runs end to end on the tiny config (figures only; no timing is asserted)."""
    from msmoe_dist.bench.cli import build_parser
    from msmoe_dist.bench.vit_step import run_vit_bench

    tiny = Path(__file__).resolve().parents[2] / "configs" / "imagenet" / "tiny_synthetic.yaml"
    args = build_parser().parse_args(["vit", "--config", str(tiny), "--batch", "2", "--repeats", "1", "--warmup", "0"])
    res = run_vit_bench(args)
    assert set(res["ratio_vs_smoe"]) == {"none", "heavy_ball", "adam", "robust"}
    assert res["ratio_vs_smoe"]["none"] == 1.0 and all(v > 0 for v in res["images_per_s"].values())


def test_resume_refuses_a_different_vision_network_but_not_other_augmentation():
    from pathlib import Path

    from msmoe_dist.checkpoint import CheckpointError, CheckpointMeta
    from msmoe_dist.config.loader import config_to_dict
    from msmoe_dist.config.model_spec import ModelSpec

    layout = {"engine": "native"}
    saved = CheckpointMeta(4, layout, config_to_dict(tiny_cfg()))
    saved.check_resume(
        Path("step_4"), layout, ModelSpec.of(tiny_cfg("vision.mixup_alpha=0.2", "vision.randaugment_ops=2"))
    )
    with pytest.raises(CheckpointError, match="vision.patch_size"):
        saved.check_resume(Path("step_4"), layout, ModelSpec.of(tiny_cfg("vision.patch_size=16")))
