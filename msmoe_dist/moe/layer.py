"""The sparse MoE layer: route, dispatch, run the experts, combine.

Legend: T tokens (all leading dims of the input flattened), D model dim, E experts,
K top-k, R routed rows (sorted by expert).

Three collaborators behind narrow interfaces, none of which the layer inspects:
  router      a `MoERouter` (moe/router.py): the top-k `Router` or the `StableMoERouter`
  dispatcher  a `Dispatcher` (moe/dispatcher.py): `LocalDispatcher` until expert parallelism
              swaps in the all-to-all one (`shard_experts`, called by parallel/expert_parallel.py)
  experts     the `Experts` bank of the experts this process holds
The dispatcher owns the capacity (an expert-parallel group agrees on one) and the way back
(`Combined`), so the layer's forward is the same sequence of calls on one process and under EP.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from msmoe_dist.moe.dispatcher import Dispatcher, ExpertCompute, LocalDispatcher
from msmoe_dist.moe.drop_renormalize import renormalize_after_drop
from msmoe_dist.moe.expert_choice import ExpertChoiceRouter, LocalExpertChoiceDispatcher
from msmoe_dist.moe.expert_dropout import experts_with_hidden_dropout
from msmoe_dist.moe.experts import Experts
from msmoe_dist.moe.router import Router
from msmoe_dist.moe.shared_experts import SharedExperts
from msmoe_dist.moe.stablemoe import StableMoERouter
from msmoe_dist.moe.stats import MoEStats, compute_stats

if TYPE_CHECKING:  # the config package imports models, which import this package
    from msmoe_dist.config.schema import MoEConfig


@dataclass(frozen=True)
class MoEOutput:
    out: Tensor  # same shape as the input; 0 (+ shared experts) for a token whose assignments were all dropped
    aux_loss: Tensor  # weighted balance + z loss, a scalar
    stats: MoEStats | None


def build_router(
    d_model: int, cfg: MoEConfig, init_std: float = 0.02, vocab_size: int | None = None
) -> Router | StableMoERouter | ExpertChoiceRouter:
    """The router that moe.router names (each is a MoERouter); vocab_size: StableMoE's distilled router
    embeds token ids."""
    if cfg.router == "stablemoe":
        return StableMoERouter(d_model, cfg, vocab_size)
    if cfg.router == "topk":
        router = Router(d_model, cfg)
        router.reset_parameters(init_std)
        return router
    if cfg.router == "expert_choice":
        ec = ExpertChoiceRouter(d_model, cfg)
        ec.reset_parameters(init_std)
        return ec
    raise ValueError(f"unknown router {cfg.router!r}")


class MoELayer(nn.Module):
    def __init__(
        self,
        d_model: int,
        cfg: MoEConfig,
        dispatcher: Dispatcher | None = None,
        init_std: float = 0.02,
        vocab_size: int | None = None,
        *,
        init_seed: int | None = None,
        moe_layer: int = 0,
        expert_ids: range | None = None,
    ):
        """init_seed, moe_layer: the experts' initial values (moe.experts.expert_seed; None draws the base from
        the global generator). expert_ids: the global experts this process will hold under expert parallelism
        (only those are allocated; `shard_experts` then only swaps the dispatcher); default all, or the
        dispatcher's first num_local_experts when a dispatcher is given."""
        super().__init__()
        if cfg.expert_impl not in ("grouped", "loop"):
            raise ValueError(f"unknown expert_impl {cfg.expert_impl!r}")
        self.d_model = d_model
        self.cfg = cfg
        self.router = build_router(d_model, cfg, init_std, vocab_size)
        if dispatcher is None:
            local = LocalExpertChoiceDispatcher if cfg.router == "expert_choice" else LocalDispatcher
            dispatcher = local(cfg.num_experts)
        self.dispatcher: Dispatcher = dispatcher
        if expert_ids is None:
            expert_ids = range(self.dispatcher.num_local_experts)
        self.experts = Experts(
            cfg.num_experts,
            d_model,
            cfg.expert_ffn_dim,
            cfg.activation,
            init_std,
            init_seed=init_seed,
            moe_layer=moe_layer,
            expert_ids=expert_ids,
        )
        # Chosen once: the fast path, or the per-expert loop kept as the obviously correct reference.
        # Bound to the Experts object, which shard_experts slices in place.
        self._run_experts = self.experts.forward_loop if cfg.expert_impl == "loop" else self.experts.__call__
        self.shared = None
        if cfg.num_shared_experts > 0:
            self.shared = SharedExperts(
                d_model, cfg.num_shared_experts, cfg.shared_expert_ffn_dim, cfg.activation, init_std
            )

    @property
    def num_local_experts(self) -> int:
        """Experts this process holds: all of them, or this rank's share under expert parallelism."""
        return self.experts.num_experts

    def shard_experts(self, experts: range, dispatcher: Dispatcher) -> None:
        """Expert parallelism: keep only `experts` (global ids, contiguous) and move tokens with
        `dispatcher`, which must deliver rows for exactly those experts. Once, before an optimiser exists.

        A layer built with only these experts (`expert_ids`) keeps its parameters and takes the dispatcher;
        a layer built with every expert is sliced (the parameters become new tagged Parameters)."""
        if len(experts) != dispatcher.num_local_experts:
            raise ValueError(
                f"keeping {len(experts)} experts but the dispatcher delivers rows for {dispatcher.num_local_experts}"
            )
        held = self.experts.expert_ids
        if held == experts and self.dispatcher.num_local_experts != len(held):  # built local-only, not yet wired
            self.dispatcher = dispatcher
            return
        if len(held) != self.cfg.num_experts:
            raise RuntimeError(f"the experts are already sharded (experts {held.start}..{held.stop - 1} held)")
        self.experts.keep_experts(experts)
        self.dispatcher = dispatcher

    def set_step(self, step: int) -> None:
        """The 0-based optimiser step about to be taken (StableMoE's stage depends on it)."""
        self.router.set_step(step)

    @property
    def capacity_factor(self) -> float:
        """moe.capacity_factor in training; moe.eval_capacity_factor (when >= 0) in evaluation."""
        if not self.training and self.cfg.eval_capacity_factor >= 0:
            return self.cfg.eval_capacity_factor
        return self.cfg.capacity_factor

    def _experts_fn(self):
        """The expert computation on dispatched rows, with the reference-exact dropouts when training:
        inside each expert after its activation (moe.expert_dropout: a per-expert loop, no fused kernel
        has it) and on each expert's output rows before the gates combine them (moe.expert_output_dropout)."""
        hidden_p = getattr(self.cfg, "expert_dropout", 0.0)
        out_p = getattr(self.cfg, "expert_output_dropout", 0.0)
        if not self.training or (hidden_p == 0 and out_p == 0):
            return self._run_experts

        def run(x_RD, tokens_per_expert):
            if hidden_p > 0:
                y_RD = experts_with_hidden_dropout(self.experts, x_RD, tokens_per_expert, hidden_p)
            else:
                y_RD = self._run_experts(x_RD, tokens_per_expert)
            return F.dropout(y_RD, out_p, training=True) if out_p > 0 else y_RD

        return run

    def forward(
        self,
        x: Tensor,
        collect_stats: bool = False,
        token_ids: Tensor | None = None,
        router_input: Tensor | None = None,
    ) -> MoEOutput:
        """``token_ids``: the input ids of the tokens, shaped like x without its last dim (StableMoE routes by them).
        ``router_input``: what the router scores instead of x, same shape (moe.stable_router_input=residual)."""
        if x.shape[-1] != self.d_model:
            raise ValueError(f"expected last dim {self.d_model}, got shape {tuple(x.shape)}")
        if self.dispatcher.num_local_experts != self.experts.num_experts:
            raise RuntimeError(
                f"this layer holds experts {self.experts.expert_ids.start}..{self.experts.expert_ids.stop - 1} of "
                f"{self.cfg.num_experts} but its dispatcher delivers rows for {self.dispatcher.num_local_experts}: "
                "apply expert parallelism (msmoe_dist.parallel.apply_expert_parallel) before running it"
            )
        x_TD = x.reshape(-1, self.d_model)
        r_TD = x_TD if router_input is None else router_input.reshape(-1, self.d_model)
        routing = self.router(r_TD, None if token_ids is None else token_ids.reshape(-1))

        # Cast before the gather, not after: under autocast the experts compute in the low
        # precision anyway, and this moves T rows instead of T*K (and halves what crosses
        # the network once dispatch is an all-to-all).
        x_in_TD = x_TD
        if torch.is_autocast_enabled(x.device.type):
            x_in_TD = x_TD.to(torch.get_autocast_dtype(x.device.type))
        combine_routing = dataclasses.replace(routing, weights_TK=routing.weights_TK.to(x.dtype))

        capacity = self.dispatcher.capacity(self.capacity_factor, x_TD.shape[0], self.cfg.top_k, x_TD.device)
        if capacity is not None and self.cfg.min_capacity:
            capacity = max(capacity, self.cfg.min_capacity)  # DeepSpeed's floor; the same on every EP rank
        if self.cfg.renormalize_after_drop:
            routing_w = renormalize_after_drop(routing, self.cfg.num_experts, capacity)
            combine_routing = dataclasses.replace(routing, weights_TK=routing_w.weights_TK.to(x.dtype))
        # Shared experts: this rank's own tokens (computed before the exchange; not overlapped with it).
        shared_TD = self.shared(x_TD) if self.shared is not None else None
        # The dispatcher runs the experts: with moe.overlap_chunks > 1 an expert-parallel one interleaves
        # the all-to-alls with the expert GEMMs (moe/dispatcher.py, parallel/overlap.py).
        experts = ExpertCompute(self._experts_fn(), tuple(self.experts.parameters()))
        combined = self.dispatcher.exchange_and_compute(
            x_in_TD, combine_routing, capacity, experts, self.cfg.overlap_chunks
        )
        # Statistics describe this rank's tokens: under EP, the rows after they came home.
        stats = compute_stats(routing, combined.home, combined.home_rows_RD) if collect_stats else None
        out_TD = combined.out_TD.to(x.dtype)
        if shared_TD is not None:
            out_TD = out_TD + shared_TD.to(x.dtype)
        return MoEOutput(out=out_TD.view(x.shape), aux_loss=routing.aux_loss, stats=stats)
