"""Per-layer routing diagnostics, for logging only (no gradient).

Legend: T tokens, E experts, K top-k, R routed (kept) rows sorted by expert, D model dim.

Computed inside the forward without a device-to-host sync: the counts are host integers already (the
dispatcher needed them for the experts' splits), and the two float statistics stay 0-d/[E] tensors on
the device until they are read, once, when the trainer logs the step (`to_scalars`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from msmoe_dist.moe.dispatcher import DispatchState
from msmoe_dist.moe.router import Routing


@dataclass(frozen=True)
class MoEStats:
    tokens_per_expert: list[int]  # kept assignments per expert
    routed_per_expert: list[int]  # assignments per expert before capacity drops
    num_dropped: int
    drop_fraction: float  # num_dropped / (T * K)
    load_imbalance: float  # max / mean of routed_per_expert; 1.0 is perfectly balanced
    router_entropy_t: Tensor  # 0-d, on the device: mean over tokens of the entropy of probs_TE, in nats
    expert_out_norm_t: Tensor  # [E], on the device: mean L2 norm of each expert's output rows; 0 if unused
    unpicked_t: Tensor | None = None  # expert-choice routing: 0-d, this rank's tokens no expert picked
    num_tokens: int = 0  # this rank's tokens in the forward

    @property
    def router_entropy(self) -> float:
        return float(self.router_entropy_t)  # device-to-host sync

    @property
    def expert_out_norm(self) -> list[float]:
        return self.expert_out_norm_t.tolist()  # device-to-host sync

    @property
    def selection_by_norm(self) -> list[int]:
        """routed_per_expert ordered by descending expert_out_norm."""
        out_norm = self.expert_out_norm
        # Stable sort on the negated norm keeps ties in expert order, so the histogram is reproducible.
        order = sorted(range(len(out_norm)), key=lambda e: -out_norm[e])
        return [self.routed_per_expert[e] for e in order]

    def to_scalars(self, prefix: str = "") -> dict:
        """The metrics-log entries of this layer, keys ``prefix + name`` (e.g. ``moe.layer0.load_imbalance``).
        Reads the tensors (the layer's device-to-host syncs, on logged steps only)."""
        return {
            f"{prefix}load_imbalance": float(self.load_imbalance),
            f"{prefix}drop_fraction": float(self.drop_fraction),
            f"{prefix}dropped": int(self.num_dropped),
            f"{prefix}router_entropy": self.router_entropy,
            f"{prefix}tokens_per_expert": [int(c) for c in self.tokens_per_expert],
            f"{prefix}selection_by_norm": [int(c) for c in self.selection_by_norm],
            **self._unpicked_scalars(prefix),
        }

    def _unpicked_scalars(self, prefix: str) -> dict:
        """Expert-choice routing only: tokens no expert picked (they pass through the residual)."""
        if self.unpicked_t is None:
            return {}
        unpicked = int(self.unpicked_t)  # device-to-host sync (logged steps)
        return {
            f"{prefix}unpicked": unpicked,
            f"{prefix}unpicked_fraction": unpicked / self.num_tokens if self.num_tokens else 0.0,
        }


@torch.no_grad()
def compute_stats(routing: Routing, state: DispatchState, y_RD: Tensor) -> MoEStats:
    """Statistics of one forward: ``y_RD`` is the experts' output (before the combine weights). No sync."""
    routed = [int(n) for n in state.routed_per_expert]
    kept = [int(n) for n in state.tokens_per_expert]
    assignments = routing.experts_TK.numel()
    mean_routed = sum(routed) / max(len(routed), 1)
    imbalance = max(routed) / mean_routed if mean_routed > 0 else 0.0

    probs_TE = routing.probs_TE.detach().float()
    # xlogy: an exact-zero probability contributes 0, not nan.
    if probs_TE.numel():
        entropy = -torch.special.xlogy(probs_TE, probs_TE).sum(-1).mean()
    else:
        entropy = torch.zeros((), device=probs_TE.device)

    norms_R = torch.linalg.vector_norm(y_RD.detach().float(), dim=-1)
    # The same per-expert means as before (chunk by chunk, so the logged values are unchanged), kept on
    # the device: one small kernel per expert instead of one sync per expert.
    zero = norms_R.new_zeros(())
    out_norm = torch.stack([chunk.mean() if chunk.numel() else zero for chunk in norms_R.split(kept)])

    return MoEStats(
        tokens_per_expert=kept,
        routed_per_expert=routed,
        num_dropped=int(state.num_dropped),
        drop_fraction=state.num_dropped / assignments if assignments else 0.0,
        load_imbalance=float(imbalance),
        router_entropy_t=entropy,
        expert_out_norm_t=out_norm,
        unpicked_t=getattr(state, "unpicked_t", None),  # set by the expert-choice dispatchers
        num_tokens=int(state.num_tokens),
    )
