"""Checkpoints: file names (layout), metadata and its compatibility check (meta), the save protocol
(manager) and reading every expert back (full_weights). Below both train and eval."""

from msmoe_dist.checkpoint.full_weights import load_full_weights
from msmoe_dist.checkpoint.manager import (
    Checkpointer,
    CheckpointFiles,
    is_complete,
    latest_checkpoint,
    resolve_checkpoint,
    torch_load,
)
from msmoe_dist.checkpoint.meta import CheckpointError, CheckpointMeta, read_meta

__all__ = [
    "CheckpointError",
    "CheckpointFiles",
    "CheckpointMeta",
    "Checkpointer",
    "is_complete",
    "latest_checkpoint",
    "load_full_weights",
    "read_meta",
    "resolve_checkpoint",
    "torch_load",
]
