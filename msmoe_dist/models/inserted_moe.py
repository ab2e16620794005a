"""An MoE layer inserted between two blocks (model.layer_insert), as the StableMoE reference places it.

The StableMoE reference (Hunter-DDM/stablemoe fairseq/models/transformer.py, lines 771-786) inserts its
MoE layer into the decoder's layer list at index (i + 1) * L // (n + 1), beside the L ordinary blocks,
rather than replacing one block's FFN. The layer has no attention: its experts are residual sublayers
x + FFN(LN(x)) (fairseq/modules/moe_layer.py MoESublayer) mixed with the input by the sigmoid gate g,
g * (x + FFN(LN(x))) + (1 - g) * x = x + g * FFN(LN(x)), which is this layer with one sublayer per expert:

    y = lookahead(x);  u = drop(moe(LN(y)));  x = x + d(u)

(d(u) = u without momentum). The router scores LN(y), or y itself with moe.stable_router_input=residual.
"""

from __future__ import annotations

from torch import Tensor, nn

from msmoe_dist.config.schema import ModelConfig, MoEConfig
from msmoe_dist.models.blocks import layer_stats
from msmoe_dist.moe import MoELayer
from msmoe_dist.momentum import MomentumState, MomentumUpdate


class InsertedMoELayer(nn.Module):
    """LN -> MoE -> residual, with no attention; the same forward signature as models.blocks.Block."""

    def __init__(
        self,
        mcfg: ModelConfig,
        moe_cfg: MoEConfig,
        moe_layer_index: int,
        vocab_size: int | None = None,
        *,
        expert_seed: int | None = None,
        expert_ids: range | None = None,
    ):
        """expert_seed, expert_ids: as for models.blocks.Block (this rank's experts, EP-independent init)."""
        super().__init__()
        self.moe_layer_index = moe_layer_index
        self.norm = nn.LayerNorm(mcfg.d_model, eps=mcfg.norm_eps)
        self.drop = nn.Dropout(mcfg.dropout)
        self.moe = MoELayer(
            mcfg.d_model,
            moe_cfg,
            init_std=mcfg.init_std,
            vocab_size=vocab_size,
            init_seed=expert_seed,
            moe_layer=moe_layer_index,
            expert_ids=expert_ids,
        )
        self.router_sees_residual = moe_cfg.router == "stablemoe" and moe_cfg.stable_router_input == "residual"

    @property
    def is_moe(self) -> bool:
        return True

    def forward(
        self,
        x: Tensor,
        state: MomentumState,
        momentum: MomentumUpdate,
        collect_stats: bool = False,
        token_ids: Tensor | None = None,
    ):
        """Returns (x, state, aux_loss, stats dict or None), as Block.forward."""
        y = momentum.lookahead(x, state)
        moe_out = self.moe(
            self.norm(y),
            collect_stats=collect_stats,
            token_ids=token_ids,
            router_input=y if self.router_sees_residual else None,
        )
        d, state = momentum(self.drop(moe_out.out), state, self.moe_layer_index)
        return x + d, state, moe_out.aux_loss, layer_stats(moe_out, state) if collect_stats else None
