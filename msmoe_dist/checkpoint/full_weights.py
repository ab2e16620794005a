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
from msmoe_dist.parallel.sharding import is_expert_key, join_expert_shards


def experts_in(shard: int, per: int, experts: range) -> range:
    """The part of `experts` that shard file `shard` (global experts shard*per ... shard*per+per-1) holds."""
    return range(max(experts.start, shard * per), min(experts.stop, (shard + 1) * per))


def _expert_slice(state: dict[str, torch.Tensor], first: int, experts: range) -> dict[str, torch.Tensor]:
    """`state`'s expert tensors (which hold global experts first, first+1, ...) cut to `experts`; others as they are."""
    return {
        k: v[experts.start - first : experts.stop - first].clone() if is_expert_key(k) else v for k, v in state.items()
    }


def load_full_weights(step_dir: Path, experts: range | None = None) -> tuple[dict[str, torch.Tensor], CheckpointMeta]:
    """(state dict holding all experts, the checkpoint's metadata). Tensors come back as fp32.

    experts: keep only these global experts (a rank's slice under expert parallelism, any EP degree):
    only the expert shard files that hold them are read, so no full expert set is assembled.
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
        if experts is not None:
            state = _expert_slice(state, 0, experts)
    elif engine == "deepspeed":
        dense = torch_load(step_dir / DEEPSPEED_MODEL)["module"]
        files = sorted(step_dir.glob(EXPERTS_GLOB))
        if len(files) != meta.layout["ep_size"]:
            raise CheckpointError(
                f"{step_dir} has {len(files)} expert shard files, expected "
                f"{meta.layout['ep_size']} (ep_size it was saved with)"
            )
        if experts is None:
            state = join_expert_shards([{**dense, **torch_load(f)["experts"]} for f in files])
        else:  # only the shard files that hold `experts`, each cut to its part
            # DeepSpeed's model file holds the module of EP rank 0, so its expert tensors tell the shard size.
            per = next(v.shape[0] for k, v in dense.items() if is_expert_key(k))
            wanted = range(experts.start // per, (experts.stop - 1) // per + 1)
            parts = [
                _expert_slice(torch_load(files[i])["experts"], i * per, experts_in(i, per, experts)) for i in wanted
            ]
            state = {**dense, **join_expert_shards(parts)}
    else:
        raise CheckpointError(f"{step_dir}: unknown engine {engine!r} in its metadata")
    state = {
        k: (v.float() if torch.is_floating_point(v) else v)
        for k, v in state.items()
        if not k.startswith(DEEPSPEED_MARKER_PREFIX)
    }
    return state, meta
