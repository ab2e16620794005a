"""Expert tensors in state dicts: recognise them by key, slice them for one EP rank, join them back.

Every expert tensor (w1, b1, w2, b2 of an `experts` module) has the expert index as its leading
dimension, so sharding is a slice along dim 0 and un-sharding is a concatenation in EP-rank
order. This is what lets a checkpoint saved at one EP degree load at another.
"""

from __future__ import annotations

from torch import Tensor


def is_expert_key(name: str) -> bool:
    """`...experts.w1` etc.: a state-dict key of an `Experts` module (a standalone layer or in a model).

    For keys only (checkpoint files, state dicts); a live Parameter answers `msmoe_dist.moe.is_expert_param`.
    """
    parts = name.split(".")
    return len(parts) >= 2 and parts[-2] == "experts"


def shard_expert_state(full: dict[str, Tensor], ep_rank: int, ep_size: int) -> dict[str, Tensor]:
    """The state dict of one EP rank, from a state dict holding every expert."""
    out = {}
    for name, t in full.items():
        if is_expert_key(name):
            if t.shape[0] % ep_size:
                raise ValueError(f"{name}: {t.shape[0]} experts cannot be split over ep_size={ep_size}")
            per = t.shape[0] // ep_size
            t = t[ep_rank * per : (ep_rank + 1) * per].clone()
        out[name] = t
    return out


def join_expert_shards(shards: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Inverse of shard_expert_state: `shards[i]` is EP rank i's state dict (dense entries equal)."""
    import torch

    out = dict(shards[0])
    for name in out:
        if is_expert_key(name):
            out[name] = torch.cat([s[name] for s in shards], 0)
    return out
