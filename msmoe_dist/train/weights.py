"""Full model weights (every expert) from a checkpoint of either engine and any EP degree."""

from __future__ import annotations

from pathlib import Path

import torch

from msmoe_dist.parallel import join_expert_shards
from msmoe_dist.train.checkpoint import CheckpointError, read_seal, torch_load


def load_full_weights(step_dir: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict holding all experts, the checkpoint's seal). Tensors come back as fp32."""
    seal = read_seal(step_dir)
    if seal.get("engine") == "native":
        state = torch_load(step_dir / "state.pt")["model"]
    elif seal.get("engine") == "deepspeed":
        dense = torch_load(step_dir / "mp_rank_00_model_states.pt")["module"]
        files = sorted(step_dir.glob("experts_ep*.pt"))
        if len(files) != seal["ep_size"]:
            raise CheckpointError(
                f"{step_dir} has {len(files)} expert shard files, expected {seal['ep_size']} (ep_size it was saved with)"
            )
        shards = []
        for f in files:
            s = torch_load(f)
            shards.append({**dense, **s["experts"]})
        state = join_expert_shards(shards)
    else:
        raise CheckpointError(f"{step_dir}: unknown engine {seal.get('engine')!r} in its seal")
    state = {k: (v.float() if torch.is_floating_point(v) else v) for k, v in state.items()
             if not k.startswith("deepspeed_moe_marker.")}
    return state, seal
