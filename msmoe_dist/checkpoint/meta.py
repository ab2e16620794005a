"""A checkpoint's metadata (complete.json) and the one check of whether it fits the run at hand.

On disk the metadata is one flat JSON object, as it always was:
    {"step": 100, "engine": "deepspeed", "world_size": 2, "ep_size": 2, "zero_stage": 1, "dtype": "bf16",
     "config": {...the resolved config...}, "vocab_size": 512, "vocab_sha256": "...", "parts": {...}}
The step is stored here and nowhere else. ``data`` is the task's fingerprint of its data (the
vocabulary's size and hash, or the class list); ``parts`` holds the small states of the parts
that live beside the checkpoint (the metrics log's position); ``files`` the size and checksum of
every other file of the checkpoint (integrity.py), absent in checkpoints saved before they were kept.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from msmoe_dist.checkpoint.layout import META
from msmoe_dist.config.model_spec import ModelSpec
from msmoe_dist.errors import UserError

LAYOUT_KEYS = ("engine", "world_size", "ep_size", "zero_stage", "dtype")


class CheckpointError(UserError):
    """A checkpoint path or file that cannot be used (one-line message)."""


@dataclass(frozen=True)
class CheckpointMeta:
    step: int
    layout: dict  # LAYOUT_KEYS: how the state was partitioned when saved
    config: dict  # the resolved configuration of the run that saved it
    data: dict = field(default_factory=dict)  # the task's data fingerprint
    parts: dict = field(default_factory=dict)  # small states of side parts (metrics log position)
    files: dict = field(default_factory=dict)  # {relative path: {"bytes": n, "blake2b": hex}}, filled by save

    def to_json(self) -> str:
        body = {"step": self.step, **self.layout, "config": self.config, **self.data}
        if self.parts:
            body["parts"] = self.parts
        if self.files:
            body["files"] = self.files
        return json.dumps(body, indent=1) + "\n"

    @classmethod
    def from_dict(cls, d: dict) -> CheckpointMeta:
        rest = {k: v for k, v in d.items() if k not in ("step", "config", "parts", "files", *LAYOUT_KEYS)}
        return cls(
            step=int(d["step"]),
            layout={k: d.get(k) for k in LAYOUT_KEYS},
            config=d.get("config", {}),
            data=rest,
            parts=d.get("parts", {}),
            files=d.get("files", {}),
        )

    def layout_differences(self, now: dict) -> list[str]:
        """The layout keys that differ from the run at hand (a resume then re-partitions by name). The
        native engine keeps fp32 weights whatever train.dtype says, so there the dtype does not count."""
        keys = [k for k in LAYOUT_KEYS if not (k == "dtype" and now.get("engine") == "native")]
        return [
            f"{k}={now.get(k)} (checkpoint: {self.layout.get(k)})" for k in keys if self.layout.get(k) != now.get(k)
        ]

    def check_resume(
        self, where: Path, layout_now: dict, spec: ModelSpec, batch_now: dict | None = None, allow_batch_change=False
    ) -> list[str]:
        """The one check of whether this checkpoint can continue in the run at hand; returns what changes.

        Refused (one CheckpointError naming every reason): another network (any ModelSpec key), an EP
        degree that does not divide the expert count, a changed global batch or micro-batch without
        ``allow_batch_change``. A changed layout (engine, world size, EP degree, ZeRO stage, dtype) is
        allowed: the state is then re-partitioned by name (checkpoint.full_state). ``batch_now``:
        {"batch_size": data.batch_size, "grad_accum_steps": ..., "world_size": ...} of the run at hand.
        Returns one line per change the caller should say (layout, batch)."""
        problems, notes = [], []
        network = spec.mismatches(self.config)
        if network:
            problems.append(
                f"the network differs: {', '.join(network)} (expected the same model/moe/momentum "
                "settings and vision shape keys; augmentation keys may change)"
            )
        num_experts = self.config.get("moe", {}).get("num_experts")
        ep = layout_now.get("ep_size") or 1
        if isinstance(num_experts, int) and num_experts % ep:
            problems.append(f"parallel.ep_size={ep} does not divide moe.num_experts={num_experts}")
        layout = self.layout_differences(layout_now)
        if layout:
            notes.append(
                f"the layout changes: {', '.join(layout)}; weights, optimiser state and schedule are re-partitioned"
            )
        if batch_now is not None:
            batch = self.batch_change(batch_now)
            if batch and not allow_batch_change:
                problems.append(
                    f"{batch} (the data order is defined per micro-batch of data.batch_size, so a resume needs "
                    "the same data.batch_size and the same train.grad_accum_steps x world size; at another world "
                    "size adjust train.grad_accum_steps, or set train.allow_batch_change=true, or start a new run "
                    f"from its weights: checkpoint.init_from={where})"
                )
            elif batch:
                notes.append(
                    f"{batch}: train.allow_batch_change=true, so training continues at step {self.step} with the new "
                    "batch (it reads what a run with this batch would read from that step on: samples may be "
                    "skipped or read twice); the LR schedule continues by step, the optimiser state as saved"
                )
        if problems:
            raise CheckpointError(f"cannot resume {where.name}: {'; '.join(problems)}")
        return notes

    def batch_change(self, now: dict) -> str:
        """'' when the global batch and its micro-batches are as saved, else what changed."""
        saved_b = self.config.get("data", {}).get("batch_size")
        saved_g = self.config.get("train", {}).get("grad_accum_steps", 1)
        saved_w = self.layout.get("world_size") or 1
        if not isinstance(saved_b, int):
            return ""  # a checkpoint without these keys: nothing to compare
        old, new = saved_b * saved_g * saved_w, now["batch_size"] * now["grad_accum_steps"] * now["world_size"]
        if old == new and saved_b == now["batch_size"]:
            return ""
        what = (
            f"the global batch changes from {old} to {new} samples"
            if old != new
            else (f"the micro-batch changes while the global batch stays {old} samples")
        )
        return (
            f"{what} (data.batch_size {saved_b} -> "
            f"{now['batch_size']}, train.grad_accum_steps x world size {saved_g}x{saved_w} -> "
            f"{now['grad_accum_steps']}x{now['world_size']})"
        )

    def check_weights(self, where: Path, spec: ModelSpec) -> None:
        """For checkpoint.init_from: only the network must match (the layout may differ)."""
        network = spec.mismatches(self.config)
        if network:
            raise CheckpointError(
                f"cannot resume from the weights of {where}: {', '.join(network)} "
                "(expected the same model/moe/momentum settings and vision shape keys)"
            )


def read_meta(step_dir: Path) -> CheckpointMeta:
    try:
        return CheckpointMeta.from_dict(json.loads((step_dir / META).read_text()))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"cannot read {step_dir / META}: {exc}") from exc
