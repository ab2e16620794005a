"""Full model weights (every expert) from a checkpoint of either engine and any EP degree."""

from __future__ import annotations

import fnmatch
import sys
from pathlib import Path

import torch

from msmoe_dist.checkpoint.integrity import verify_files
from msmoe_dist.checkpoint.layout import DEEPSPEED_MARKER_PREFIX, DEEPSPEED_MODEL, EXPERTS_GLOB, NATIVE_STATE
from msmoe_dist.checkpoint.manager import torch_load
from msmoe_dist.checkpoint.meta import CheckpointError, CheckpointMeta, read_meta
from msmoe_dist.parallel.sharding import join_expert_shards


def load_full_weights(step_dir: Path) -> tuple[dict[str, torch.Tensor], CheckpointMeta]:
    """(state dict holding all experts, the checkpoint's metadata). Tensors come back as fp32.

    The files it reads are verified against the checksums recorded at save first (CheckpointCorrupt
    names any that differ); the optimiser files, which it does not read, are not."""
    meta = read_meta(step_dir)
    engine = meta.layout.get("engine")
    weights = (NATIVE_STATE, DEEPSPEED_MODEL)
    if not verify_files(step_dir, meta, only=lambda rel: rel in weights or fnmatch.fnmatch(rel, EXPERTS_GLOB)):
        print(
            f"note: {step_dir} was saved before checkpoints recorded checksums; its files are not verified",
            file=sys.stderr,
        )
    if engine == "native":
        state = torch_load(step_dir / NATIVE_STATE)["model"]
    elif engine == "deepspeed":
        dense = torch_load(step_dir / DEEPSPEED_MODEL)["module"]
        files = sorted(step_dir.glob(EXPERTS_GLOB))
        if len(files) != meta.layout["ep_size"]:
            raise CheckpointError(
                f"{step_dir} has {len(files)} expert shard files, expected "
                f"{meta.layout['ep_size']} (ep_size it was saved with)"
            )
        state = join_expert_shards([{**dense, **torch_load(f)["experts"]} for f in files])
    else:
        raise CheckpointError(f"{step_dir}: unknown engine {engine!r} in its metadata")
    state = {
        k: (v.float() if torch.is_floating_point(v) else v)
        for k, v in state.items()
        if not k.startswith(DEEPSPEED_MARKER_PREFIX)
    }
    return state, meta
