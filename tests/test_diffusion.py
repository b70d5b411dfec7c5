"""Diffusion utilities (ebm_scale/diffusion): schedules, posterior, forward process, VP SDE, and the two
generator losses — each against an independently computed closed form."""

import math

import pytest
import torch
from torch import nn

from ebm_scale.diffusion import (
    VPSDE,
    DiscreteVPSchedule,
    denoising_score_matching,
    log_variance,
    path_log_rnd,
    running_cost,
    simulate_generative,
    time_points,
    vp_sigma2,
)
from ebm_scale.errors import ConfigError


def test_time_points_equidistant_and_drl():
    assert torch.allclose(time_points(4), torch.tensor([0, 0.25, 0.5, 0.75, 1.0], dtype=torch.float64))
    drl = time_points(4, "drl")  # stride ⌊500/3⌋ = 166
    assert torch.allclose(drl, torch.tensor([0, 166 / 999, 332 / 999, 498 / 999, 1.0], dtype=torch.float64))
    assert bool((drl[1:] > drl[:-1]).all())
    with pytest.raises(ConfigError, match="time_schedule"):
        time_points(4, "cosine")


def test_schedule_matches_the_continuous_marginal_and_its_own_steps():
    sched = DiscreteVPSchedule(4, 0.1, 20.0)
    s = torch.tensor([0, 0.25, 0.5, 0.75, 1.0], dtype=torch.float64)
    # ᾱ(s) = exp(−∫₀ˢ β) = exp(−β_min·s − ½(β_max − β_min)·s²), written out (not vp_sigma2, which is under test)
    expected = torch.tensor([math.exp(-0.1 * v - 0.5 * 19.9 * v * v) for v in s.tolist()], dtype=torch.float64)
    assert torch.allclose(1 - vp_sigma2(s, 0.1, 20.0), expected, rtol=1e-12)
    assert torch.allclose(sched.alpha_bar.double(), expected, rtol=1e-6)
    # ᾱ_t is the product of (1 − β_k) over the steps: the T-step chain composes to the marginal.
    assert torch.allclose(torch.cumprod(1 - sched.betas.double(), 0), expected, rtol=1e-5)
    # and agrees with the continuous VP SDE's mean coefficient m(t)² = ᾱ
    mean, std = VPSDE(0.1, 20.0).marginal(s.float())
    assert torch.allclose(mean**2, sched.alpha_bar, rtol=1e-5)
    assert torch.allclose(std**2, 1 - sched.alpha_bar, rtol=1e-5, atol=1e-7)


def test_posterior_against_gaussian_product():
    """q(x_{t−1} | x_t, x_0) ∝ q(x_{t−1} | x_0)·q(x_t | x_{t−1}): precision-weighted product, computed here
    from ᾱ and β alone (not from the schedule's posterior tables)."""
    sched = DiscreteVPSchedule(5, 0.1, 10.0, "drl")
    torch.manual_seed(0)
    x0, x_t = torch.randn(7, 3), torch.randn(7, 3)
    for step in range(2, 6):
        t = torch.full((7,), step)
        a_prev, beta = float(sched.alpha_bar[step - 1]), float(sched.betas[step])
        precision = 1 / (1 - a_prev) + (1 - beta) / beta
        var = 1 / precision
        mean = var * (math.sqrt(a_prev) * x0 / (1 - a_prev) + math.sqrt(1 - beta) * x_t / beta)
        got_mean, got_var = sched.posterior(x0, x_t, t)
        assert torch.allclose(got_mean, mean, atol=1e-5)
        assert torch.allclose(got_var.expand_as(x0), torch.full_like(x0, var), rtol=1e-5)
    # t = 1: x_0 is known, the posterior is the point mass at x_0
    mean, var = sched.posterior(x0, x_t, torch.ones(7, dtype=torch.long))
    assert torch.allclose(mean, x0, atol=1e-6) and float(var.abs().max()) < 1e-7


def test_posterior_sample_with_a_variance_floor():
    """The floor turns the t = 1 point mass into N(x_0, floor) and leaves wider posteriors as they are."""
    sched = DiscreteVPSchedule(4, 0.1, 20.0)
    torch.manual_seed(0)
    n = 20000
    x0, x_t = torch.full((n, 2), 0.5), torch.zeros(n, 2)
    one = torch.ones(n, dtype=torch.long)
    assert torch.equal(sched.posterior_sample(x0, x_t, one), x0)
    floored = sched.posterior_sample(x0, x_t, one, var_floor=0.04)
    assert abs(float(floored.mean()) - 0.5) < 0.01 and abs(float(floored.std()) - 0.2) < 0.005
    three = torch.full((n,), 3)
    assert float(sched.posterior_var[3]) > 0.04
    noise = torch.randn(n, 2)
    floored_wide = sched.posterior_sample(x0, x_t, three, noise, 0.04)
    assert torch.equal(sched.posterior_sample(x0, x_t, three, noise), floored_wide)


def test_forward_pairs_have_the_right_joint_statistics():
    sched = DiscreteVPSchedule(4, 0.1, 10.0)
    torch.manual_seed(1)
    n = 200_000
    x0 = torch.full((n, 1), 2.0)
    t = torch.full((n,), 3)
    x_prev, x_t = sched.sample_pair(x0, t)
    a2, a3, b3 = float(sched.alpha_bar[2]), float(sched.alpha_bar[3]), float(sched.betas[3])
    assert abs(float(x_prev.mean()) - 2 * math.sqrt(a2)) < 0.01
    assert abs(float(x_t.mean()) - 2 * math.sqrt(a3)) < 0.01
    assert abs(float(x_t.var()) - (1 - a3)) < 0.01
    cov = float(((x_prev - x_prev.mean()) * (x_t - x_t.mean())).mean())
    assert abs(cov - math.sqrt(1 - b3) * (1 - a2)) < 0.01
    # log q(x_t | x_{t−1}) is the Gaussian density of the step
    lq = sched.log_q_step(x_t[:5], x_prev[:5], t[:5])
    ref = torch.distributions.Normal(math.sqrt(1 - b3) * x_prev[:5], math.sqrt(b3)).log_prob(x_t[:5]).sum(1)
    assert torch.allclose(lq, ref, atol=1e-5)


def test_terminal_marginal_check():
    """With β ∈ (0.1, 20) the 2D chain ends at ~N(0, I); with (0.1, 2) it does not, and the bound says so.
    The bound is checked against a Monte Carlo estimate of the actual KL for a point-mass x_0."""
    x0 = torch.tensor([[4.0, -4.0]]).repeat(1000, 1)
    wide, narrow = DiscreteVPSchedule(4, 0.1, 20.0), DiscreteVPSchedule(4, 0.1, 2.0)
    assert wide.terminal_kl_bound(x0) < 1e-2
    assert narrow.terminal_kl_bound(x0) > 1.0
    # for a single x_0 the bound is the exact KL(N(√ᾱ x0, 1−ᾱ) ‖ N(0, I))
    a = float(narrow.alpha_bar[-1])
    q = torch.distributions.Normal(math.sqrt(a) * x0[0], math.sqrt(1 - a))
    exact = float(torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, 1.0)).sum())
    assert abs(narrow.terminal_kl_bound(x0) - exact) < 1e-4


def test_importance_weight():
    sched = DiscreteVPSchedule(4, 0.1, 10.0)
    t = torch.tensor([1, 2, 4])
    assert torch.allclose(sched.importance_weight(t, 1.0, 1.0), torch.ones(3))
    lam = sched.importance_weight(t, 2.0, 0.5)
    assert abs(float(lam[2]) - 2.0) < 1e-6  # t'(T) = 1 → w
    assert abs(float(lam[1]) - 0.5) < 1e-6  # t'(t) = ½ → w_mid


def test_vp_sde_perturb_matches_marginal():
    sde = VPSDE(0.1, 10.0)
    torch.manual_seed(2)
    n = 100_000
    x0 = torch.full((n, 1), 3.0)
    t = torch.full((n,), 0.3)
    xt = sde.perturb(x0, t)
    # dX = −½β X dt + √β dW: m(t) = exp(−½∫₀ᵗ β) = exp(−½(β_min·t + ½(β_max − β_min)·t²)), s² = 1 − m²
    mean = math.exp(-0.5 * (0.1 * 0.3 + 0.5 * 9.9 * 0.3**2))
    std = math.sqrt(1 - mean**2)
    assert abs(float(xt.mean()) - 3 * mean) < 0.01
    assert abs(float(xt.std()) - std) < 0.01
    got_mean, got_std = sde.marginal(torch.tensor(0.3))
    assert abs(float(got_mean) - mean) < 1e-6 and abs(float(got_std) - std) < 1e-6


def _gaussian_target(m: float, s: float, sde: VPSDE):
    """Target N(m, s²) per dimension noised by the VP SDE: p_t = N(m·a(t), v(t)), v = s²a² + 1 − a², and the
    optimal control is the scaled score u*(y, t) = g(t)·(m·a − y)/v."""

    def marginal(t):
        a, _ = sde.marginal(t)
        return m * a, s**2 * a**2 + 1 - a**2

    def optimal(y, t):
        mean, var = marginal(t)
        return sde.diffusion(t)[:, None] * (mean[:, None] - y) / var[:, None]

    def log_start(y):  # the noised target at t = 1, the exact start of the time-reversed path
        mean, var = marginal(torch.ones(()))
        return torch.distributions.Normal(mean, var.sqrt()).log_prob(y).sum(1)

    def sample_start(n, dim):
        mean, var = marginal(torch.ones(()))
        return mean + var.sqrt() * torch.randn(n, dim)

    def log_target(y):  # unnormalized on purpose: the constant must not matter
        return (-0.5 * (y - m) ** 2 / s**2).sum(1) + 7.0

    return optimal, log_start, sample_start, log_target


def _lv(control, sde, log_start, sample_start, log_target, steps=200, n=2000, dim=2):
    path = simulate_generative(sde, control, sample_start(n, dim), steps=steps, keep_path=True)
    rnd = path_log_rnd(running_cost(control, path), log_start(path.xs[0]), log_target(path.xs[-1]))
    return float(log_variance(rnd)), path


def test_log_variance_vanishes_at_the_optimal_control_only():
    """At the optimal control the only variance left is Euler–Maruyama error, which falls like 1/steps
    (measured: 1.03, 0.50, 0.24, 0.11, 0.058 at 50…800 steps); away from it the variance stays put."""
    torch.manual_seed(3)
    sde = VPSDE(0.1, 10.0)
    optimal, log_start, sample_start, log_target = _gaussian_target(1.5, 0.5, sde)
    coarse, _ = _lv(optimal, sde, log_start, sample_start, log_target, steps=100)
    at_optimum, path = _lv(optimal, sde, log_start, sample_start, log_target, steps=400)
    off = [
        _lv(lambda y, t: 0.7 * optimal(y, t), sde, log_start, sample_start, log_target, steps=400)[0],
        _lv(lambda y, t: optimal(y, t) + 1.0, sde, log_start, sample_start, log_target, steps=400)[0],
    ]
    assert at_optimum < 0.2, at_optimum
    assert at_optimum < 0.35 * coarse, (coarse, at_optimum)  # → 0 as the solver refines
    assert min(off) > 10 * at_optimum, (at_optimum, off)
    # the optimally controlled SDE does generate the target
    end = path.xs[-1]
    assert abs(float(end.mean()) - 1.5) < 0.05 and abs(float(end.std()) - 0.5) < 0.05


def test_log_variance_gradient_flows_to_the_control_not_through_the_solver():
    torch.manual_seed(4)
    sde = VPSDE(0.1, 10.0)
    _, log_start, sample_start, log_target = _gaussian_target(1.0, 0.5, sde)
    net = nn.Linear(3, 2)
    control = lambda y, t: net(torch.cat([y, t[:, None]], 1))  # noqa: E731
    path = simulate_generative(sde, control, sample_start(64, 2), steps=10, keep_path=True)
    assert not path.xs.requires_grad and not path.controls.requires_grad
    loss = log_variance(path_log_rnd(running_cost(control, path), log_start(path.xs[0]), log_target(path.xs[-1])))
    loss.backward()
    assert net.weight.grad is not None and float(net.weight.grad.abs().sum()) > 0


def test_dsm_decreases_and_is_smallest_at_the_true_score():
    torch.manual_seed(5)
    sde = VPSDE(0.1, 10.0)
    data = 1.0 + 0.3 * torch.randn(4096, 2)
    optimal, *_ = _gaussian_target(1.0, 0.3, sde)

    class Affine(nn.Module):  # the Gaussian's scaled score is affine in y for each t: a tiny net can fit it
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(3, 32), nn.SiLU(), nn.Linear(32, 2))

        def forward(self, y, t):
            return self.net(torch.cat([y, t[:, None]], 1))

    control = Affine()
    opt = torch.optim.Adam(control.parameters(), lr=3e-3)
    losses = []
    for _ in range(200):
        loss = denoising_score_matching(sde, control, data[torch.randint(len(data), (128,))])
        opt.zero_grad(), loss.backward(), opt.step()
        losses.append(float(loss.detach()))
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    optimum = sum(float(denoising_score_matching(sde, optimal, data[:2048])) for _ in range(10)) / 10
    assert last < 0.7 * first, (first, last)
    assert optimum <= last + 0.02, (optimum, last)  # the true score is (up to noise) the minimizer


def test_dsm_is_the_per_dimension_squared_residual():
    """DSM = mean_n ‖s(t)·u(x_t, t)/g(t) + ε‖² / dim, checked two ways on 5-D data: exactly, on the points
    the control was called with (ε recovered from x_t = m(t)·x_0 + s(t)·ε with m, s, g in closed form), and
    against its expectation: with u = 0 the residual is ε, so DSM → E‖ε‖²/dim = 1 whatever the dimension."""
    torch.manual_seed(6)
    sde, dim, n = VPSDE(0.1, 10.0), 5, 20000
    x0 = 1.0 + torch.randn(n, dim)
    calls = []

    def control(x, t):
        calls.append((x, t))
        return 0.5 * x + 0.3

    dsm = denoising_score_matching(sde, control, x0, t_min=0.01)
    ((x_t, t),) = calls
    beta = 0.1 + 9.9 * t
    m = torch.exp(-0.5 * (0.1 * t + 0.5 * 9.9 * t**2))
    s = (1 - m**2).sqrt()
    eps = (x_t - m[:, None] * x0) / s[:, None]
    residual = s[:, None] * (0.5 * x_t + 0.3) / beta.sqrt()[:, None] + eps
    assert float(t.min()) >= 0.01 and abs(float(eps.std()) - 1) < 0.01
    assert torch.allclose(dsm, (residual**2).sum(1).mean() / dim, rtol=1e-4)

    zero = denoising_score_matching(sde, lambda x, t: torch.zeros_like(x), x0)
    assert abs(float(zero) - 1.0) < 0.02, float(zero)


def test_schedule_rejects_bad_betas():
    with pytest.raises(ConfigError, match="beta_min"):
        DiscreteVPSchedule(4, 0.0, 10.0)
    with pytest.raises(ConfigError, match="beta_min"):
        VPSDE(5.0, 1.0)
