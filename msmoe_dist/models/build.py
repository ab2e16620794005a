"""Building a model from its configuration, on one device, holding all experts or this rank's
(the all-to-all is wired in afterwards by msmoe_dist.parallel.apply_expert_parallel)."""

from __future__ import annotations

from msmoe_dist.config.schema import ModelConfig, MoEConfig, MomentumConfig, VisionConfig
from msmoe_dist.models.base import MoEModel
from msmoe_dist.models.lm import MoELanguageModel
from msmoe_dist.models.vit import VisionMoE


def build_model(
    model: ModelConfig,
    moe: MoEConfig,
    momentum: MomentumConfig,
    vision: VisionConfig,
    num_outputs: int,
    local_experts: range | None = None,
) -> MoEModel:
    """model.kind=lm: a language model over `num_outputs` tokens; vit: V-MoE with vision.num_classes outputs.

    local_experts: the global expert ids this rank holds under expert parallelism
    (`ParallelLayout.local_experts`): only those experts are allocated, with the same initial values
    as in a one-process build. None: every expert."""
    if model.kind == "vit":
        return VisionMoE(model, moe, momentum, vision, local_experts)
    return MoELanguageModel(model, moe, momentum, num_outputs, local_experts)
