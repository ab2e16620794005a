"""Models built from MoE layers: the momentum SMoE language model."""

from msmoe_dist.models.lm import LMOutput, MoELanguageModel, moe_block_indices  # noqa: F401
