"""Transformer blocks with an MoE (momentum) or dense FFN sublayer.

Two block styles:
  pre_ln     x = x + drop(attn(LN1(x)));  MoE: y = lookahead(x); u = drop(moe(LN2(y)));  x = x + d(u)
  reference  the MomentumSMoE reference's post-LN block with its double LayerNorm:
             h = LN1(h + drop(attn(h)));  u = drop(moe(y));  h = LN2(h + LNm(h + d(u)))
             At AdamSMoE's Adam layers the reference's sublayer computes `inp - (step + inp)`,
             so its inner LayerNorm sees the step alone: h = LN2(h + LNm(d(u))). Reproduced as is.
d(u) is the momentum family's residual increment (msmoe_dist.momentum). Dense blocks (GLaM
layout) pass the momentum state through unchanged.
Reference options (docs/reference_differences.md): model.dropout_at=reference drops the attention and
dense-FFN output dropout; model.post_mlp_norm makes the pre_ln residual x = LN(x + d) (rachtsy/vmoe's
momentum models); momentum.lookahead=normed feeds LN(x) + lam*p instead of LN(x + lam*p), and
momentum.lookahead_dense feeds it to dense blocks too (rachtsy/vmoe robust); with
moe.stable_router_input=residual the StableMoE router scores the un-normalised residual stream.

Legend: B batch, S sequence, D model dim.

Activation checkpointing (`checkpointing`, set by MoEModel.set_activation_checkpointing): in training
with gradients on, `block` recomputes the whole block in the backward pass from its inputs (the hidden
state and the momentum state's tensors); `selective` recomputes the attention sublayer and the dense
FFN sublayer (with their norms, dropout and residual) and keeps the MoE layer's activations, so the
backward never repeats a dispatch. torch.utils.checkpoint (non-reentrant) restores the RNG state, so
the recomputed dropout masks (and noisy-gating noise) are the ones of the forward pass. Nothing the
forward writes to a module is changed by a recompute: the momentum state is a new value per layer, the
statistics are returned (the recomputed ones are dropped), and StableMoE's frozen table is filled
once from parameters that do not change before the backward.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from msmoe_dist.config.schema import ModelConfig, MoEConfig
from msmoe_dist.models.attention import SelfAttention
from msmoe_dist.moe import ACTIVATIONS, MoELayer, MoEOutput
from msmoe_dist.momentum import MomentumState, MomentumUpdate


def layer_stats(moe_out: MoEOutput, state: MomentumState) -> dict:
    """What an MoE block reports when asked (collect_stats): its routing statistics and, with momentum, the mean
    norm of the momentum buffer (a 0-d tensor: read on the host only when the trainer logs it)."""
    stats = {"moe": moe_out.stats}
    if state.p is not None:
        stats["momentum_norm"] = state.p.detach().float().norm(dim=-1).mean()
    return stats


class DenseFFN(nn.Module):
    def __init__(self, d_model: int, ffn_dim: int, dropout: float, activation: str = "relu"):
        super().__init__()
        self.fc1 = nn.Linear(d_model, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, d_model)
        self.drop = nn.Dropout(dropout)
        self.act = ACTIVATIONS[activation]

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.drop(self.act(self.fc1(x))))


CHECKPOINT_MODES = ("none", "block", "selective")


class Block(nn.Module):
    """moe_layer_index: this block's position among the model's MoE layers (the momentum rule's layer
    index), or None for a dense block."""

    checkpointing: str = "none"  # none | block | selective (see the module doc)

    def __init__(
        self,
        mcfg: ModelConfig,
        moe_cfg: MoEConfig,
        moe_layer_index: int | None,
        vocab_size: int | None = None,
        causal: bool = True,
        dense_activation: str = "relu",
        *,
        expert_seed: int | None = None,
        expert_ids: range | None = None,
    ):
        """expert_seed: the model's base seed of the experts' initial values; expert_ids: the global experts
        this process holds (None: all of them). See msmoe_dist.moe.experts.expert_seed."""
        super().__init__()
        d = mcfg.d_model
        self.pre_ln = mcfg.block_style == "pre_ln"
        self.moe_layer_index = moe_layer_index
        self.attn = SelfAttention(
            d, mcfg.num_heads, mcfg.dropout, rotary=mcfg.position == "rotary", causal=causal, bias=mcfg.attention_bias
        )
        self.norm1 = nn.LayerNorm(d, eps=mcfg.norm_eps)
        self.norm2 = nn.LayerNorm(d, eps=mcfg.norm_eps)
        self.drop = nn.Dropout(mcfg.dropout)
        # model.dropout_at=reference: no dropout on the attention and dense FFN outputs (the MoE output keeps it).
        self.sub_drop: nn.Module = nn.Identity() if mcfg.dropout_at == "reference" else self.drop
        # model.post_mlp_norm (pre_ln): x = LN(x + d) after the MLP/MoE residual (rachtsy/vmoe momentum models).
        self.post_norm = nn.LayerNorm(d, eps=mcfg.norm_eps) if mcfg.post_mlp_norm else None
        self.router_sees_residual = moe_cfg.router == "stablemoe" and moe_cfg.stable_router_input == "residual"
        if moe_layer_index is None:
            self.ffn = DenseFFN(d, mcfg.ffn_dim, mcfg.dropout, dense_activation)
        else:
            self.moe = MoELayer(
                d,
                moe_cfg,
                init_std=mcfg.init_std,
                vocab_size=vocab_size,
                init_seed=expert_seed,
                moe_layer=moe_layer_index,
                expert_ids=expert_ids,
            )
            if not self.pre_ln:
                self.moe_norm = nn.LayerNorm(d, eps=mcfg.norm_eps)  # the reference's inner LayerNorm

    @property
    def is_moe(self) -> bool:
        return self.moe_layer_index is not None

    def _recomputing(self, mode: str) -> bool:
        return self.checkpointing == mode and self.training and torch.is_grad_enabled()

    def forward(
        self,
        x: Tensor,
        state: MomentumState,
        momentum: MomentumUpdate,
        collect_stats: bool = False,
        token_ids: Tensor | None = None,
    ):
        """Returns (x, state, aux_loss or None, stats dict or None). token_ids [B, S]: for routers that use them."""
        if self._recomputing("block"):
            return checkpoint(self._forward, x, state, momentum, collect_stats, token_ids, use_reentrant=False)
        return self._forward(x, state, momentum, collect_stats, token_ids)

    def _attention(self, x: Tensor) -> Tensor:
        if self.pre_ln:
            return x + self.sub_drop(self.attn(self.norm1(x)))
        return self.norm1(x + self.sub_drop(self.attn(x)))

    def _dense(self, x: Tensor, state: MomentumState, momentum: MomentumUpdate) -> Tensor:
        if self.pre_ln:
            h = self._ffn_input(x, state, momentum) if momentum.lookahead_dense else self.norm2(x)
            return self._residual(x, self.sub_drop(self.ffn(h)))
        return self.norm2(x + self.sub_drop(self.ffn(x)))

    def _sublayer(self, fn, *args):
        if self._recomputing("selective"):
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def _forward(
        self,
        x: Tensor,
        state: MomentumState,
        momentum: MomentumUpdate,
        collect_stats: bool = False,
        token_ids: Tensor | None = None,
    ):
        x = self._sublayer(self._attention, x)
        if not self.is_moe:
            return self._sublayer(self._dense, x, state, momentum), state, None, None

        if self.pre_ln:
            y = self._ffn_input(x, state, momentum)
            router_input = momentum.lookahead(x, state) if self.router_sees_residual else None
        else:
            y, router_input = momentum.lookahead(x, state), None
        moe_out = self.moe(y, collect_stats=collect_stats, token_ids=token_ids, router_input=router_input)
        u = self.drop(moe_out.out)
        d, state = momentum(u, state, self.moe_layer_index)
        if self.pre_ln:
            x = self._residual(x, d)
        elif momentum.is_adam_layer(self.moe_layer_index):
            x = self.norm2(x + self.moe_norm(d))
        else:
            x = self.norm2(x + self.moe_norm(x + d))
        return x, state, moe_out.aux_loss, layer_stats(moe_out, state) if collect_stats else None

    def _ffn_input(self, x: Tensor, state: MomentumState, momentum: MomentumUpdate) -> Tensor:
        """pre_ln: what the FFN/MoE sees, LN(x + lam*p) or, with momentum.lookahead=normed, LN(x) + lam*p."""
        if momentum.lookahead_at == "normed":
            return momentum.lookahead(self.norm2(x), state)
        return self.norm2(momentum.lookahead(x, state))

    def _residual(self, x: Tensor, d: Tensor) -> Tensor:
        """pre_ln: x + d, or LN(x + d) with model.post_mlp_norm."""
        return x + d if self.post_norm is None else self.post_norm(x + d)
