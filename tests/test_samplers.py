import math

import pytest
import torch

from ebm_scale.samplers import (
    CHAIN_INITS,
    SAMPLERS,
    DataInit,
    NoiseInit,
    ReplayBuffer,
    mean_grad_norm,
    ode_log_density,
    sample_euler,
    sample_langevin,
    sample_ode,
    sampler_knobs,
)

# An anisotropic, correlated Gaussian target: E(x) = ½ (x − μ)ᵀ P (x − μ), P = Σ⁻¹.
MU = torch.tensor([1.0, -2.0], dtype=torch.float64)
SIGMA = torch.tensor([[1.0, 0.5], [0.5, 2.0]], dtype=torch.float64)
PRECISION = torch.linalg.inv(SIGMA)


def gaussian_energy(x):
    centred = x - MU
    return 0.5 * ((centred @ PRECISION) * centred).sum(1)


def quadratic_energy(a):
    return lambda x: 0.5 * a * x.flatten(1).pow(2).sum(1)


def test_registry_and_knobs():
    assert set(SAMPLERS) == {"langevin", "euler", "ode", "hmc"}
    assert sampler_knobs(sample_langevin) == ("steps", "step_size", "noise_scale")
    assert sampler_knobs(sample_euler) == ("steps", "step_size")
    assert sampler_knobs(sample_ode) == ("horizon", "rtol", "atol", "solver")


def test_langevin_samples_a_gaussian_target():
    torch.manual_seed(0)
    step_size, n = 0.4, 20000
    x = sample_langevin(
        gaussian_energy, torch.randn(n, 2, dtype=torch.float64), steps=150, step_size=step_size, noise_scale=1.0
    )
    mean, cov = x.mean(0), torch.cov(x.T)
    # For a Gaussian target the discretised chain is linear, y ← A y + sqrt(η) ω with A = I − (η/2) P, so its
    # stationary law is exactly N(μ, C) with C = η (I − A²)⁻¹ = (P − η P²/4)⁻¹ = Σ (I − η P / 4)⁻¹: the mean
    # is unbiased and the covariance carries an O(η) bias, here up to η·λ_max(P)/4 ≈ 13% relative (a large
    # η on purpose, so that the bias is resolved by the sample rather than hidden in the noise).
    # 150 steps: the slowest mode contracts by (1 − η λ_min(P)/2)^150 ≈ e^{-14}, so the start is forgotten.
    discrete_cov = torch.linalg.inv(PRECISION - step_size * PRECISION @ PRECISION / 4)
    discretisation_bias = (discrete_cov - SIGMA).abs().max()  # ≈ 0.11
    # Statistical error with n independent chains: a variance v is estimated to ± v·sqrt(2/n) (≈ 0.02 here).
    statistical = 4 * math.sqrt(2 / n) * discrete_cov.diagonal().max()
    assert statistical < discretisation_bias  # the test resolves the O(η) bias
    assert torch.allclose(mean, MU, atol=4 * math.sqrt(discrete_cov.diagonal().max() / n))
    assert torch.allclose(cov, discrete_cov, atol=statistical)
    assert torch.allclose(cov, SIGMA, atol=statistical + discretisation_bias)


def test_noise_free_dynamics_converge_to_the_mode():
    torch.manual_seed(0)
    x = sample_langevin(
        gaussian_energy, 3 * torch.randn(500, 2, dtype=torch.float64), steps=800, step_size=0.1, noise_scale=0.0
    )
    assert (x - MU).abs().max() < 1e-3


def test_callback_sees_every_step_with_documented_keys():
    seen = []
    sample_langevin(
        gaussian_energy,
        torch.randn(8, 2, dtype=torch.float64),
        steps=5,
        step_size=0.1,
        noise_scale=0.5,
        callback=seen.append,
    )
    assert [info["step"] for info in seen] == list(range(5))
    for info in seen:
        assert {"step", "x", "grad", "energy"} <= set(info)
        assert info["energy"].shape == (8,) and info["grad"].shape == (8, 2)
        assert not any(info[k].requires_grad for k in ("x", "grad", "energy")) and info["x"].shape == (8, 2)
    # grad is ∇E at the point the step started from.
    x = torch.randn(8, 2, dtype=torch.float64)
    first = []
    sample_euler(gaussian_energy, x, steps=1, step_size=0.1, callback=first.append)
    assert torch.allclose(first[0]["grad"], (x - MU) @ PRECISION)
    expected = torch.linalg.vector_norm((x - MU) @ PRECISION, dim=1).mean()
    assert torch.allclose(mean_grad_norm(first[0]["grad"]), expected)

    ode_seen = []
    sample_ode(quadratic_energy(1.0), torch.randn(8, 2), horizon=0.2, callback=ode_seen.append)
    assert len(ode_seen) >= 6 and [info["step"] for info in ode_seen] == list(range(len(ode_seen)))
    assert all({"step", "t", "x", "grad", "energy"} <= set(info) and info["grad"].shape == (8, 2) for info in ode_seen)


def test_langevin_under_no_grad_and_create_graph():
    a = torch.tensor(2.0, requires_grad=True)
    energy = lambda x: 0.5 * a * x.pow(2).sum(1)  # noqa: E731
    x0 = torch.randn(16, 2)
    with torch.no_grad():  # how evaluation code calls it
        detached = sample_langevin(energy, x0, steps=3, step_size=0.1, noise_scale=0.0)
    assert not detached.requires_grad
    # Noise-free, the chain is x0·(1 − η a / 2)^K, so d/da of its sum is −K (η/2) (1 − η a/2)^(K−1) Σ x0.
    x = sample_euler(energy, x0, steps=3, step_size=0.1, create_graph=True)
    (grad_a,) = torch.autograd.grad(x.sum(), a)
    expected = -3 * 0.05 * (1 - 0.05 * 2.0) ** 2 * x0.sum()
    assert torch.allclose(x, detached) and torch.allclose(grad_a, expected, rtol=1e-5)


def test_sample_ode_endpoint_matches_closed_form():
    a, horizon = 1.5, 0.4
    x0 = torch.randn(64, 3, dtype=torch.float64)
    x = sample_ode(quadratic_energy(a), x0, horizon=horizon, rtol=1e-9, atol=1e-9)
    assert torch.allclose(x, x0 * math.exp(-a * horizon), atol=1e-7)


def test_sample_ode_create_graph_differentiates_through_the_solver():
    a = torch.tensor(1.5, dtype=torch.float64, requires_grad=True)
    x0 = torch.randn(32, 2, dtype=torch.float64)
    x = sample_ode(lambda x: 0.5 * a * x.pow(2).sum(1), x0, horizon=0.4, rtol=1e-9, atol=1e-9, create_graph=True)
    (grad_a,) = torch.autograd.grad(x.sum(), a)
    assert torch.allclose(grad_a, -0.4 * math.exp(-1.5 * 0.4) * x0.sum(), rtol=1e-5)


def gaussian_log_pdf(x, variance):
    d = x.shape[1]
    return -0.5 * x.pow(2).sum(1) / variance - 0.5 * d * math.log(2 * math.pi * variance)


@pytest.mark.parametrize("dim, exact_trace", [(2, None), (2, True), (16, None), (16, False)])
def test_ode_log_density_of_a_quadratic_energy(dim, exact_trace):
    # x' = −a x maps N(0, I) to N(0, e^{−2aT} I). dim 16 with exact_trace=None uses Hutchinson, which is exact
    # here: the Hessian is a·I and Rademacher probes have εᵢ² = 1, so εᵀ(aI)ε = a·d for every probe.
    # (The tolerance then only covers the solver.)
    torch.manual_seed(0)
    a, horizon = 1.3, 0.3
    x = torch.randn(50, dim, dtype=torch.float64)
    log_p = ode_log_density(quadratic_energy(a), x, horizon=horizon, rtol=1e-9, atol=1e-9, exact_trace=exact_trace)
    assert log_p.shape == (50,) and not log_p.requires_grad
    assert torch.allclose(log_p, gaussian_log_pdf(x, math.exp(-2 * a * horizon)), atol=1e-6)


def test_ode_log_density_anisotropic_exact_trace():
    # E = ½ xᵀ A x: x(T) = e^{−AT} x0, so x(T) ~ N(0, e^{−2AT}); the exact trace must see the full Hessian.
    torch.manual_seed(0)
    A = torch.tensor([[2.0, 0.6], [0.6, 0.5]], dtype=torch.float64)
    horizon = 0.5
    x = torch.randn(40, 2, dtype=torch.float64)
    log_p = ode_log_density(lambda y: 0.5 * ((y @ A) * y).sum(1), x, horizon=horizon, rtol=1e-9, atol=1e-9)
    cov = torch.linalg.matrix_exp(-2 * A * horizon)
    expected = -0.5 * ((x @ torch.linalg.inv(cov)) * x).sum(1) - 0.5 * torch.logdet(2 * math.pi * cov)
    assert torch.allclose(log_p, expected, atol=1e-6)


def test_ode_rejects_fixed_grid_solvers():
    with pytest.raises(ValueError, match="dopri5"):
        sample_ode(quadratic_energy(1.0), torch.randn(2, 2), horizon=0.1, solver="rk4")


# --- chain initialisation -----------------------------------------------------------------------------
def test_chain_init_registry_and_noise_and_data():
    assert set(CHAIN_INITS) == {"noise", "buffer", "data"}
    assert NoiseInit((2,)).init(5).shape == (5, 2)
    batch = torch.randn(6, 2)
    assert torch.equal(DataInit((2,)).init(6, batch), batch)
    assert DataInit((2,)).init(3, batch).shape == (3, 2)


def test_replay_buffer_reinit_prob_one_is_all_fresh_noise():
    buffer = ReplayBuffer((2,), capacity=100, reinit_prob=1.0)
    buffer.update(torch.full((100, 2), 50.0))
    assert buffer.init(200).abs().max() < 10  # nothing came from the stored 50s


def test_replay_buffer_reinit_prob_zero_reuses_stored_samples_once_filled():
    buffer = ReplayBuffer((2,), capacity=10, reinit_prob=0.0)
    assert buffer.init(4).shape == (4, 2)  # empty: noise
    stored = torch.arange(20.0).view(10, 2) + 100
    buffer.update(stored)
    x0 = buffer.init(64)
    assert all(any(torch.equal(row, s) for s in stored) for row in x0)


def test_replay_buffer_is_a_ring_and_keeps_the_newest():
    buffer = ReplayBuffer((1,), capacity=4, reinit_prob=0.0)
    buffer.update(torch.tensor([[1.0], [2.0], [3.0]]))
    buffer.update(torch.tensor([[4.0], [5.0]]))
    assert len(buffer) == 4 and sorted(buffer.storage.flatten().tolist()) == [2.0, 3.0, 4.0, 5.0]
    buffer.update(torch.arange(10.0).view(10, 1))  # more than fits
    assert sorted(buffer.storage.flatten().tolist()) == [6.0, 7.0, 8.0, 9.0]


def test_replay_buffer_state_round_trip():
    torch.manual_seed(0)
    buffer = ReplayBuffer((2,), capacity=50, reinit_prob=0.3)
    buffer.update(torch.randn(30, 2))
    restored = ReplayBuffer((2,), capacity=50, reinit_prob=0.3)
    restored.load_state_dict(buffer.state_dict())
    assert len(restored) == 30 and restored.position == buffer.position
    torch.manual_seed(1)
    expected = buffer.init(40)
    torch.manual_seed(1)
    assert torch.equal(restored.init(40), expected)
    buffer.update(expected)
    restored.update(expected)
    assert torch.equal(buffer.storage, restored.storage)
