"""A checkpoint as one layout-free state, for a resume at another layout and for `msmoe-ckpt convert`.

The full state is a plain dict (tensors, numbers, strings; readable with ``torch.load`` alone):
    {"format": FORMAT, "step": N, "layout": {...as saved...},
     "model": {name: fp32 tensor}            every parameter (all experts, dim 0 = expert) and buffer
     "optimizer": {name: {"exp_avg": ..., "exp_avg_sq": ..., "step": ...}}   keyed by parameter NAME
     "scheduler": LambdaLR.state_dict(),      the LR schedule (last_epoch = optimiser steps taken)
     "rng": {rank: that rank's RNG streams}}  (left out of the converted file: numpy/python objects)

Where it comes from:
* native: ``state.pt`` is already full (one process holds every expert); its optimiser state is
  keyed by index, in the order of the parameter groups, and ``param_names`` (saved since) names them.
* deepspeed: DeepSpeed's ZeRO files hold flat partitions that only its own code can cut back into
  parameters, so every save also writes the state by name beside them (assembled at save time with
  DeepSpeed's ``safe_get_full_fp32_param``/``safe_get_full_optimizer_state``): ``portable_dense.pt``
  (rank 0: dense fp32 master weights, their optimiser state, buffers, schedule) and, per EP rank, the
  ``master``/``optimizer`` entries of ``experts_epNNN.pt`` (this EP rank's experts). Experts are
  joined along dim 0 in EP-rank order (parallel.sharding), like the weights in full_weights.py.

A new rank then takes its slice (``shard_expert_state``) and its engine puts it in place.
"""

from __future__ import annotations

from pathlib import Path

import torch

from msmoe_dist.checkpoint.layout import EXPERTS_GLOB, NATIVE_STATE, PORTABLE_DENSE, rank_file
from msmoe_dist.checkpoint.manager import torch_load
from msmoe_dist.checkpoint.meta import CheckpointError, CheckpointMeta
from msmoe_dist.parallel.sharding import is_expert_key

FORMAT = "msmoe-full-state/1"


def optimizer_param_names(model: torch.nn.Module, groups: list[dict]) -> list[str]:
    """The names of ``groups``' parameters in optimiser index order (a torch state_dict's keys 0, 1, ...)."""
    name_of = {id(p): n for n, p in model.named_parameters()}
    return [name_of[id(p)] for g in groups for p in g["params"]]


def _join_optimizer(shards: list[dict]) -> dict:
    """Per-EP-rank {name: {key: tensor}} of the experts -> every expert (dim 0); scalars (step) from rank 0."""
    out: dict = {}
    for name, first in shards[0].items():
        out[name] = {
            key: torch.cat([s[name][key] for s in shards], 0) if torch.is_tensor(v) and v.dim() > 0 else v
            for key, v in first.items()
        }
    return out


def _native(step_dir: Path, names_in_order: list[str] | None) -> dict:
    state = torch_load(step_dir / NATIVE_STATE)
    names = state.get("param_names") or names_in_order
    opt = state["optimizer"]
    if names is None or len(names) != sum(len(g["params"]) for g in opt["param_groups"]):
        raise CheckpointError(f"{step_dir / NATIVE_STATE}: cannot name its optimiser state (parameter count differs)")
    return {
        "model": {k: (v.float() if torch.is_floating_point(v) else v) for k, v in state["model"].items()},
        "optimizer": {names[int(i)]: dict(s) for i, s in opt["state"].items()},
        "scheduler": state["scheduler"],
        "rng": {0: state["rng"]},
    }


def _deepspeed(step_dir: Path, meta: CheckpointMeta) -> dict:
    if not (step_dir / PORTABLE_DENSE).is_file():
        raise CheckpointError(
            f"{step_dir} has no {PORTABLE_DENSE} (saved before checkpoints kept the optimiser state by name, or "
            "with fp16 at ZeRO stage 0); resume it at its own layout, or start a new run from its weights with "
            "checkpoint.init_from"
        )
    dense = torch_load(step_dir / PORTABLE_DENSE)
    files = sorted(step_dir.glob(EXPERTS_GLOB))
    if len(files) != meta.layout["ep_size"]:
        raise CheckpointError(
            f"{step_dir} has {len(files)} expert shard files, expected {meta.layout['ep_size']} (its ep_size)"
        )
    shards = [torch_load(f) for f in files]
    if any("master" not in s for s in shards):
        raise CheckpointError(f"{step_dir}: its expert files hold no optimiser state by name")
    experts = {k: torch.cat([s["master"][k] for s in shards], 0) for k in shards[0]["master"]}
    rng = {}
    for r in range(int(meta.layout["world_size"])):
        if (step_dir / rank_file(r)).is_file():
            rng[r] = torch_load(step_dir / rank_file(r))["rng"]
    return {
        "model": {**dense["master"], **experts},
        "optimizer": {**dense["optimizer"], **_join_optimizer([s["optimizer"] for s in shards])},
        "scheduler": dense["scheduler"],
        "rng": rng,
    }


def assemble_full_state(step_dir: Path, meta: CheckpointMeta, names_in_order: list[str] | None = None) -> dict:
    """The layout-free state of a sealed checkpoint (module docstring). ``names_in_order`` names a native
    checkpoint's optimiser entries when it predates ``param_names`` (the caller's own optimiser order).
    The caller verifies the files first (the resume and `msmoe-ckpt` do)."""
    engine = meta.layout.get("engine")
    if engine == "native":
        body = _native(step_dir, names_in_order)
    elif engine == "deepspeed":
        body = _deepspeed(step_dir, meta)
    else:
        raise CheckpointError(f"{step_dir}: unknown engine {engine!r} in its metadata")
    return {"format": FORMAT, "step": meta.step, "layout": dict(meta.layout), **body}


def local_state(full: dict, ep_rank: int, ep_size: int) -> tuple[dict, dict]:
    """(model state, optimiser state by name) of one EP rank: experts sliced along dim 0."""
    from msmoe_dist.parallel.sharding import shard_expert_state

    model = shard_expert_state(full["model"], ep_rank, ep_size)
    optim = {}
    for name, st in full["optimizer"].items():
        if is_expert_key(name):
            per = {k: v for k, v in st.items() if torch.is_tensor(v) and v.dim() > 0}
            st = {**st, **{k: shard_expert_state({name: v}, ep_rank, ep_size)[name] for k, v in per.items()}}
        optim[name] = st
    return model, optim


def optimizer_step(full: dict) -> float | None:
    """The optimiser's step count (Adam's ``step``), the same for every parameter; None if it kept none."""
    steps = {float(s["step"]) for s in full["optimizer"].values() if "step" in s}
    if len(steps) > 1:
        raise CheckpointError(f"the optimiser state holds different step counts {sorted(steps)}; expected one")
    return steps.pop() if steps else None
