"""Typed configuration: schema (dataclasses), YAML + dot-override loader, cross-field validation,
and ModelSpec, the keys that define the network."""

from msmoe_dist.config.loader import (  # noqa: F401
    ConfigError,
    config_from_dict,
    config_help_text,
    config_to_dict,
    load_config,
    save_config,
)
from msmoe_dist.config.model_spec import ModelSpec  # noqa: F401
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
from msmoe_dist.config.validate import validate  # noqa: F401
