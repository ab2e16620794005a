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
        """The layout keys a resume needs unchanged. The native engine keeps fp32 weights whatever
        train.dtype says, so there the dtype may change."""
        keys = [k for k in LAYOUT_KEYS if not (k == "dtype" and now.get("engine") == "native")]
        return [
            f"{k}={now.get(k)} (checkpoint: {self.layout.get(k)})" for k in keys if self.layout.get(k) != now.get(k)
        ]

    def check_resume(self, where: Path, layout_now: dict, spec: ModelSpec) -> None:
        """One CheckpointError naming every key that stops a resume: the layout and the network."""
        layout = self.layout_differences(layout_now)
        network = spec.mismatches(self.config)
        if layout or network:
            parts = []
            if network:
                parts.append(
                    f"the network differs: {', '.join(network)} (expected the same model/moe/momentum "
                    "settings and vision shape keys; augmentation keys may change)"
                )
            if layout:
                parts.append(
                    f"the layout differs: {', '.join(layout)} (a resume needs the same engine, world size, "
                    "EP degree, ZeRO stage and dtype; to continue at another layout start a new run with "
                    "checkpoint.init_from=<checkpoint>, weights only)"
                )
            raise CheckpointError(f"cannot resume {where.name}: {'; '.join(parts)}")

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
