"""ModelSpec: which config keys define the network, and what a checkpoint's saved config may differ in."""

from __future__ import annotations

import copy
import dataclasses

import pytest

from msmoe_dist.config import ModelSpec, config_to_dict, load_config
from msmoe_dist.config.fields import arch_keys, section_fields

VISION_SHAPE_KEYS = (
    "image_size",
    "patch_size",
    "num_classes",
    "pooling",
    "moe_layout",
    "moe_every",
    "moe_last",
    "pre_logits",
)
VIT = ["model.kind=vit", "data.kind=synthetic_images", "vision.num_classes=10"]
# the exceptions, tested on their own (moe.overlap_chunks: tests/unit/test_overlap_plan.py)
SAME_WEIGHTS = {"model.output_chunk_tokens", "model.output_layer", "moe.overlap_chunks"}


def lm(*overrides: str):
    return load_config(None, list(overrides))


def vit(*overrides: str):
    return load_config(None, VIT + list(overrides))


def _other_value(value):
    """A value of the same type that differs from ``value``."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    return value + "_other"


def test_the_vision_shape_keys_are_marked_in_the_schema():
    assert arch_keys("vision") == VISION_SHAPE_KEYS
    assert all(arch_keys(s) == () for s in ("model", "moe", "momentum", "data", "optim", "train"))


def test_of_holds_the_network_sections_and_vit_shape_only():
    cfg = vit("optim.lr=0.5")
    spec = ModelSpec.of(cfg)
    assert (spec.model, spec.moe, spec.momentum) == (cfg.model, cfg.moe, cfg.momentum)
    assert spec.vision == {k: getattr(cfg.vision, k) for k in VISION_SHAPE_KEYS}
    assert ModelSpec.of(lm()).vision == {}  # a language model has no image shape
    # Equal specs mean the same network: training-only keys do not count, network keys do.
    assert ModelSpec.of(lm("optim.lr=0.5", "vision.patch_size=16", "data.batch_size=3")) == ModelSpec.of(lm())
    assert ModelSpec.of(vit("vision.mixup_alpha=0.2")) == ModelSpec.of(vit())
    assert ModelSpec.of(vit("vision.patch_size=16")) != ModelSpec.of(vit())
    assert ModelSpec.of(lm("model.d_model=64")) != ModelSpec.of(lm())


def test_of_copies_and_is_frozen():
    cfg = lm()
    spec = ModelSpec.of(cfg)
    cfg.model.d_model = 64
    assert spec.model.d_model == 128
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.model = cfg.model  # type: ignore[misc]


@pytest.mark.parametrize("cfg", [lm(), vit()], ids=["lm", "vit"])
def test_the_same_config_and_its_own_dict_match(cfg):
    spec = ModelSpec.of(cfg)
    assert spec.mismatches(config_to_dict(cfg)) == []
    assert spec.mismatches(spec.as_dict()) == []


def test_every_model_moe_momentum_key_must_match():
    cfg = lm()
    spec = ModelSpec.of(cfg)
    for section in ("model", "moe", "momentum"):
        for key in section_fields(section):
            if f"{section}.{key}" in SAME_WEIGHTS:
                continue
            saved = config_to_dict(cfg)
            saved[section][key] = _other_value(saved[section][key])
            now = getattr(getattr(cfg, section), key)
            assert spec.mismatches(saved) == [f"{section}.{key}={now!r} (checkpoint: {saved[section][key]!r})"]


def test_message_format():
    saved = config_to_dict(lm("moe.num_experts=4", "model.output_layer=adaptive", "model.tie_embeddings=false"))
    spec = ModelSpec.of(lm("moe.num_experts=8"))
    assert spec.mismatches(saved) == [
        "model.tie_embeddings=True (checkpoint: False)",
        "model.output_layer='full' (checkpoint: 'adaptive')",
        "moe.num_experts=8 (checkpoint: 4)",
    ]


def test_output_chunk_tokens_never_matters():
    saved = config_to_dict(lm("model.output_layer=chunked", "model.output_chunk_tokens=64"))
    assert ModelSpec.of(lm("model.output_layer=chunked", "model.output_chunk_tokens=4096")).mismatches(saved) == []
    saved = config_to_dict(lm("model.output_chunk_tokens=64"))
    assert ModelSpec.of(lm("model.output_chunk_tokens=8")).mismatches(saved) == []


@pytest.mark.parametrize(
    "saved_layer,now_layer,fits",
    [
        ("full", "chunked", True),
        ("chunked", "full", True),
        ("full", "full", True),
        ("chunked", "chunked", True),
        ("full", "adaptive", False),
        ("adaptive", "full", False),
        ("chunked", "adaptive", False),
        ("adaptive", "chunked", False),
    ],
)
def test_output_layer_full_and_chunked_share_weights(saved_layer, now_layer, fits):
    def cfg(layer):
        return lm(f"model.output_layer={layer}", *(["model.tie_embeddings=false"] if layer == "adaptive" else []))

    saved = config_to_dict(cfg(saved_layer))
    saved["model"]["tie_embeddings"] = cfg(now_layer).model.tie_embeddings  # only the output layer differs
    found = ModelSpec.of(cfg(now_layer)).mismatches(saved)
    assert found == ([] if fits else [f"model.output_layer={now_layer!r} (checkpoint: {saved_layer!r})"])


def test_the_same_weights_exceptions_hold_only_in_the_model_section():
    saved = config_to_dict(lm())
    saved["moe"]["output_chunk_tokens"] = 7  # not a moe key: compared like any other unknown key
    assert ModelSpec.of(lm()).mismatches(saved) == ["moe.output_chunk_tokens=None (checkpoint: 7)"]


def test_vision_shape_keys_count_for_a_vit():
    spec = ModelSpec.of(vit())
    for key in VISION_SHAPE_KEYS:
        saved = config_to_dict(vit())
        saved["vision"][key] = _other_value(saved["vision"][key])
        now = getattr(vit().vision, key)
        assert spec.mismatches(saved) == [f"vision.{key}={now!r} (checkpoint: {saved['vision'][key]!r})"]


def test_vision_training_keys_never_count():
    saved = config_to_dict(vit())
    for key in section_fields("vision"):
        if key not in VISION_SHAPE_KEYS:
            saved["vision"][key] = _other_value(saved["vision"][key])
    assert ModelSpec.of(vit()).mismatches(saved) == []


def test_vision_keys_do_not_count_for_a_language_model():
    saved = config_to_dict(lm("vision.patch_size=16", "vision.num_classes=10", "vision.pooling=gap"))
    assert ModelSpec.of(lm()).mismatches(saved) == []


def test_a_vision_key_missing_from_the_checkpoint_counts_as_equal():
    saved = config_to_dict(vit())
    del saved["vision"]["pooling"], saved["vision"]["moe_last"]
    assert ModelSpec.of(vit()).mismatches(saved) == []
    del saved["vision"]
    assert ModelSpec.of(vit()).mismatches(saved) == []


def test_saved_keys_are_compared_new_keys_are_not():
    saved = config_to_dict(lm())
    del saved["moe"]["stable_distill_dim"]  # a key added to the schema after the checkpoint was written
    assert ModelSpec.of(lm("moe.stable_distill_dim=7")).mismatches(saved) == []
    saved["model"]["retired_key"] = 3  # a key the schema no longer has
    assert ModelSpec.of(lm()).mismatches(saved) == ["model.retired_key=None (checkpoint: 3)"]


def test_a_missing_section_is_a_mismatch():
    saved = config_to_dict(lm())
    del saved["momentum"]
    assert ModelSpec.of(lm()).mismatches(saved) == ["momentum (checkpoint: missing)"]


def test_every_difference_is_listed_in_section_order():
    saved = config_to_dict(vit("model.num_layers=2", "moe.top_k=3", "momentum.kind=heavy_ball"))
    saved["vision"]["patch_size"] = 16
    found = ModelSpec.of(vit()).mismatches(copy.deepcopy(saved))
    assert [f.split("=")[0] for f in found] == ["model.num_layers", "moe.top_k", "momentum.kind", "vision.patch_size"]
