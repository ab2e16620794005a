"""Experts with dropout inside: after the activation (moe.expert_dropout), the placement of the
MomentumSMoE reference (rachtsy/MomentumSMoE models.py, activation = Sequential(ReLU, Dropout)) and of
V-MoE's expert MlpBlock (vmoe/vit_jax/models_vit.py MlpBlock: gelu, Dropout, Dense, Dropout).

The fused expert kernels (moe/experts.py) have no dropout; in training with moe.expert_dropout > 0
the layer runs this per-expert chain instead: the same weights and the same math, plus one dropout
mask over the [R, F] hidden rows. Evaluation (and expert_dropout = 0) keeps the fast path.

Legend: R routed rows (sorted by expert), D model dim, F ffn dim.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from msmoe_dist.moe.experts import ACTIVATIONS, Experts


def experts_with_hidden_dropout(experts: Experts, x_RD: Tensor, tokens_per_expert: Sequence[int], p: float) -> Tensor:
    """y = act(x w1[e] + b1[e]) -> dropout(p) -> (.) w2[e] + b2[e], expert by expert (training only)."""
    counts = experts._check(x_RD, tokens_per_expert)
    x, w1, b1, w2, b2 = experts._weights(x_RD)
    act = ACTIVATIONS[experts.activation]
    starts = [0]
    for n in counts:
        starts.append(starts[-1] + n)
    # unbind, not w1[e]: one select per expert would give each expert's weight gradient its own
    # zero-filled [E, D, F] buffer, summed into the next (E^2 D F bytes a step); unbind's backward
    # stacks the E slices into one.
    w1_e, b1_e, w2_e, b2_e = w1.unbind(0), b1.unbind(0), w2.unbind(0), b2.unbind(0)
    spans = list(zip(starts, starts[1:]))
    with torch.autocast(device_type=x_RD.device.type, enabled=False):
        h_RF = torch.cat([torch.addmm(b1_e[e], x[s:t], w1_e[e]) for e, (s, t) in enumerate(spans)])
        a_RF = F.dropout(act(h_RF), p, training=True)
        return torch.cat([torch.addmm(b2_e[e], a_RF[s:t], w2_e[e]) for e, (s, t) in enumerate(spans)])
