"""The MomentumSMoE family of residual updates across the stack of MoE layers.

MomentumSMoE (arXiv 2410.14574) reads x_{t+1} = x_t + u_t, with u_t the output of the t-th MoE
layer, as one gradient step on a multi-objective problem (u = -grad f) and accelerates it:

    none        d_t = u_t
    heavy_ball  p_t = u_t + mu p_{t-1};                 d_t = gamma p_t
    adam        m_t = b1 m_{t-1} + (1-b1) u_t
                v_t = b2 v_{t-1} + (1-b2) u_t^2;         d_t = adam_gamma m_t / sqrt(v_t + eps)
                (at the first `adam_layers` MoE layers; heavy-ball after, as the reference code does.
                 No bias correction; eps inside the square root, as the reference code has it. The
                 heavy-ball buffer p is also advanced at Adam layers, again as the reference does.)
    robust      y_t = x_t + lam p_{t-1}   (look-ahead point: the router and experts see y_t)
                p_t = u(y_t) + beta p_{t-1};            d_t = alpha p_t
                with Cyrus et al. (2018)'s robust momentum coefficients for condition number kappa
                and rate rho, taking the Lipschitz constant L = 1 (the experts learn the scale):
                alpha = kappa (1-rho)^2 (1+rho),  beta = kappa rho^3 / (kappa-1),
                gamma_r = rho^3 / ((kappa-1) (1-rho)^2 (1+rho)),  lam = gamma_r * alpha.

and the block adds d_t to the residual stream (x_{t+1} = x_t + d_t in the pre-LN block).

Sign convention: the paper writes p_t = -f(x_t) + mu p_{t-1} with x_{t+1} = x_t + gamma p_t, and
the reference code keeps m = mu m + gamma core_out and subtracts it. Here u is the MoE output
itself (u = -f); the two differ only by the sign of the expert's last linear layer.

The state belongs to the tokens: `MomentumState` is created fresh for each forward pass, threaded
from MoE layer to MoE layer beside the hidden state, never stored on a module. A buffer that is
still zero is represented by None, which saves the allocation and the multiply-add by zero.

Shapes: x, u, p, m, v are all [..., D] with the hidden state's shape.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

if TYPE_CHECKING:  # the config package imports models, which import this package
    from msmoe_dist.config.schema import MomentumConfig


@dataclass(frozen=True)
class MomentumState:
    """Token-local optimiser state carried between MoE layers (None = still zero)."""

    p: Tensor | None = None  # heavy-ball / robust velocity
    m: Tensor | None = None  # AdamSMoE first moment
    v: Tensor | None = None  # AdamSMoE second moment


def robust_coefficients(rho: float, kappa: float) -> tuple[float, float, float]:
    """(alpha, beta, lam): step, momentum and look-ahead coefficients of robust momentum, L = 1."""
    alpha = kappa * (1.0 - rho) ** 2 * (1.0 + rho)
    beta = kappa * rho**3 / (kappa - 1.0)
    gamma_r = rho**3 / ((kappa - 1.0) * (1.0 - rho) ** 2 * (1.0 + rho))
    return alpha, beta, gamma_r * alpha


class MomentumUpdate(nn.Module):
    """Computes the residual increment d_t of each MoE layer from its output u_t.

    Holds only hyper-parameters (and, when `learnable` is set, mu and gamma as parameters:
    one pair for the whole stack or one per MoE layer); never the token state.
    """

    def __init__(self, cfg: MomentumConfig, num_moe_layers: int):
        super().__init__()
        self.kind = cfg.kind
        self.num_moe_layers = num_moe_layers
        self.beta1, self.beta2, self.eps = cfg.beta1, cfg.beta2, cfg.eps
        self.adam_gamma, self.adam_layers = cfg.adam_gamma, cfg.adam_layers
        # Where the robust look-ahead is added (pre_ln blocks) and whether dense blocks see it too.
        self.lookahead_at = cfg.lookahead
        self.lookahead_dense = cfg.lookahead_dense and cfg.kind == "robust"
        if cfg.kind == "robust":
            # Robust momentum is parametrised by (rho, kappa); mu/gamma are derived, not read.
            self.alpha, beta, self.lam = robust_coefficients(cfg.rho, cfg.kappa)
            mu, gamma = beta, self.alpha
        else:
            mu, gamma = cfg.mu, cfg.gamma
        self.learnable = cfg.learnable
        if cfg.learnable == "none":
            self._mu, self._gamma = float(mu), float(gamma)
        else:
            n = 1 if cfg.learnable == "scalar" else num_moe_layers
            # Raw, unconstrained parameters initialised at the configured values; excluded
            # from weight decay by the optimiser builder (names end in momentum_mu/gamma).
            self.momentum_mu = nn.Parameter(torch.full((n,), float(mu)))
            self.momentum_gamma = nn.Parameter(torch.full((n,), float(gamma)))

    def coefficients(self, layer: int) -> tuple[Tensor | float, Tensor | float]:
        """(mu, gamma) used at MoE layer `layer` (0-based among MoE layers)."""
        if self.learnable == "none":
            return self._mu, self._gamma
        i = 0 if self.learnable == "scalar" else layer
        return self.momentum_mu[i], self.momentum_gamma[i]

    def is_adam_layer(self, layer: int) -> bool:
        return self.kind == "adam" and layer < self.adam_layers

    def lookahead(self, x: Tensor, state: MomentumState) -> Tensor:
        """The point the router and experts see: y_t = x_t + lam p_{t-1} for robust, else x_t."""
        if self.kind != "robust" or state.p is None:
            return x
        return x + self.lam * state.p

    def forward(self, u: Tensor, state: MomentumState, layer: int) -> tuple[Tensor, MomentumState]:
        """Returns (d_t, new state) for MoE output u at MoE layer `layer`."""
        if self.kind == "none":
            return u, state
        mu, gamma = self.coefficients(layer)
        p = u if state.p is None else u + mu * state.p
        if self.is_adam_layer(layer):
            m = (1.0 - self.beta1) * u if state.m is None else self.beta1 * state.m + (1.0 - self.beta1) * u
            u2 = u * u
            v = (1.0 - self.beta2) * u2 if state.v is None else self.beta2 * state.v + (1.0 - self.beta2) * u2
            d = self.adam_gamma * m * torch.rsqrt(v + self.eps)
            return d, MomentumState(p=p, m=m, v=v)
        return gamma * p, MomentumState(p=p, m=state.m, v=state.v)

    def extra_repr(self) -> str:
        return f"kind={self.kind}, num_moe_layers={self.num_moe_layers}, learnable={self.learnable}"
