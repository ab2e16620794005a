"""Checkpoints: file names (layout), metadata and its compatibility check (meta), the save protocol
(manager), file checksums (integrity), what may change on resume (resume_changes) and reading every
expert back (full_weights). Below both train and eval."""

from msmoe_dist.checkpoint.full_weights import load_full_weights
from msmoe_dist.checkpoint.integrity import CheckpointCorrupt, file_digests, verify_files
from msmoe_dist.checkpoint.manager import (
    Checkpointer,
    CheckpointFiles,
    is_complete,
    latest_checkpoint,
    resolve_checkpoint,
    sealed_checkpoints,
    set_aside,
    torch_load,
)
from msmoe_dist.checkpoint.meta import CheckpointError, CheckpointMeta, read_meta
from msmoe_dist.checkpoint.resume_changes import resume_changes

__all__ = [
    "CheckpointCorrupt",
    "CheckpointError",
    "CheckpointFiles",
    "CheckpointMeta",
    "Checkpointer",
    "is_complete",
    "latest_checkpoint",
    "load_full_weights",
    "file_digests",
    "read_meta",
    "resolve_checkpoint",
    "resume_changes",
    "sealed_checkpoints",
    "set_aside",
    "torch_load",
    "verify_files",
]
