"""The paper configurations use the reference-exact options (docs/reference_differences.md), and the
options are refused where they would be silently unused."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from msmoe_dist.config.errors import ConfigError
from msmoe_dist.config.loader import load_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize("path", sorted((CONFIGS / "wikitext103").glob("*.yaml")), ids=lambda p: p.stem)
def test_wikitext103_configs_are_reference_exact(path):
    cfg = load_config(path, [])
    m, moe = cfg.model, cfg.moe
    assert (m.init, m.output_bias, m.dropout_at, m.block_style) == ("torch_default", True, "reference", "reference")
    assert moe.gate_bias and moe.expert_dropout == m.dropout  # --dropout everywhere the reference puts it
    assert moe.expert_output_dropout == 0.0 and not m.attention_bias


@pytest.mark.parametrize("name", ["vmoe_s32", "momentum_vmoe_s32", "robust_vmoe_s32", "adam_vmoe_s32"])
def test_imagenet_configs_are_reference_exact(name):
    path = CONFIGS / "imagenet" / f"{name}.yaml"
    cfg = load_config(path, [])
    m, moe, v = cfg.model, cfg.moe, cfg.vision
    # vmoe_s32_last2_ilsvrc2012_randaug_light1.py + common.py (rachtsy/vmoe 2f980dd / adb1a70)
    assert cfg.data.batch_size * 32 == 8192 and cfg.train.max_steps == math.ceil(300 * 1_268_355 / 8192)
    assert (moe.capacity_factor, moe.eval_capacity_factor) == (1.05, 4.0)
    assert (m.dropout, moe.expert_dropout, moe.expert_output_dropout) == (0.0, 0.2, 0.2)
    assert (v.randaugment_ops, v.randaugment_magnitude, v.mixup_alpha) == (2, 10, 0.2)
    assert (v.loss, v.pre_logits, v.head_bias) == ("sigmoid_ce", True, "neg_log_classes")
    assert (m.norm_eps, moe.activation, m.init) == (1e-6, "gelu_tanh", "vmoe")
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.grad_clip, cfg.optim.warmup_steps) == (
        3e-3,
        0.1,
        1.0,
        10000,
    )
    assert math.isclose(cfg.optim.lr * cfg.optim.min_lr_ratio, 1e-5, rel_tol=1e-6)
    assert m.post_mlp_norm == (cfg.momentum.kind != "none")
    if cfg.momentum.kind == "robust":
        assert (cfg.momentum.rho, cfg.momentum.kappa) == (0.2, 1.25)
        assert cfg.momentum.lookahead == "normed" and cfg.momentum.lookahead_dense
    if cfg.momentum.kind == "heavy_ball":
        assert (cfg.momentum.mu, cfg.momentum.gamma) == (0.8, 1.0)
    text = path.read_text()
    for claim in ("8192", "4.0", "RandAugment(2, 10)", "mixup", "sigmoid", "pre-logits", "-log(1000)"):
        assert claim in text, claim


def test_stablemoe_base_is_reference_exact():
    cfg = load_config(CONFIGS / "stablemoe" / "base.yaml", [])
    assert cfg.model.layout == "middle" and cfg.model.layer_insert
    assert cfg.moe.stable_router_input == "residual"
    assert cfg.model.embed_scale and cfg.model.init == "fairseq" and cfg.model.tie_embeddings


@pytest.mark.parametrize(
    "overrides,keys",
    [
        (["model.kind=vit", "data.kind=synthetic_images", "model.init=torch_default"], "model.init"),
        (["model.post_mlp_norm=true", "model.block_style=reference"], "model.post_mlp_norm"),
        (["model.layer_insert=true"], "model.layer_insert"),
        (["moe.gate_bias=true", "moe.router=stablemoe", "moe.top_k=1"], "moe.gate_bias"),
        (["moe.stable_router_input=residual"], "moe.stable_router_input"),
        (["moe.expert_dropout=1.0"], "moe.expert_dropout"),
        (["model.norm_eps=0"], "model.norm_eps"),
        (["momentum.lookahead=normed", "model.block_style=reference"], "momentum.lookahead"),
    ],
)
def test_unused_or_out_of_range_reference_options_are_refused(overrides, keys):
    with pytest.raises(ConfigError, match=keys.replace(".", r"\.")):
        load_config(None, overrides)
