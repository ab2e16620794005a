"""Typed configuration: schema (dataclasses), YAML + dot-override loader, cross-field validation."""

from msmoe_dist.config.schema import (  # noqa: F401
    CheckpointConfig,
    Config,
    DataConfig,
    LoggingConfig,
    ModelConfig,
    MoEConfig,
    MomentumConfig,
    OptimConfig,
    ParallelConfig,
    TrainConfig,
)
