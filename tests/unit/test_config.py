"""The configuration loader and validator: precedence, strictness, messages, round trip, manual."""

from __future__ import annotations

import dataclasses
import os

import pytest
import yaml

from msmoe_dist.config.loader import (
    ConfigError,
    config_from_dict,
    config_help_text,
    config_to_dict,
    load_config,
    load_config_with_sources,
    save_config,
)
from msmoe_dist.config.moe_placement import lm_moe_blocks
from msmoe_dist.config.schema import Config
from msmoe_dist.config.validate import validate

BAD_NAME = "bad_cfg.yaml"


def write_yaml(tmp_path, data, name=BAD_NAME) -> str:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data), encoding="utf-8")
    return str(path)


def config_error(path, overrides=()) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, list(overrides))
    msg = str(info.value)
    assert "\n" not in msg and "\r" not in msg, msg
    assert msg.startswith("config error: "), msg
    return msg


def leaf_keys() -> list[str]:
    return [f"{s.name}.{f.name}" for s in dataclasses.fields(Config) for f in dataclasses.fields(s.default_factory)]


# ------------------------------------------------------------------------------------------
# Precedence and parsing


def test_defaults_without_file_or_overrides():
    assert load_config(None, []) == Config()


def test_precedence_defaults_yaml_cli(tmp_path):
    path = write_yaml(tmp_path, {"model": {"num_layers": 6, "d_model": 256}, "optim": {"lr": 3e-4}}, "run.yaml")
    cfg, sources = load_config_with_sources(path, ["model.num_layers=8", "moe.top_k=3"])
    assert cfg.model.num_layers == 8  # CLI beats YAML
    assert cfg.model.d_model == 256  # YAML beats default
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.moe.top_k == 3  # CLI beats default
    assert cfg.model.num_heads == Config().model.num_heads  # untouched default
    assert sources["model.num_layers"] == "command line"
    assert sources["model.d_model"] == path
    assert sources["model.num_heads"] == "default"


def test_later_override_wins():
    assert load_config(None, ["model.num_layers=2", "model.num_layers=3"]).model.num_layers == 3


def test_override_values_are_yaml():
    cfg = load_config(
        None,
        [
            "moe.noisy_gating=true",
            "optim.lr=1e-3",
            "model.num_layers=4",
            "moe.activation=gelu",
            "momentum.eps=5E-6",
            "moe.capacity_factor=2",
            "train.run_dir=runs/x y",
        ],
    )
    assert cfg.moe.noisy_gating is True
    assert cfg.optim.lr == 1e-3 and type(cfg.optim.lr) is float
    assert cfg.model.num_layers == 4
    assert cfg.moe.activation == "gelu"
    assert cfg.momentum.eps == 5e-6
    assert cfg.moe.capacity_factor == 2.0 and type(cfg.moe.capacity_factor) is float  # int -> float field
    assert cfg.train.run_dir == "runs/x y"


def test_yaml_exponent_float_without_dot(tmp_path):
    cfg = load_config(write_yaml(tmp_path, "optim:\n  lr: 1e-3\n  eps: 1E-8\n"), [])
    assert cfg.optim.lr == 1e-3 and cfg.optim.eps == 1e-8


def test_numeric_string_on_command_line_is_a_string():
    assert load_config(None, ["train.run_dir=2024"]).train.run_dir == "2024"


def test_partial_and_empty_files(tmp_path):
    assert load_config(write_yaml(tmp_path, "", "empty.yaml"), []) == Config()
    assert load_config(write_yaml(tmp_path, "model:\n", "null_section.yaml"), []) == Config()
    cfg = load_config(write_yaml(tmp_path, {"moe": {"top_k": 3}}, "partial.yaml"), [])
    assert cfg.moe.top_k == 3 and cfg.moe.num_experts == Config().moe.num_experts


def test_valid_boundaries_are_accepted():
    load_config(
        None,
        [
            "moe.capacity_factor=0",
            "optim.min_lr_ratio=1",
            "model.dropout=0",
            "momentum.mu=0",
            "optim.warmup_steps=0",
            "optim.grad_clip=0",
            "train.eval_every=0",
            "train.eval_batches=0",
            "checkpoint.every_steps=0",
            "checkpoint.keep_last=1",
            "model.vocab_size=0",
            "data.seq_len=256",
            "moe.top_k=8",
            "parallel.ep_size=8",
            "train.device=cuda",
        ],
    )
    load_config(None, ["optim.min_lr_ratio=0"])
    load_config(None, ["moe.gate=softmax_topk", "moe.renormalize=true"])
    load_config(None, ["momentum.kind=heavy_ball", "momentum.learnable=per_layer"])
    load_config(None, ["model.position=rotary", "model.d_model=16", "model.num_heads=4"])
    # glam with 5 blocks has MoE blocks 0, 2, 4.
    load_config(None, ["momentum.kind=adam", "model.layout=glam", "model.num_layers=5", "momentum.adam_layers=3"])
    # adam_layers is only bounded by the MoE layer count when kind=adam.
    load_config(None, ["momentum.kind=heavy_ball", "model.num_layers=2", "momentum.adam_layers=5"])


def test_lm_moe_blocks():
    assert lm_moe_blocks(4, "switch") == [0, 1, 2, 3]
    assert lm_moe_blocks(4, "glam") == [0, 2]
    assert lm_moe_blocks(5, "glam") == [0, 2, 4]
    assert lm_moe_blocks(1, "glam") == [0]


# ------------------------------------------------------------------------------------------
# Range and cross-field errors: every rule, from a YAML file, names the key(s) and the file.

RANGE_CASES = [
    # (yaml content, keys the message must name, extra fragment)
    ({"model": {"num_layers": 0}}, ["model.num_layers"], "expected a positive integer, got 0"),
    ({"model": {"d_model": -8}}, ["model.d_model"], "positive"),
    ({"model": {"num_heads": 0}}, ["model.num_heads"], "positive"),
    ({"model": {"ffn_dim": 0}}, ["model.ffn_dim"], "positive"),
    ({"model": {"max_seq_len": 0}}, ["model.max_seq_len"], "positive"),
    ({"model": {"vocab_size": -1}}, ["model.vocab_size"], "non-negative"),
    ({"model": {"d_model": 130, "num_heads": 4}}, ["model.d_model", "model.num_heads"], "divisible"),
    ({"model": {"position": "rotary", "d_model": 12, "num_heads": 4}}, ["model.position"], "even head dimension"),
    ({"model": {"dropout": 1.0}}, ["model.dropout"], "[0, 1)"),
    ({"model": {"dropout": -0.1}}, ["model.dropout"], "[0, 1)"),
    ({"model": {"init_std": 0.0}}, ["model.init_std"], "positive"),
    ({"moe": {"num_experts": 0}}, ["moe.num_experts"], ">= 1"),
    ({"moe": {"top_k": 0}}, ["moe.top_k"], ">= 1"),
    ({"moe": {"top_k": 10}}, ["moe.top_k", "moe.num_experts"], "moe.top_k=10 must be <= moe.num_experts=8"),
    ({"moe": {"expert_ffn_dim": 0}}, ["moe.expert_ffn_dim"], "positive"),
    ({"moe": {"capacity_factor": -0.5}}, ["moe.capacity_factor"], "non-negative"),
    ({"moe": {"noise_std": 0.0}}, ["moe.noise_std"], "positive"),
    ({"moe": {"balance_loss_coef": -0.01}}, ["moe.balance_loss_coef"], "non-negative"),
    ({"moe": {"z_loss_coef": -1}}, ["moe.z_loss_coef"], "non-negative"),
    ({"moe": {"renormalize": True, "gate": "topk_softmax"}}, ["moe.renormalize", "moe.gate"], "softmax_topk"),
    ({"momentum": {"mu": 1.0}}, ["momentum.mu"], "[0, 1)"),
    ({"momentum": {"mu": -0.1}}, ["momentum.mu"], "[0, 1)"),
    ({"momentum": {"gamma": 0}}, ["momentum.gamma"], "positive"),
    ({"momentum": {"beta1": 1.0}}, ["momentum.beta1"], "[0, 1)"),
    ({"momentum": {"beta2": -0.5}}, ["momentum.beta2"], "[0, 1)"),
    ({"momentum": {"eps": 0.0}}, ["momentum.eps"], "positive"),
    ({"momentum": {"adam_gamma": -1.0}}, ["momentum.adam_gamma"], "positive"),
    ({"momentum": {"adam_layers": 0}}, ["momentum.adam_layers"], ">= 1"),
    (
        {"momentum": {"kind": "adam", "adam_layers": 5}, "model": {"num_layers": 4}},
        ["momentum.adam_layers", "model.num_layers"],
        "number of MoE layers (4",
    ),
    (
        {"momentum": {"kind": "adam", "adam_layers": 3}, "model": {"num_layers": 4, "layout": "glam"}},
        ["momentum.adam_layers", "model.num_layers"],
        "number of MoE layers (2",
    ),
    ({"momentum": {"rho": 0.0}}, ["momentum.rho"], "(0, 1)"),
    ({"momentum": {"rho": 1.0}}, ["momentum.rho"], "(0, 1)"),
    ({"momentum": {"kappa": 1.0}}, ["momentum.kappa"], "> 1"),
    ({"momentum": {"learnable": "scalar"}}, ["momentum.learnable", "momentum.kind"], "kind=none"),
    ({"data": {"seq_len": 0}}, ["data.seq_len"], "positive"),
    (
        {"data": {"seq_len": 512}},
        ["data.seq_len", "model.max_seq_len"],
        "data.seq_len=512 must be <= model.max_seq_len=256",
    ),
    ({"data": {"batch_size": 0}}, ["data.batch_size"], "positive"),
    ({"data": {"synthetic_lines": 0}}, ["data.synthetic_lines"], "positive"),
    ({"data": {"path": ""}}, ["data.path"], "non-empty"),
    ({"optim": {"lr": 0.0}}, ["optim.lr"], "positive"),
    ({"optim": {"beta1": 1.0}}, ["optim.beta1"], "[0, 1)"),
    ({"optim": {"beta2": 1.5}}, ["optim.beta2"], "[0, 1)"),
    ({"optim": {"eps": 0.0}}, ["optim.eps"], "positive"),
    ({"optim": {"weight_decay": -0.1}}, ["optim.weight_decay"], "non-negative"),
    ({"optim": {"warmup_steps": -1}}, ["optim.warmup_steps"], "non-negative"),
    ({"optim": {"min_lr_ratio": 1.5}}, ["optim.min_lr_ratio"], "[0, 1]"),
    ({"optim": {"min_lr_ratio": -0.1}}, ["optim.min_lr_ratio"], "[0, 1]"),
    ({"optim": {"grad_clip": -1.0}}, ["optim.grad_clip"], "non-negative"),
    ({"train": {"run_dir": " "}}, ["train.run_dir"], "non-empty"),
    ({"train": {"max_steps": 0}}, ["train.max_steps"], "positive"),
    ({"train": {"eval_every": -1}}, ["train.eval_every"], "non-negative"),
    ({"train": {"eval_batches": -1}}, ["train.eval_batches"], "non-negative"),
    ({"checkpoint": {"every_steps": -5}}, ["checkpoint.every_steps"], "non-negative"),
    ({"checkpoint": {"keep_last": 0}}, ["checkpoint.keep_last"], ">= 1"),
    ({"logging": {"log_every": 0}}, ["logging.log_every"], "positive"),
    ({"parallel": {"ep_size": 0}}, ["parallel.ep_size"], ">= 1"),
    (
        {"moe": {"balance_loss": "vmoe", "balance_loss_coef": 0.01}},
        ["moe.balance_loss", "moe.noisy_gating"],
        "noisy_gating=true",
    ),
    ({"model": {"kind": "vit"}}, ["model.kind", "data.kind"], "data.kind in synthetic_images/imagenet"),
    ({"data": {"kind": "imagenet"}}, ["model.kind", "data.kind"], "expected model.kind=vit"),
    (
        {"model": {"kind": "vit"}, "data": {"kind": "synthetic_images"}, "vision": {"image_size": 100}},
        ["vision.image_size", "vision.patch_size"],
        "multiple of vision.patch_size=32",
    ),
    (
        {"model": {"kind": "vit", "num_layers": 4}, "data": {"kind": "synthetic_images"}, "vision": {"moe_every": 5}},
        ["model.num_layers", "vision.moe_every"],
        "no MoE layer",
    ),
    (
        {
            "model": {"kind": "vit", "num_layers": 4},
            "data": {"kind": "synthetic_images"},
            "vision": {"moe_layout": "last", "moe_last": 5},
        },
        ["vision.moe_last", "model.num_layers"],
        "<= model.num_layers=4",
    ),
    (
        {
            "model": {"kind": "vit", "num_layers": 4},
            "data": {"kind": "synthetic_images"},
            "momentum": {"kind": "adam", "adam_layers": 3},
        },
        ["momentum.adam_layers", "vision.moe_every"],
        "number of MoE layers (2",
    ),
    (
        {"model": {"kind": "vit", "block_style": "reference"}, "data": {"kind": "synthetic_images"}},
        ["model.block_style", "model.kind"],
        "pre_ln",
    ),
    (
        {"model": {"kind": "vit"}, "data": {"kind": "synthetic_images"}, "moe": {"router": "stablemoe", "top_k": 1}},
        ["moe.router", "model.kind"],
        "moe.router=topk",
    ),
    (
        {"model": {"kind": "vit"}, "data": {"kind": "synthetic_images"}, "logging": {"fluct_every": 10}},
        ["logging.fluct_every", "model.kind"],
        "fluct_every=0",
    ),
    ({"vision": {"eval_crop_ratio": 0}}, ["vision.eval_crop_ratio"], "(0, 1]"),
    ({"vision": {"mixup_alpha": -1}}, ["vision.mixup_alpha"], "non-negative"),
    ({"vision": {"synthetic_classes": 49}}, ["vision.synthetic_classes"], "[2, 48]"),
    (
        {
            "vision": {"synthetic_classes": 20, "num_classes": 10},
            "data": {"kind": "synthetic_images"},
            "model": {"kind": "vit"},
        },
        ["vision.synthetic_classes", "vision.num_classes"],
        "<= vision.num_classes=10",
    ),
    ({"parallel": {"ep_size": 3}}, ["moe.num_experts", "parallel.ep_size"], "divisible"),
]


@pytest.mark.parametrize("data, keys, fragment", RANGE_CASES, ids=[f"{c[1][0]}-{i}" for i, c in enumerate(RANGE_CASES)])
def test_range_and_cross_field_errors(tmp_path, data, keys, fragment):
    path = write_yaml(tmp_path, data)
    msg = config_error(path)
    for key in keys:
        assert key in msg, msg
    assert BAD_NAME in msg, msg
    assert fragment in msg, msg


def test_every_validated_section_is_covered():
    covered = {k.split(".")[0] for _, keys, _ in RANGE_CASES for k in keys}
    assert covered == {f.name for f in dataclasses.fields(Config)}


def test_cross_field_error_names_each_source(tmp_path):
    path = write_yaml(tmp_path, {"moe": {"top_k": 10}})
    msg = config_error(path, ["moe.num_experts=4"])
    assert f"moe.top_k ({path})" in msg, msg
    assert "moe.num_experts (command line)" in msg, msg
    assert "moe.top_k=10 must be <= moe.num_experts=4" in msg


def test_value_from_cli_blames_command_line(tmp_path):
    path = write_yaml(tmp_path, {"model": {"num_layers": 2}})
    msg = config_error(path, ["model.num_layers=0"])
    assert "model.num_layers (command line)" in msg and BAD_NAME not in msg


def test_cli_can_fix_a_bad_yaml_value(tmp_path):
    path = write_yaml(tmp_path, {"model": {"num_layers": 0}})
    assert load_config(path, ["model.num_layers=3"]).model.num_layers == 3


# ------------------------------------------------------------------------------------------
# Strictness: unknown names and wrong types


def test_unknown_key_in_yaml_with_suggestion(tmp_path):
    msg = config_error(write_yaml(tmp_path, {"model": {"num_layer": 4}}))
    assert "model.num_layer" in msg and BAD_NAME in msg
    assert "did you mean 'model.num_layers'" in msg


def test_unknown_key_suggests_other_section(tmp_path):
    msg = config_error(write_yaml(tmp_path, {"model": {"lr": 0.1}}))
    assert "model.lr" in msg and "optim.lr" in msg


def test_unknown_key_without_close_match(tmp_path):
    msg = config_error(write_yaml(tmp_path, {"moe": {"zzzzzz": 1}}))
    assert "moe.zzzzzz" in msg and BAD_NAME in msg and "did you mean" not in msg


def test_unknown_section_with_suggestion(tmp_path):
    msg = config_error(write_yaml(tmp_path, {"modle": {"num_layers": 4}}))
    assert "modle" in msg and BAD_NAME in msg and "did you mean 'model'" in msg


def test_unknown_key_on_command_line():
    msg = config_error(None, ["optim.learning_rate=0.1"])
    assert "optim.learning_rate" in msg and "command line" in msg


def test_unknown_section_on_command_line():
    msg = config_error(None, ["optimizer.lr=0.1"])
    assert "optimizer" in msg and "command line" in msg and "did you mean 'optim'" in msg


@pytest.mark.parametrize(
    "key, value, fragment",
    [
        ("model.num_layers", True, "expected an integer, got true"),
        ("model.num_layers", "four", "expected an integer, got 'four'"),
        ("model.num_layers", 4.5, "expected an integer, got 4.5"),
        ("model.num_layers", 4.0, "expected an integer, got 4.0"),
        ("model.num_layers", None, "expected an integer, got null"),
        ("model.num_layers", [4], "expected an integer"),
        ("optim.lr", True, "expected a number, got true"),
        ("optim.lr", "fast", "expected a number"),
        ("optim.lr", float("inf"), "finite"),
        ("model.tie_embeddings", 1, "expected true or false, got 1"),
        ("model.tie_embeddings", "yes please", "expected true or false"),
        ("moe.activation", "gelo", "one of relu|gelu|silu|gelu_tanh, got 'gelo'; did you mean 'gelu'"),
        ("moe.gate", "banana", "one of topk_softmax|softmax_topk"),
        ("train.run_dir", 2024, "expected a string"),
    ],
)
def test_wrong_types_in_yaml(tmp_path, key, value, fragment):
    section, leaf = key.split(".")
    msg = config_error(write_yaml(tmp_path, {section: {leaf: value}}))
    assert key in msg and BAD_NAME in msg and fragment in msg, msg


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("model.num_layers=true", "expected an integer, got true"),
        ("model.num_layers=four", "expected an integer, got 'four'"),
        ("model.num_layers=4.5", "expected an integer, got 4.5"),
        ("model.num_layers=", "expected an integer, got null"),
        ("optim.lr=yes", "expected a number"),
        ("moe.activation=tanh", "one of relu|gelu|silu"),
        ("moe.noisy_gating=2", "expected true or false"),
    ],
)
def test_wrong_types_on_command_line(override, fragment):
    msg = config_error(None, [override])
    assert override.split("=")[0] in msg and "command line" in msg and fragment in msg, msg


# ------------------------------------------------------------------------------------------
# File and syntax errors


def test_missing_file(tmp_path):
    path = str(tmp_path / "no_such_cfg.yaml")
    msg = config_error(path)
    assert "no_such_cfg.yaml" in msg and "not found" in msg


def test_directory_instead_of_file(tmp_path):
    msg = config_error(str(tmp_path))
    assert str(tmp_path) in msg and "directory" in msg


def test_yaml_syntax_error_names_line(tmp_path):
    path = write_yaml(tmp_path, "model:\n  num_layers: 4\n   d_model: 64\n")
    msg = config_error(path)
    assert BAD_NAME in msg and "line 3" in msg and "invalid YAML" in msg


def test_yaml_unclosed_bracket(tmp_path):
    msg = config_error(write_yaml(tmp_path, "moe:\n  top_k: [1\n"))
    assert BAD_NAME in msg and "line" in msg


def test_duplicate_key_is_an_error(tmp_path):
    msg = config_error(write_yaml(tmp_path, "model:\n  num_layers: 4\n  num_layers: 5\n"))
    assert BAD_NAME in msg and "duplicate key 'num_layers'" in msg and "line 3" in msg


def test_top_level_not_a_mapping(tmp_path):
    msg = config_error(write_yaml(tmp_path, "- model\n- moe\n"))
    assert BAD_NAME in msg and "mapping" in msg


def test_section_not_a_mapping(tmp_path):
    msg = config_error(write_yaml(tmp_path, "model: 4\n"))
    assert "model" in msg and BAD_NAME in msg and "mapping" in msg


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("model.num_layers", "section.key=value"),
        ("=4", "empty key"),
        ("  =4", "empty key"),
        ("num_layers=4", "did you mean 'model.num_layers=4'"),
        ("model.=4", "section.key"),
        (".num_layers=4", "section.key"),
        ("model.num_layers=[1", "cannot parse"),
    ],
)
def test_malformed_overrides(override, fragment):
    msg = config_error(None, [override])
    assert "command line" in msg and fragment in msg, msg


def test_config_error_is_value_error_and_one_line():
    err = ConfigError("a\nb\r\n  c")
    assert isinstance(err, ValueError)
    assert str(err) == "config error: a b c"


# ------------------------------------------------------------------------------------------
# dicts, validate() directly, save/load


def test_config_from_dict_partial_and_strict():
    cfg = config_from_dict({"moe": {"num_experts": 4, "top_k": 3}})
    assert cfg.moe.num_experts == 4 and cfg.moe.top_k == 3
    with pytest.raises(ConfigError, match=r"moe\.topk \(ckpt\.pt\).*did you mean 'moe\.top_k'"):
        config_from_dict({"moe": {"topk": 1}}, source="ckpt.pt")
    with pytest.raises(ConfigError, match=r"model\.num_layers \(<dict>\): expected a positive integer"):
        config_from_dict({"model": {"num_layers": -1}})


def test_dict_round_trip():
    cfg = load_config(None, ["model.num_layers=6", "optim.lr=2e-4", "momentum.kind=robust"])
    d = config_to_dict(cfg)
    assert d["model"]["num_layers"] == 6 and d["momentum"]["kind"] == "robust"
    assert set(d) == {f.name for f in dataclasses.fields(Config)}
    assert config_from_dict(d) == cfg


def test_validate_programmatic_config():
    validate(Config())
    cfg = Config()
    cfg.moe.top_k = 9
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    assert str(info.value) == "config error: moe.top_k, moe.num_experts: moe.top_k=9 must be <= moe.num_experts=8"
    cfg = Config()
    cfg.model.num_layers = "4"  # wrong type set in code: a ConfigError, not a TypeError
    with pytest.raises(ConfigError, match="model.num_layers"):
        validate(cfg)
    cfg = Config()
    cfg.optim.lr = float("nan")
    with pytest.raises(ConfigError, match="optim.lr"):
        validate(cfg, {"optim.lr": "x.yaml"})


def test_save_load_round_trip(tmp_path):
    cfg = load_config(
        None,
        [
            "model.num_layers=6",
            "model.layout=glam",
            "model.position=rotary",
            "model.dropout=0.1",
            "moe.gate=softmax_topk",
            "moe.renormalize=true",
            "moe.capacity_factor=1.25",
            "momentum.kind=adam",
            "momentum.eps=1e-12",
            "momentum.learnable=scalar",
            "optim.lr=3e-4",
            "optim.schedule=cosine",
            "train.run_dir=1e5",
            "data.path=true",
            "train.resume=true",
            "logging.tensorboard=false",
        ],
    )
    assert cfg.train.run_dir == "1e5" and cfg.data.path == "true"
    path = tmp_path / "sub" / "config.yaml"
    save_config(cfg, path)
    assert os.listdir(path.parent) == ["config.yaml"]  # no temp file left behind
    assert load_config(str(path), []) == cfg
    # Overwriting keeps working and stays atomic.
    cfg2 = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_steps=7))
    save_config(cfg2, str(path))
    assert os.listdir(path.parent) == ["config.yaml"]
    assert load_config(str(path), []) == cfg2


def test_saved_file_is_complete_plain_yaml(tmp_path):
    path = tmp_path / "config.yaml"
    save_config(Config(), path)
    data = yaml.safe_load(path.read_text())
    assert {f"{s}.{k}" for s in data for k in data[s]} == set(leaf_keys())


# ------------------------------------------------------------------------------------------
# The manual


def test_help_text_documents_every_key():
    text = config_help_text()
    for s in dataclasses.fields(Config):
        assert f"\n{s.name}:\n" in text
        for f in dataclasses.fields(s.default_factory):
            assert f"{s.name}.{f.name} (" in text, f"{s.name}.{f.name} missing from the manual"
            assert f.metadata.get("help"), f"{s.name}.{f.name} has no help text"
    assert "moe.activation (str, default relu, one of relu|gelu|silu|gelu_tanh): " in text
    assert "model.tie_embeddings (bool, default true)" in text
    assert "model.num_layers (int, default 4)" in text
