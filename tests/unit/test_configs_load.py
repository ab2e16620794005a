"""Every shipped configuration validates; the WikiText-103 set has the reference's values."""

from __future__ import annotations

from pathlib import Path

import pytest

from msmoe_dist.config.loader import load_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
ALL = sorted(CONFIGS.rglob("*.yaml"))
WT103 = sorted((CONFIGS / "wikitext103").glob("*.yaml"))


@pytest.mark.parametrize("path", ALL, ids=[str(p.relative_to(CONFIGS)) for p in ALL])
def test_config_file_validates(path):
    load_config(path, [])


def test_wikitext103_set_is_complete_and_matches_the_reference():
    names = {p.stem for p in WT103}
    methods = ("smoe", "momentum_smoe", "adam_smoe", "robust_momentum_smoe")
    sizes = ("small", "medium", "large", "glam_medium")
    assert names == {f"{m}_{s}" for m in methods for s in sizes}
    shape = {
        "small": (3, 128, 256, 0.7, 60_000, 96, 3000, 7e-4),
        "medium": (6, 352, 512, 0.1, 80_000, 48, 4000, 7e-4),
        "large": (12, 512, 1024, 0.1, 80_000, 24, 5000, 7e-4),
        "glam_medium": (12, 352, 512, 0.1, 120_000, 48, 4000, 7e-5),
    }
    kinds = {"smoe": "none", "momentum_smoe": "heavy_ball", "adam_smoe": "adam", "robust_momentum_smoe": "robust"}
    for path in WT103:
        method, size = next((m, s) for m in methods for s in sizes if path.stem == f"{m}_{s}")
        cfg = load_config(path, [])
        got = (
            cfg.model.num_layers,
            cfg.model.d_model,
            cfg.data.seq_len,
            cfg.model.dropout,
            cfg.train.max_steps,
            cfg.data.batch_size,
            cfg.optim.warmup_steps,
            cfg.optim.lr,
        )
        assert got == shape[size], path.name
        assert cfg.moe.expert_ffn_dim == cfg.model.d_model and (cfg.moe.num_experts, cfg.moe.top_k) == (16, 2)
        assert cfg.model.num_heads == 8 and cfg.model.block_style == "reference"
        assert cfg.model.layout == ("glam" if size == "glam_medium" else "switch")
        assert (cfg.optim.name, cfg.optim.beta2, cfg.optim.grad_clip, cfg.optim.schedule) == (
            "adam",
            0.999,
            0.0,
            "constant",
        )
        assert cfg.momentum.kind == kinds[method]
        if cfg.momentum.kind in ("heavy_ball", "adam"):
            assert (cfg.momentum.mu, cfg.momentum.gamma) == (0.7, 1.0)
        assert cfg.data.kind == "prepared" and cfg.data.sampler == "sequential"
        text = path.read_text()
        assert text.startswith("# ") and "Deviations from the reference" in text and "balance_loss_coef" in text
