"""Configuration of the StableMoE router, the middle layout and the fluctuation logging."""

from pathlib import Path

import pytest

from msmoe_dist.config.loader import ConfigError, load_config
from msmoe_dist.config.moe_placement import lm_moe_blocks

STABLE = ["moe.router=stablemoe", "moe.top_k=1"]
CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "stablemoe"


def error(overrides) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def test_shipped_configs_load():
    base = load_config(str(CONFIGS / "base.yaml"), [])
    assert (base.moe.router, base.moe.num_experts, base.model.layout) == ("stablemoe", 32, "middle")
    assert base.moe.stable_switch_step * 10 == base.train.max_steps
    tiny = load_config(str(CONFIGS / "tiny.yaml"), [])
    assert tiny.moe.stable_switch_step * 10 == tiny.train.max_steps


def test_valid_stablemoe_settings_are_accepted():
    load_config(
        None,
        STABLE
        + [
            "moe.stable_switch_step=0",
            "moe.stable_balance_coef=0",
            "model.layout=middle",
            "momentum.kind=heavy_ball",
            "logging.fluct_every=0",
        ],
    )
    load_config(None, STABLE + ["momentum.kind=adam", "model.layout=middle", "momentum.adam_layers=1"])
    assert lm_moe_blocks(12, "middle") == [6]


@pytest.mark.parametrize(
    "overrides, keys, fragment",
    [
        (["moe.router=stablemoe"], ["moe.router", "moe.top_k"], "expected moe.top_k=1, got 2"),
        (STABLE + ["moe.balance_loss_coef=0.01"], ["moe.router", "moe.balance_loss_coef"], "stable_balance_coef"),
        (STABLE + ["moe.z_loss_coef=0.001"], ["moe.z_loss_coef"], "expected 0"),
        (STABLE + ["moe.noisy_gating=true"], ["moe.noisy_gating"], "expected 0/false"),
        (["moe.stable_distill_coef=0"], ["moe.stable_distill_coef"], "positive"),
        (["moe.stable_balance_coef=-1"], ["moe.stable_balance_coef"], "non-negative"),
        (["moe.stable_distill_dim=0"], ["moe.stable_distill_dim"], ">= 1"),
        (["moe.stable_switch_step=-1"], ["moe.stable_switch_step"], "non-negative"),
        (["moe.router=hash"], ["moe.router"], "stablemoe"),
        (["logging.fluct_every=-1"], ["logging.fluct_every"], "non-negative"),
        (["logging.fluct_tokens=0"], ["logging.fluct_tokens"], "positive"),
        (
            ["momentum.kind=adam", "model.layout=middle", "momentum.adam_layers=2"],
            ["momentum.adam_layers"],
            "number of MoE layers (1",
        ),
    ],
)
def test_errors_name_their_keys(overrides, keys, fragment):
    msg = error(overrides)
    for key in keys:
        assert key in msg, msg
    assert fragment in msg, msg
