"""StableMoE's two-stage router (Dai et al. 2022, "StableMoE: Stable Routing Strategy for Mixture
of Experts", arXiv 2204.08396).

Legend: T tokens, D model dim, E experts, V vocabulary, M distilled-router dim (stable_distill_dim).
  x_TD        router input (the hidden state)     token_T      the tokens' ids (the LM's input ids)
  scores_TE   s_{t,i} = E_i . h_t, backbone, fp32  distill_TE   the distilled router's scores
  expert_T    the assignment a_t                   gate_T       sigmoid(s_{t,a_t})
  frozen_V    the stage-2 routing table: the frozen distilled router's expert for every token id

Stage 1 (training step < switch_step)
  a_t = argmax_i s_{t,i} (greedy top-1); the expert output is scaled by sigmoid(s_{t,a_t}).
  balance loss  (1/T) sum_i ((|A_i| - n) / n) sum_{t in A_i} sigmoid(s_{t,i}),  n = T / E, with
                |A_i| and n constants: it lowers the scores of overloaded experts' tokens and raises
                those of underloaded ones.
  distillation  cross-entropy of distill_TE = emb(token_t) . D_i against the (detached) a_t: a
                token-id-only router learns to imitate the backbone's routing.
Stage 2 (step >= switch_step)
  a_t comes from the distilled router, frozen; the gate still uses the backbone score
  sigmoid(s_{t,a_t}), so the centroids keep learning through it; no balance or distillation loss
  and no gradient reaches the distilled router.

Both losses are per-token means. The paper writes the balance loss as a sum over tokens; the
reference implementation divides every loss, the LM's included, by the number of tokens, and our
LM loss is a per-token mean, so the mean keeps the paper's relative weights.

The stage is a pure function of the training step, which the trainer sets with `set_step` before
every step: nothing about the stage needs saving. What does need saving is the frozen router
itself: it lives in the `frozen_V` buffer (part of the state dict, -1 until filled), computed from
the distilled router's parameters at the first stage-2 forward (and cleared by every stage-1
`set_step`, so a table from another run cannot leak in). Routing reads the table, not the
parameters, because "no gradient" does not mean "no update" under every optimiser: ZeRO stages 1
and 2 hand Adam zero gradients for unused parameters, and Adam's momentum still moves them.

Evaluation routes as the last training step did (backbone in stage 1, the frozen router in
stage 2). The reference code evaluates with the distilled router in stage 1 as well; we follow our
spec and evaluate what is being trained.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from msmoe_dist.moe.router import Routing

if TYPE_CHECKING:  # the config package imports models, which import this package
    from msmoe_dist.config.schema import MoEConfig


@dataclass(frozen=True)
class StableRouting(Routing):
    """A Routing (experts_TK is [T, 1], weights_TK the sigmoid gate) plus the distillation term.

    ``balance_loss`` is the StableMoE balance loss, ``z_loss`` is always zero, ``distill_loss`` the raw
    distillation cross-entropy; ``aux_loss`` their weighted sum. ``logits_TE``/``probs_TE`` are always
    the backbone's scores (and their softmax, for the entropy statistic), whichever router decided.
    """

    distill_loss: Tensor


def stable_balance_loss(scores_TE: Tensor, expert_T: Tensor) -> Tensor:
    """(1/T) sum_i ((|A_i| - T/E) / (T/E)) sum_{t in A_i} sigmoid(s_{t,i}); counts are constants."""
    T, E = scores_TE.shape
    if T == 0:
        return scores_TE.sum() * 0.0
    mean = T / E
    counts_E = torch.bincount(expert_T, minlength=E).to(scores_TE.dtype)
    excess_E = (counts_E - mean) / mean
    chosen_T = torch.sigmoid(scores_TE.gather(1, expert_T[:, None]).squeeze(1))
    return (excess_E[expert_T] * chosen_T).sum() / T


def stage_of(step: int, switch_step: int) -> int:
    """1 before the switch step, 2 from it on (steps are 0-based optimiser steps)."""
    return 2 if step >= switch_step else 1


class StableMoERouter(nn.Module):
    """StableMoE's two-stage router: a MoERouter (msmoe_dist.moe.router)."""

    frozen_V: Tensor  # a buffer (registered in __init__)

    def __init__(self, d_model: int, cfg: MoEConfig, vocab_size: int | None):
        super().__init__()
        if cfg.top_k != 1:
            raise ValueError(f"the StableMoE router routes top-1; got top_k={cfg.top_k}")
        if vocab_size is None or vocab_size < 1:
            raise ValueError("the StableMoE router needs vocab_size: its distilled router embeds token ids")
        self.num_experts = cfg.num_experts
        self.top_k = 1
        self.balance_coef = cfg.stable_balance_coef
        self.distill_coef = cfg.stable_distill_coef
        self.switch_step = cfg.stable_switch_step
        E, M = cfg.num_experts, cfg.stable_distill_dim
        self.centroids = nn.Parameter(torch.empty(E, d_model))
        # Raw parameters rather than nn.Embedding: the LM re-initialises every nn.Embedding with
        # model.init_std, and the distilled router keeps its own initialisation.
        self.distill_emb = nn.Parameter(torch.empty(vocab_size, M))
        self.distill_centroids = nn.Parameter(torch.empty(E, M))
        self.register_buffer("frozen_V", torch.full((vocab_size,), -1, dtype=torch.long))
        # What the host knows of frozen_V, so that stage 2 does not read the device every forward:
        # False = all -1 (we cleared it), True = filled, None = unknown (a state dict was loaded).
        self._table_filled: bool | None = False
        self.step = 0  # the current optimiser step; set by the trainer, never saved (see the module doc)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # As the reference implementation: orthogonal centroids of norm 0.1 (so the sigmoid gates
        # start near 0.5) and a unit-normal word embedding.
        nn.init.orthogonal_(self.centroids, gain=0.1)
        nn.init.orthogonal_(self.distill_centroids, gain=0.1)
        nn.init.normal_(self.distill_emb)
        self.frozen_V.fill_(-1)
        self._table_filled = False

    @property
    def stage(self) -> int:
        return stage_of(self.step, self.switch_step)

    def set_step(self, step: int) -> None:
        """Called before every training step; in stage 2 the distilled router takes no gradient."""
        self.step = int(step)
        frozen = self.stage == 2
        self.distill_emb.requires_grad_(not frozen)
        self.distill_centroids.requires_grad_(not frozen)
        if not frozen:
            # A table from another run (checkpoint.init_from) or a later step must not survive into
            # stage 1: the table is always the distilled router as it stood at this run's switch.
            self.frozen_V.fill_(-1)
            self._table_filled = False

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._table_filled = None  # the loaded table may be filled or not: look once

    def distill_scores(self, token_T: Tensor) -> Tensor:
        return F.embedding(token_T, self.distill_emb).float() @ self.distill_centroids.float().t()

    @torch.no_grad()
    def frozen_table(self) -> Tensor:
        """frozen_V, filled from the distilled router on first use (after a load it is already there)."""
        if self._table_filled is None:  # a device-to-host sync, once after a load
            self._table_filled = bool(self.frozen_V[0] >= 0)
        if not self._table_filled:
            scores_VE = self.distill_emb.float() @ self.distill_centroids.float().t()
            self.frozen_V.copy_(scores_VE.argmax(dim=-1))
            self._table_filled = True
        return self.frozen_V

    def forward(self, x_TD: Tensor, token_T: Tensor | None = None) -> StableRouting:
        stage = self.stage
        needs_tokens = stage == 2 or (self.training and self.distill_coef > 0)
        if needs_tokens and token_T is None:
            raise ValueError(
                f"the StableMoE router needs the token ids in stage {stage} "
                f"({'routing' if stage == 2 else 'distillation'}); pass token_ids"
            )
        if token_T is not None and token_T.shape != x_TD.shape[:1]:
            raise ValueError(f"token ids {tuple(token_T.shape)} do not match {x_TD.shape[0]} tokens")
        # fp32 whatever autocast says: the argmax flips on tiny score differences.
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            scores_TE = F.linear(x_TD.float(), self.centroids.float())
            if stage == 1:
                expert_T = scores_TE.detach().argmax(dim=-1)
            else:
                expert_T = self.frozen_table()[token_T]
            gate_T1 = torch.sigmoid(scores_TE.gather(1, expert_T[:, None]))
            zero = scores_TE.new_zeros(())
            balance = distill = aux = zero
            if self.training and stage == 1:
                if self.balance_coef:
                    balance = stable_balance_loss(scores_TE, expert_T)
                    aux = aux + self.balance_coef * balance
                if self.distill_coef:
                    assert token_T is not None  # needs_tokens above
                    # The target is the backbone's assignment, an integer: no gradient reaches the backbone.
                    distill = F.cross_entropy(self.distill_scores(token_T), expert_T)
                    aux = aux + self.distill_coef * distill
        return StableRouting(
            experts_TK=expert_T[:, None],
            weights_TK=gate_T1,
            logits_TE=scores_TE,
            probs_TE=torch.softmax(scores_TE.detach(), dim=-1),
            balance_loss=balance,
            z_loss=zero,
            aux_loss=aux,
            distill_loss=distill,
        )

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, distill_dim={self.distill_emb.shape[1]}, "
            f"switch_step={self.switch_step}, step={self.step}"
        )
