"""ModelSpec: the configuration keys that define the network, and nothing else.

They are the whole ``model``, ``moe`` and ``momentum`` sections plus, for a ViT
(``model.kind=vit``), the vision keys marked ``arch=True`` in ``schema.py`` (image and patch
size, classes, pooling, where the MoE blocks go); the other vision keys only change the
training data.  A checkpoint's weights belong to one network: :meth:`ModelSpec.mismatches`
lists what differs between this spec and the config a checkpoint was saved with.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from msmoe_dist.config.fields import arch_keys
from msmoe_dist.config.schema import Config, ModelConfig, MoEConfig, MomentumConfig

# model.output_layer full and chunked compute the same loss from the same [V, D] matrix, so a run may
# switch between them (say, to chunked after running out of memory); adaptive is another model.
_SAME_WEIGHTS_OUTPUT_LAYERS = ("full", "chunked")


# moe keys that change how the layer is computed, not the network or its results (beyond float rounding).
_EXECUTION_ONLY_MOE_KEYS = ("overlap_chunks",)


def _weights_still_fit(key: str, saved: Any, now: Any) -> bool:
    """True for a model key whose change keeps the saved weights valid."""
    if key == "output_chunk_tokens":  # how many tokens' logits exist at once: memory, not the network
        return True
    return key == "output_layer" and saved in _SAME_WEIGHTS_OUTPUT_LAYERS and now in _SAME_WEIGHTS_OUTPUT_LAYERS


@dataclass(frozen=True)
class ModelSpec:
    """The network's configuration; build it with :meth:`of`. Equal specs mean the same network."""

    model: ModelConfig
    moe: MoEConfig
    momentum: MomentumConfig
    vision: dict[str, Any] = field(default_factory=dict)  # the arch=True vision keys; empty unless a ViT

    @classmethod
    def of(cls, cfg: Config) -> ModelSpec:
        """The spec of ``cfg`` (copies: changing ``cfg`` later does not change the spec)."""
        vision = {key: getattr(cfg.vision, key) for key in arch_keys("vision")} if cfg.model.kind == "vit" else {}
        return cls(
            dataclasses.replace(cfg.model), dataclasses.replace(cfg.moe), dataclasses.replace(cfg.momentum), vision
        )

    def as_dict(self) -> dict[str, dict[str, Any]]:
        """``{section: {key: value}}``, shaped like the saved config :meth:`mismatches` reads."""
        return {
            "model": dataclasses.asdict(self.model),
            "moe": dataclasses.asdict(self.moe),
            "momentum": dataclasses.asdict(self.momentum),
            "vision": dict(self.vision),
        }

    def mismatches(self, saved_config: Mapping[str, Any]) -> list[str]:
        """What differs from ``saved_config``, the whole config dict a checkpoint stores, one string per key.

        Each string reads ``moe.num_experts=8 (checkpoint: 4)`` (this spec's value first).  Every key of
        the saved model/moe/momentum sections must match, except ``model.output_chunk_tokens``,
        ``moe.overlap_chunks`` (how the exchange runs) and ``model.output_layer`` moving between full and
        chunked.  A key the checkpoint does not have (one added to the schema since) is not compared.
        Vision keys count only for a ViT.
        """
        found: list[str] = []
        now = self.as_dict()
        for section in ("model", "moe", "momentum"):
            saved = saved_config.get(section)
            if not isinstance(saved, Mapping):
                found.append(f"{section} (checkpoint: missing)")
                continue
            for key, saved_value in saved.items():
                value = now[section].get(key)
                if section == "model" and _weights_still_fit(key, saved_value, value):
                    continue
                if section == "moe" and key in _EXECUTION_ONLY_MOE_KEYS:
                    continue
                if value != saved_value:
                    found.append(f"{section}.{key}={value!r} (checkpoint: {saved_value!r})")
        saved_vision = saved_config.get("vision") or {}
        for key, value in self.vision.items():
            saved_value = saved_vision.get(key, value)
            if value != saved_value:
                found.append(f"vision.{key}={value!r} (checkpoint: {saved_value!r})")
        return found
