"""The DeepSpeed JSON config, generated from ours; a user JSON may override any entry."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from msmoe_dist.config.schema import OptimConfig, ParallelConfig, TrainConfig
from msmoe_dist.errors import UserError


class DeepSpeedConfigError(UserError):
    """A user DeepSpeed JSON that cannot be used (one-line message)."""


def deep_merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, val in override.items():
        if isinstance(val, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], val)
        else:
            out[key] = copy.deepcopy(val)
    return out


def build_ds_config(parallel: ParallelConfig, optim: OptimConfig, train: TrainConfig, micro_batch_size: int) -> dict:
    stage = parallel.zero_stage
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": train.grad_accum_steps,
        # Stage 0: DeepSpeed's clipping would use a rank-local norm that misses the other ranks'
        # experts, so the engine wrapper computes the global norm and clips itself.
        "gradient_clipping": optim.grad_clip if stage > 0 else 0.0,
        "zero_optimization": {"stage": stage, "reduce_scatter": True, "contiguous_gradients": True},
        "bf16": {"enabled": train.dtype == "bf16"},
        "fp16": {
            "enabled": train.dtype == "fp16",
            "loss_scale": 0,
            "initial_scale_power": 16,
            "loss_scale_window": 1000,
            "hysteresis": 2,
            "min_loss_scale": 1,
        },
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    path = parallel.deepspeed_config
    if path:
        try:
            user = json.loads(Path(path).read_text())
        except OSError as exc:
            raise DeepSpeedConfigError(f"parallel.deepspeed_config={path}: cannot read it ({exc.strerror})") from exc
        except ValueError as exc:
            raise DeepSpeedConfigError(f"parallel.deepspeed_config={path}: not valid JSON ({exc})") from exc
        if not isinstance(user, dict):
            raise DeepSpeedConfigError(f"parallel.deepspeed_config={path}: expected a JSON object at the top level")
        ds = deep_merge(ds, user)
        if ds.get("zero_optimization", {}).get("stage", 0) == 3:
            raise DeepSpeedConfigError(
                f"{path}: zero_optimization.stage=3 is refused for MoE models (DeepSpeed does not support it); "
                "expected 0, 1 or 2"
            )
    return ds
