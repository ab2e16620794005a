"""The sparse MoE layer: route, dispatch, run the experts, combine.

Legend: T tokens (all leading dims of the input flattened), D model dim, E experts,
K top-k, R routed rows (sorted by expert).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from msmoe_dist.config.schema import MoEConfig
from msmoe_dist.moe.dispatcher import LocalDispatcher, expert_capacity
from msmoe_dist.moe.experts import Experts
from msmoe_dist.moe.router import Router
from msmoe_dist.moe.stablemoe import StableMoERouter
from msmoe_dist.moe.stats import MoEStats, compute_stats


@dataclass(frozen=True)
class MoEOutput:
    out: Tensor  # same shape as the input; 0 for a token whose assignments were all dropped
    aux_loss: Tensor  # weighted balance + z loss, a scalar
    stats: MoEStats | None


class MoELayer(nn.Module):
    def __init__(self, d_model: int, cfg: MoEConfig, dispatcher=None, init_std: float = 0.02,
                 vocab_size: int | None = None):
        super().__init__()
        if cfg.expert_impl not in ("grouped", "loop"):
            raise ValueError(f"unknown expert_impl {cfg.expert_impl!r}")
        self.d_model = d_model
        self.cfg = cfg
        if cfg.router == "stablemoe":  # vocab_size: its distilled router embeds token ids
            self.router = StableMoERouter(d_model, cfg, vocab_size)
        elif cfg.router == "topk":
            self.router = Router(d_model, cfg)
            self.router.reset_parameters(init_std)
        else:
            raise ValueError(f"unknown router {cfg.router!r}")
        self.dispatcher = dispatcher if dispatcher is not None else LocalDispatcher(cfg.num_experts)
        # An expert-parallel dispatcher owns only some experts; it says how many.
        num_local = getattr(self.dispatcher, "num_local_experts", cfg.num_experts)
        self.experts = Experts(num_local, d_model, cfg.expert_ffn_dim, cfg.activation, init_std)

    @property
    def capacity_factor(self) -> float:
        """moe.capacity_factor in training; moe.eval_capacity_factor (when >= 0) in evaluation."""
        if not self.training and self.cfg.eval_capacity_factor >= 0:
            return self.cfg.eval_capacity_factor
        return self.cfg.capacity_factor

    def forward(self, x: Tensor, collect_stats: bool = False, token_ids: Tensor | None = None) -> MoEOutput:
        """``token_ids``: the input ids of the tokens, shaped like x without its last dim (StableMoE routes by them)."""
        if x.shape[-1] != self.d_model:
            raise ValueError(f"expected last dim {self.d_model}, got shape {tuple(x.shape)}")
        x_TD = x.reshape(-1, self.d_model)
        if isinstance(self.router, StableMoERouter):
            routing = self.router(x_TD, None if token_ids is None else token_ids.reshape(-1))
        else:
            routing = self.router(x_TD)

        # Cast before the gather, not after: under autocast the experts compute in the low
        # precision anyway, and this moves T rows instead of T*K (and halves what crosses
        # the network once dispatch is an all-to-all).
        x_in_TD = x_TD
        if torch.is_autocast_enabled(x.device.type):
            x_in_TD = x_TD.to(torch.get_autocast_dtype(x.device.type))
        combine_routing = dataclasses.replace(routing, weights_TK=routing.weights_TK.to(x.dtype))

        capacity = expert_capacity(self.capacity_factor, x_TD.shape[0], self.cfg.top_k, self.cfg.num_experts)
        x_RD, tokens_per_expert, state = self.dispatcher.dispatch(x_in_TD, combine_routing, capacity)
        if self.cfg.expert_impl == "grouped":
            y_RD = self.experts(x_RD, tokens_per_expert)
        else:
            y_RD = self.experts.forward_loop(x_RD, tokens_per_expert)
        stats = None
        combine_rows = getattr(self.dispatcher, "combine_rows", None)
        if collect_stats and combine_rows is not None:
            # Expert parallel: y_RD holds other ranks' tokens; statistics describe this rank's
            # tokens, so take the rows after they came home.
            out_TD, y_home_RD = combine_rows(y_RD, state)
            stats = compute_stats(routing, state.home, y_home_RD)
        else:
            out_TD = self.dispatcher.combine(y_RD, state)
            if collect_stats:
                stats = compute_stats(routing, state, y_RD)
        return MoEOutput(out=out_TD.to(x.dtype).view(x.shape), aux_loss=routing.aux_loss, stats=stats)
