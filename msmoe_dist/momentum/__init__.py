"""MomentumSMoE residual updates: none, heavy-ball, AdamSMoE, robust momentum."""

from msmoe_dist.momentum.update import MomentumState, MomentumUpdate, robust_coefficients  # noqa: F401
