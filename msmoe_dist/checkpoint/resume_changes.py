"""Which configuration keys may change when a run resumes, and the one check of the rest.

A resumed run continues the saved one: its optimiser state, learning-rate schedule, data order and
seed come from the checkpoint, so a changed ``optim.lr`` or ``data.batch_size`` would be silently
ignored or would mix two runs. ``resume_changes`` compares the saved config with the current one:
keys in RESUMABLE may change (the caller lists them in one line); any other difference is refused
with one CheckpointError that names the keys and says how to start a new run from the weights.

The network (model/moe/momentum, the ViT's arch keys), the layout (engine, EP degree, ZeRO stage,
dtype) and the global batch (data.batch_size, train.grad_accum_steps) are compared by
CheckpointMeta.check_resume, which says more about them; they are skipped here.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from msmoe_dist.checkpoint.meta import CheckpointError

# Keys that only say how long to train, where to write, what to log, how to save and how to
# launch: a resume may change them. A prefix ending in "." covers a whole section.
RESUMABLE = (
    "train.max_steps",
    "train.run_dir",
    "train.device",
    "train.dtype",  # the layout check refuses it where it matters (DeepSpeed keeps bf16/fp16 weights)
    "train.progress",
    "train.eval_every",
    "train.eval_batches",
    "train.resume",
    "train.auto_resume",
    "train.overwrite",
    "train.activation_checkpointing",  # memory against time; the same gradients
    "checkpoint.",
    "logging.",
    "parallel.engine",  # engine, ep_size, zero_stage: compared as the resolved layout by check_resume
    "parallel.ep_size",
    "parallel.zero_stage",
    "parallel.backend",
    "parallel.timeout_s",
    "vision.num_workers",
    "data.path",  # the corpus may move; its vocabulary is checked against the checkpoint's
    "train.allow_batch_change",
)
_NOT_WORTH_SAYING = ("train.resume", "train.auto_resume")  # flip on every resume
# the network (ModelSpec.mismatches) and the global batch (micro-batch size, grad_accum_steps x world size),
# both via check_resume
_CHECKED_ELSEWHERE = ("model.", "moe.", "momentum.", "data.batch_size", "train.grad_accum_steps")


def _flat(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _matches(key: str, patterns: tuple[str, ...]) -> bool:
    return any(key == p or (p.endswith(".") and key.startswith(p)) for p in patterns)


def resume_changes(where: Path, saved: Mapping[str, Any], now: Mapping[str, Any], arch_vision: tuple = ()) -> list[str]:
    """The allowed changes, one ``key=now (checkpoint: saved)`` string each; raises on any other.

    Keys the checkpoint does not have (added to the schema since it was saved) are not compared.
    ``arch_vision``: the vision keys that shape a ViT (compared as part of the network).
    """
    old, new = _flat(saved), _flat(now)
    skip = (*_CHECKED_ELSEWHERE, *(f"vision.{k}" for k in arch_vision))
    allowed, refused = [], []
    for key in sorted(new):
        if key not in old or old[key] == new[key] or _matches(key, skip):
            continue
        change = f"{key}={new[key]!r} (checkpoint: {old[key]!r})"
        if _matches(key, RESUMABLE):
            if key not in _NOT_WORTH_SAYING:
                allowed.append(change)
        else:
            refused.append(change)
    if refused:
        raise CheckpointError(
            f"cannot resume {where.name} with changed settings: {', '.join(refused)} (a resume continues the "
            "saved optimiser, schedule, data and seed; only train.max_steps, train.eval_*, train.progress, "
            "logging.*, checkpoint.* and launch keys may change); to train with the new settings start a new "
            f"run from these weights: checkpoint.init_from={where} train.run_dir=<another directory>"
        )
    return allowed
