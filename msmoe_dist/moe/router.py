"""Top-k token router with the Switch balance loss and the ST-MoE z-loss.

Legend: T tokens, D model dim, E experts, K top-k.
  x_TD       router input           logits_TE / probs_TE   gate scores, always fp32
  experts_TK chosen expert ids      weights_TK             their combine weights (fp32)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from msmoe_dist.moe.bias_balance import ExpertBias

if TYPE_CHECKING:  # the config package imports models, which import this package
    from msmoe_dist.config.schema import MoEConfig


GATES = ("topk_softmax", "softmax_topk")


@dataclass(frozen=True)
class Routing:
    """What the router decided for one batch of tokens.

    ``balance_loss`` and ``z_loss`` are the raw (unweighted) terms; a term whose coefficient
    is 0 is not computed and reads as a zero tensor.  ``aux_loss`` is their weighted sum.
    """

    experts_TK: Tensor
    weights_TK: Tensor
    logits_TE: Tensor
    probs_TE: Tensor
    balance_loss: Tensor
    z_loss: Tensor
    aux_loss: Tensor

    @property
    def num_tokens(self) -> int:
        return self.experts_TK.shape[0]

    @property
    def top_k(self) -> int:
        return self.experts_TK.shape[1]


def switch_balance_loss(probs_TE: Tensor, experts_TK: Tensor) -> Tensor:
    """E * sum_e f_e * P_e (Switch Transformer eq. 4, generalised to top-k).

    f_e (share of the T*K assignments that went to e) is a count and carries no gradient;
    the gradient reaches the router only through P_e, the mean gate probability of e.
    """
    T, E = probs_TE.shape
    counts_E = torch.bincount(experts_TK.reshape(-1), minlength=E)
    f_E = counts_E.to(probs_TE.dtype) / max(experts_TK.numel(), 1)
    P_E = probs_TE.mean(dim=0)
    return E * torch.dot(f_E, P_E)


def cv_squared(x_E: Tensor) -> Tensor:
    """Squared coefficient of variation var/mean^2 (population variance), V-MoE's balance measure."""
    return x_E.var(unbiased=False) / x_E.mean().square()


def importance_loss(clean_probs_TE: Tensor) -> Tensor:
    """V-MoE importance loss: CV^2 over experts of the summed softmax of the noise-free logits."""
    return cv_squared(clean_probs_TE.sum(dim=0))


def load_loss(clean_logits_TE: Tensor, noisy_logits_TE: Tensor, noise_std: float, top_k: int) -> Tensor:
    """V-MoE load loss (Riquelme et al. 2021, app. A.2): for each token, the threshold is its k-th
    largest noisy logit; P(expert e is selected if the noise were drawn again) is
    1 - Phi((threshold - clean_logit_e) / noise_std); the loss is CV^2 over experts of its mean over tokens.
    As in V-MoE, gradients reach the router through both the clean logits and the threshold."""
    threshold_T1 = noisy_logits_TE.topk(top_k, dim=-1).values[:, -1:]
    z_TE = (threshold_T1 - clean_logits_TE) / noise_std
    p_TE = 1.0 - torch.special.ndtr(z_TE)
    return cv_squared(p_TE.mean(dim=0))


def router_z_loss(logits_TE: Tensor) -> Tensor:
    """Mean over tokens of logsumexp(logits)^2: keeps logits small so fp32 softmax stays exact."""
    return torch.logsumexp(logits_TE, dim=-1).square().mean()


class MoERouter(Protocol):
    """What the MoE layer needs from a router: this top-k `Router` or `StableMoERouter`."""

    num_experts: int
    top_k: int

    def __call__(self, x_TD: Tensor, token_T: Tensor | None = None) -> Routing:
        """Routing of the T tokens; ``token_T``: their input ids (only routers that route by id read them)."""
        ...

    def set_step(self, step: int) -> None:
        """The 0-based optimiser step about to be taken (routers whose behaviour depends on it)."""
        ...


class Router(nn.Module):
    """The linear top-k router: a MoERouter."""

    def __init__(self, d_model: int, cfg: MoEConfig):
        super().__init__()
        if cfg.gate not in GATES:
            raise ValueError(f"unknown gate {cfg.gate!r}; expected one of {GATES}")
        if not 1 <= cfg.top_k <= cfg.num_experts:
            raise ValueError(f"top_k={cfg.top_k} must be in [1, num_experts={cfg.num_experts}]")
        self.num_experts = cfg.num_experts
        self.top_k = cfg.top_k
        self.gate = cfg.gate
        self.renormalize = cfg.renormalize
        self.noisy_gating = cfg.noisy_gating
        self.noise_std = cfg.noise_std
        self.balance_loss_coef = cfg.balance_loss_coef
        self.balance_loss = cfg.balance_loss
        self.z_loss_coef = cfg.z_loss_coef
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, d_model))
        # moe.gate_bias: the MomentumSMoE reference's gate is an nn.Linear with a bias.
        self.bias = nn.Parameter(torch.zeros(cfg.num_experts)) if getattr(cfg, "gate_bias", False) else None
        # moe.balance=bias: the selection bias (moe/bias_balance.py); absent otherwise (state dict unchanged).
        self.expert_bias = ExpertBias(cfg.num_experts, cfg.bias_update_rate) if cfg.balance == "bias" else None
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        nn.init.normal_(self.weight, mean=0.0, std=std)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def set_step(self, step: int) -> None:
        """Nothing in top-k routing depends on the step."""

    def _select(self, scores_TE: Tensor) -> tuple[Tensor, Tensor]:
        """(values, expert ids) of the top-k scores; with moe.balance=bias the ids come from scores + bias."""
        if self.expert_bias is None:
            return scores_TE.topk(self.top_k, dim=-1)
        return self.expert_bias.select(scores_TE, self.top_k)

    def forward(self, x_TD: Tensor, token_T: Tensor | None = None) -> Routing:
        """``token_T`` is accepted for the common router signature and not read."""
        # Routing decisions flip on tiny logit differences, and bf16 has 8 mantissa bits:
        # the gate always runs in fp32, whatever autocast says.
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            bias = None if self.bias is None else self.bias.float()
            clean_logits_TE = logits_TE = F.linear(x_TD.float(), self.weight.float(), bias)
            noise_std = self.noise_std / self.num_experts
            noisy = self.noisy_gating and self.training
            if noisy:
                # V-MoE scale: the noise shrinks with E so that it perturbs rankings about
                # equally however many experts compete.
                logits_TE = logits_TE + torch.randn_like(logits_TE) * noise_std
            probs_TE = torch.softmax(logits_TE, dim=-1)
            if self.gate == "topk_softmax":
                top_logits_TK, experts_TK = self._select(logits_TE)
                weights_TK = torch.softmax(top_logits_TK, dim=-1)
            else:
                weights_TK, experts_TK = self._select(probs_TE)
                if self.renormalize:
                    weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)

            zero = logits_TE.new_zeros(())
            balance = zero
            if self.balance_loss_coef and self.balance_loss == "vmoe":
                # Importance on the noise-free softmax; the load loss exists only with noise (training).
                balance = importance_loss(torch.softmax(clean_logits_TE, dim=-1) if noisy else probs_TE)
                if noisy:
                    balance = balance + load_loss(clean_logits_TE, logits_TE, noise_std, self.top_k)
            elif self.balance_loss_coef:
                balance = switch_balance_loss(probs_TE, experts_TK)
            z = router_z_loss(logits_TE) if self.z_loss_coef else zero
            aux = zero
            if self.balance_loss_coef:
                aux = aux + self.balance_loss_coef * balance
            if self.z_loss_coef:
                aux = aux + self.z_loss_coef * z
        return Routing(
            experts_TK=experts_TK,
            weights_TK=weights_TK,
            logits_TE=logits_TE,
            probs_TE=probs_TE,
            balance_loss=balance,
            z_loss=z,
            aux_loss=aux,
        )
