"""Momentum recursions against hand-derived closed forms (MomentumSMoE, arXiv 2410.14574)."""

import math

import pytest
import torch

from msmoe_dist.config.schema import MomentumConfig
from msmoe_dist.momentum import MomentumState, MomentumUpdate, robust_coefficients


@pytest.fixture(autouse=True)
def float64_default():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def spd_matrix(eigs, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(eigs), len(eigs), generator=g))
    return q @ torch.diag(torch.tensor(eigs)) @ q.T


def run_stack(mom: MomentumUpdate, A: torch.Tensor, x0: torch.Tensor, num_layers: int):
    """L MoE layers whose 'expert' is linear: u(y) = -A y, i.e. u = -grad of f(x) = x'Ax/2."""
    x, state = x0, MomentumState()
    traj = [x0]
    for layer in range(num_layers):
        y = mom.lookahead(x, state)
        d, state = mom(-(y @ A.T), state, layer)
        x = x + d
        traj.append(x)
    return traj


def heavy_ball_closed_form(A, x0, mu, gamma, num_steps):
    """Heavy-ball as the two-point recursion x_{t+1} = x_t - gamma A x_t + mu (x_t - x_{t-1}), written as
    powers of the companion matrix M = [[(1+mu)I - gamma A, -mu I], [I, 0]] with x_{-1} = x_0."""
    n = A.shape[0]
    eye = torch.eye(n)
    M = torch.cat([torch.cat([(1 + mu) * eye - gamma * A, -mu * eye], 1), torch.cat([eye, torch.zeros(n, n)], 1)], 0)
    z = torch.cat([x0, x0], -1)
    out = [x0]
    for _ in range(num_steps):
        z = z @ M.T
        out.append(z[..., :n])
    return out


@pytest.mark.parametrize("mu,gamma", [(0.7, 1.0), (0.9, 0.5), (0.0, 1.0)])
def test_heavy_ball_stack_equals_heavy_ball_iterations(mu, gamma):
    A = spd_matrix([0.1, 0.4, 0.9, 1.3])
    x0 = torch.randn(5, 4, generator=torch.Generator().manual_seed(1))
    mom = MomentumUpdate(MomentumConfig(kind="heavy_ball", mu=mu, gamma=gamma), num_moe_layers=12)
    ours = run_stack(mom, A, x0, 12)
    ref = heavy_ball_closed_form(A, x0, mu, gamma, 12)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_smoe_baseline_is_plain_gradient_descent():
    A = spd_matrix([0.2, 0.5, 0.8])
    x0 = torch.randn(3, 3, generator=torch.Generator().manual_seed(2))
    mom = MomentumUpdate(MomentumConfig(kind="none"), num_moe_layers=6)
    ours = run_stack(mom, A, x0, 6)
    expect = x0 @ torch.linalg.matrix_power(torch.eye(3) - A, 6).T
    torch.testing.assert_close(ours[-1], expect, rtol=1e-12, atol=1e-12)


def test_proposition_1_momentum_converges_where_gd_diverges():
    # Prop. 1: with gamma*sigma in (2, 2+2mu) for every eigenvalue sigma, GD diverges and heavy-ball converges.
    mu, gamma = 0.7, 1.0
    eigs = [2.2, 2.6, 3.0, 3.3]  # all in (2, 3.4)
    A = spd_matrix(eigs, seed=3)
    x0 = torch.randn(2, 4, generator=torch.Generator().manual_seed(4))
    gd = run_stack(MomentumUpdate(MomentumConfig(kind="none"), 200), gamma * A, x0, 200)
    hb = run_stack(MomentumUpdate(MomentumConfig(kind="heavy_ball", mu=mu, gamma=gamma), 200), A, x0, 200)
    assert gd[-1].norm() > 1e6 * x0.norm()
    assert hb[-1].norm() < 1e-6 * x0.norm()
    # and just outside the interval heavy-ball diverges too: the bound is tight
    A_out = spd_matrix([3.5], seed=5)
    hb_out = run_stack(
        MomentumUpdate(MomentumConfig(kind="heavy_ball", mu=mu, gamma=gamma), 200), A_out, torch.ones(1, 1), 200
    )
    assert hb_out[-1].abs().max() > 1e3


def test_adam_first_layer_then_heavy_ball_by_hand():
    b1, b2, eps, ga, mu, gamma = 0.9, 0.999, 1e-8, 1.0, 0.7, 1.0
    cfg = MomentumConfig(kind="adam", beta1=b1, beta2=b2, eps=eps, adam_gamma=ga, mu=mu, gamma=gamma, adam_layers=1)
    mom = MomentumUpdate(cfg, num_moe_layers=3)
    u0, u1, u2 = torch.tensor([2.0, -0.5]), torch.tensor([1.0, 3.0]), torch.tensor([-1.0, 0.25])
    d0, s = mom(u0, MomentumState(), 0)
    m, v = (1 - b1) * u0, (1 - b2) * u0**2  # zero init, no bias correction
    torch.testing.assert_close(d0, ga * m / torch.sqrt(v + eps))
    torch.testing.assert_close(s.p, u0)  # reference advances the heavy-ball buffer at the Adam layer too
    d1, s = mom(u1, s, 1)
    torch.testing.assert_close(d1, gamma * (u1 + mu * u0))
    d2, s = mom(u2, s, 2)
    torch.testing.assert_close(d2, gamma * (u2 + mu * (u1 + mu * u0)))
    torch.testing.assert_close(s.m, m)  # Adam moments untouched after the Adam layers


def test_adam_two_layers_continue_moments():
    cfg = MomentumConfig(kind="adam", adam_layers=2, beta1=0.5, beta2=0.75, eps=1e-6, adam_gamma=0.3)
    mom = MomentumUpdate(cfg, num_moe_layers=2)
    u0, u1 = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 0.5])
    _, s = mom(u0, MomentumState(), 0)
    d1, s = mom(u1, s, 1)
    m = 0.5 * (0.5 * u0) + 0.5 * u1
    v = 0.75 * (0.25 * u0**2) + 0.25 * u1**2
    torch.testing.assert_close(d1, 0.3 * m / torch.sqrt(v + 1e-6))


def test_robust_coefficients_by_hand():
    alpha, beta, lam = robust_coefficients(rho=0.2, kappa=1.25)
    assert math.isclose(alpha, 1.25 * 0.64 * 1.2)
    assert math.isclose(beta, 1.25 * 0.008 / 0.25)
    assert math.isclose(lam, 0.008 / (0.25 * 0.64 * 1.2) * alpha)


def test_robust_stack_equals_cyrus_iteration_and_converges():
    rho, kappa = 0.3, 2.0
    alpha, beta, lam = robust_coefficients(rho, kappa)
    gamma_r = lam / alpha
    A = spd_matrix([1 / kappa, 0.7, 1.0], seed=6)  # L = 1, strong convexity 1/kappa
    x0 = torch.randn(4, 3, generator=torch.Generator().manual_seed(7))
    mom = MomentumUpdate(MomentumConfig(kind="robust", rho=rho, kappa=kappa), num_moe_layers=40)
    ours = run_stack(mom, A, x0, 40)
    # Cyrus et al.: x_{k+1} = x_k + beta (x_k - x_{k-1}) - alpha grad f(y_k), y_k = x_k + gamma (x_k - x_{k-1})
    prev, x = x0, x0
    for k in range(40):
        y = x + gamma_r * (x - prev)
        prev, x = x, x + beta * (x - prev) - alpha * (y @ A.T)
        torch.testing.assert_close(ours[k + 1], x, rtol=1e-10, atol=1e-12)
    assert ours[-1].norm() < 1e-3 * x0.norm()


def test_robust_router_sees_lookahead_point():
    mom = MomentumUpdate(MomentumConfig(kind="robust", rho=0.2, kappa=1.25), num_moe_layers=2)
    x = torch.ones(3)
    assert torch.equal(mom.lookahead(x, MomentumState()), x)
    p = torch.tensor([1.0, 2.0, 3.0])
    torch.testing.assert_close(mom.lookahead(x, MomentumState(p=p)), x + mom.lam * p)
    heavy = MomentumUpdate(MomentumConfig(kind="heavy_ball"), num_moe_layers=2)
    assert torch.equal(heavy.lookahead(x, MomentumState(p=p)), x)


@pytest.mark.parametrize("learnable,n", [("scalar", 1), ("per_layer", 3)])
def test_learnable_coefficients_receive_gradients(learnable, n):
    mom = MomentumUpdate(MomentumConfig(kind="heavy_ball", learnable=learnable, mu=0.5, gamma=0.8), num_moe_layers=3)
    assert mom.momentum_mu.shape == (n,) and torch.allclose(mom.momentum_mu, torch.full((n,), 0.5))
    state, total = MomentumState(), 0.0
    for layer in range(3):
        d, state = mom(torch.ones(2) * (layer + 1), state, layer)
        total = total + d.sum()
    total.backward()
    assert mom.momentum_mu.grad is not None and mom.momentum_mu.grad.abs().sum() > 0
    assert mom.momentum_gamma.grad.abs().sum() > 0


def test_state_never_stored_on_module():
    mom = MomentumUpdate(MomentumConfig(kind="adam"), num_moe_layers=2)
    before = {k for k, v in vars(mom).items() if isinstance(v, torch.Tensor)}
    _, s = mom(torch.randn(4), MomentumState(), 0)
    mom(torch.randn(4), s, 1)
    after = {k for k, v in vars(mom).items() if isinstance(v, torch.Tensor)}
    assert before == after == set()
    assert len(list(mom.buffers())) == 0
