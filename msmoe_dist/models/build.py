"""Building a model from its configuration, on one device (parallelism is applied afterwards by
msmoe_dist.parallel.apply_expert_parallel)."""

from __future__ import annotations

from msmoe_dist.config.schema import ModelConfig, MoEConfig, MomentumConfig, VisionConfig
from msmoe_dist.models.base import MoEModel
from msmoe_dist.models.lm import MoELanguageModel
from msmoe_dist.models.vit import VisionMoE


def build_model(
    model: ModelConfig, moe: MoEConfig, momentum: MomentumConfig, vision: VisionConfig, num_outputs: int
) -> MoEModel:
    """model.kind=lm: a language model over `num_outputs` tokens; vit: V-MoE with vision.num_classes outputs."""
    if model.kind == "vit":
        return VisionMoE(model, moe, momentum, vision)
    return MoELanguageModel(model, moe, momentum, num_outputs)
