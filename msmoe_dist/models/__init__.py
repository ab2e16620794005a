"""Models built from MoE layers: the momentum SMoE language model and the V-MoE vision transformer."""

from msmoe_dist.models.lm import LMOutput, MoELanguageModel  # noqa: F401
from msmoe_dist.models.vit import VisionMoE, VisionOutput, classification_loss  # noqa: F401
