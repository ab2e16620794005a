"""Parallel/DeepSpeed settings: impossible combinations are one-line errors naming the keys."""

import json

import pytest

from msmoe_dist.cli import strip_launcher_args
from msmoe_dist.config import ConfigError, load_config
from msmoe_dist.train.ds_config import DeepSpeedConfigError, build_ds_config


def _sections(cfg):
    return cfg.parallel, cfg.optim, cfg.train, cfg.data.batch_size


@pytest.mark.parametrize(
    "overrides,needle",
    [
        (["parallel.zero_stage=3"], "ZeRO stage 3 is refused"),
        (["parallel.zero_stage=5"], "expected 0, 1 or 2"),
        (["train.dtype=bf16", "parallel.zero_stage=0", "parallel.engine=deepspeed"], "expected zero_stage 1 or 2"),
        (["train.dtype=fp16", "parallel.engine=native"], "only parallel.engine=deepspeed provides"),
        (["train.grad_accum_steps=0"], "train.grad_accum_steps"),
        (["parallel.timeout_s=0"], "parallel.timeout_s"),
        (["parallel.ep_size=3"], "moe.num_experts=8 must be divisible by parallel.ep_size=3"),
    ],
)
def test_parallel_config_errors(overrides, needle):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_generated_deepspeed_config_and_user_override(tmp_path):
    cfg = load_config(
        None,
        [
            "parallel.zero_stage=2",
            "train.dtype=bf16",
            "train.grad_accum_steps=4",
            "optim.grad_clip=0.5",
            "data.batch_size=3",
        ],
    )
    ds = build_ds_config(*_sections(cfg))
    assert ds["zero_optimization"]["stage"] == 2 and ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert (ds["gradient_accumulation_steps"], ds["train_micro_batch_size_per_gpu"], ds["gradient_clipping"]) == (
        4,
        3,
        0.5,
    )
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"allgather_bucket_size": 1000}, "gradient_clipping": 2.0}))
    cfg.parallel.deepspeed_config = str(user)
    merged = build_ds_config(*_sections(cfg))
    assert merged["zero_optimization"] == {**ds["zero_optimization"], "allgather_bucket_size": 1000}
    assert merged["gradient_clipping"] == 2.0
    # stage 0: DeepSpeed's clipping would miss other ranks' experts, so it is ours
    assert (
        build_ds_config(*_sections(load_config(None, ["parallel.zero_stage=0", "optim.grad_clip=1"])))[
            "gradient_clipping"
        ]
        == 0
    )


@pytest.mark.parametrize(
    "content,needle",
    [
        ("{not json", "not valid JSON"),
        ("[1]", "JSON object"),
        ('{"zero_optimization": {"stage": 3}}', "stage=3 is refused"),
    ],
)
def test_bad_user_deepspeed_json(tmp_path, content, needle):
    f = tmp_path / "ds.json"
    f.write_text(content)
    cfg = load_config(None, [f"parallel.deepspeed_config={f}"])
    with pytest.raises(DeepSpeedConfigError, match=needle):
        build_ds_config(*_sections(cfg))
    cfg.parallel.deepspeed_config = str(tmp_path / "missing.json")
    with pytest.raises(DeepSpeedConfigError, match="cannot read"):
        build_ds_config(*_sections(cfg))


def test_launcher_local_rank_is_stripped(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "unset")  # recorded, so teardown removes what the CLI sets below
    monkeypatch.delenv("LOCAL_RANK")
    assert strip_launcher_args(["--local_rank=1", "train", "--config", "x.yaml", "a.b=1"]) == [
        "train",
        "--config",
        "x.yaml",
        "a.b=1",
    ]
    import os

    assert os.environ["LOCAL_RANK"] == "1"
    assert strip_launcher_args(["--local-rank", "3", "x=1"]) == ["x=1"]
