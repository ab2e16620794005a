"""Activation checkpointing (train.activation_checkpointing) gives the gradients of the plain run.

One process, tiny models with dropout 0.1 (the recomputed forward must see the forward's masks), for
every momentum kind, both block styles, the top-k and the StableMoE router (both stages, the stage-2
table filled inside a checkpointed forward) and the V-MoE; `block` and `selective` against `none`.
The recompute is observed (the sublayers run twice), and selective never runs an MoE layer twice.
"""

import pytest
import torch

from msmoe_dist.config.loader import load_config
from msmoe_dist.models.build import build_model

V, B, S = 40, 2, 8
TOL = dict(rtol=1e-5, atol=1e-6)
LM = [
    "model.num_layers=4",
    "model.layout=glam",
    "model.d_model=16",
    "model.num_heads=2",
    "model.ffn_dim=24",
    "model.max_seq_len=8",
    "data.seq_len=8",
    "model.dropout=0.1",
    "moe.num_experts=4",
    "moe.expert_ffn_dim=24",
]
KINDS = {
    "none": ["momentum.kind=none"],
    "heavy_ball": ["momentum.kind=heavy_ball", "momentum.learnable=per_layer"],
    "adam": ["momentum.kind=adam", "momentum.adam_layers=1"],
    "robust": ["momentum.kind=robust"],
}


def _grads(cfg, mode, inputs, step=0):
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.moe, cfg.momentum, cfg.vision, V if cfg.model.kind == "lm" else 0)
    model.set_activation_checkpointing(mode)
    model.train()
    model.set_step(step)
    calls = {"attention": 0, "moe": 0}
    for block in model.blocks:
        attention = block._attention

        def counted(x, attention=attention):
            calls["attention"] += 1
            return attention(x)

        block._attention = counted
        if block.is_moe:
            block.moe.register_forward_hook(lambda *_: calls.__setitem__("moe", calls["moe"] + 1))
    torch.manual_seed(1)  # the dropout masks
    out = model(*inputs)
    (out.loss + out.aux_loss).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), grads, calls, len(model.blocks), len(model.moe_layers())


def _check(cfg, inputs, step=0):
    loss, ref, _, n_blocks, n_moe = _grads(cfg, "none", inputs, step)
    for mode in ("block", "selective"):
        got_loss, got, calls, _, _ = _grads(cfg, mode, inputs, step)
        assert torch.equal(got_loss, loss), mode
        assert got.keys() == ref.keys(), mode
        for n, g in got.items():
            torch.testing.assert_close(g, ref[n], **TOL, msg=lambda m, n=n: f"{mode} {n}: {m}")
        assert calls["attention"] == 2 * n_blocks, (mode, calls)  # every block's attention ran again
        assert calls["moe"] == (2 if mode == "block" else 1) * n_moe, (mode, calls)


def _lm_inputs():
    seq = torch.randint(0, V, (B, S + 1), generator=torch.Generator().manual_seed(5))
    return seq[:, :-1], seq[:, 1:]


@pytest.mark.parametrize(
    "kind, style", [(k, "pre_ln") for k in KINDS] + [("adam", "reference"), ("heavy_ball", "reference")]
)
def test_lm_gradients_equal_the_plain_run(kind, style):
    extra = ["moe.z_loss_coef=0.001"] if kind == "none" else []
    _check(load_config(None, LM + KINDS[kind] + extra + [f"model.block_style={style}"]), _lm_inputs())


@pytest.mark.parametrize("step", [0, 3])
def test_stablemoe_both_stages(step):
    cfg = load_config(
        None,
        LM
        + [
            "moe.router=stablemoe",
            "moe.top_k=1",
            "moe.stable_switch_step=2",
            "moe.stable_distill_dim=8",
            "momentum.kind=heavy_ball",
        ],
    )
    _check(cfg, _lm_inputs(), step)


def test_vmoe_with_noisy_gating():
    cfg = load_config(
        None,
        [
            "model.kind=vit",
            "data.kind=synthetic_images",
            "vision.image_size=16",
            "vision.patch_size=4",
            "vision.num_classes=7",
            "vision.synthetic_classes=7",
            "model.num_layers=2",
            "model.d_model=16",
            "model.num_heads=2",
            "model.dropout=0.1",
            "moe.num_experts=4",
            "moe.expert_ffn_dim=24",
            "moe.noisy_gating=true",
            "vision.moe_every=2",
            "momentum.kind=robust",
        ],
    )
    images = torch.randn(B, 3, 16, 16, generator=torch.Generator().manual_seed(7))
    _check(cfg, (images, torch.tensor([1, 4])))


def test_evaluation_and_no_grad_do_not_recompute():
    cfg = load_config(None, LM + KINDS["heavy_ball"])
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.moe, cfg.momentum, cfg.vision, V)
    model.set_activation_checkpointing("block")
    with torch.no_grad():
        model.train()
        a = model(*_lm_inputs()).loss
    model.eval()
    b = model(*_lm_inputs()).loss
    assert b.requires_grad and b.grad_fn is not None and torch.isfinite(a)
    with pytest.raises(ValueError, match="unknown activation checkpointing 'all'"):
        model.set_activation_checkpointing("all")


def test_unknown_mode_is_a_one_line_error(cli, tmp_path):
    r = cli(
        "train",
        "--config",
        "configs/quickstart.yaml",
        f"train.run_dir={tmp_path}",
        "train.activation_checkpointing=all",
    )
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().count("\n") == 0 and "train.activation_checkpointing" in r.stderr
    assert "none|block|selective" in r.stderr and not any(tmp_path.iterdir())
