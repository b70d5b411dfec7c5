import math

import pytest
import torch

from ebm_scale.samplers import SAMPLERS, sample_hmc, sampler_knobs

# A strongly correlated, shifted 2D Gaussian: E(x) = ½ (x − μ)ᵀ P (x − μ), P = Σ⁻¹ (eigenvalues 5 and 1/1.8,
# so leapfrog is unstable beyond ε = 2/√5 ≈ 0.89 — an initial ε of 2.0 starts in the divergent regime).
MU = torch.tensor([1.0, -2.0], dtype=torch.float64)
SIGMA = torch.tensor([[1.0, 0.8], [0.8, 1.0]], dtype=torch.float64)
PRECISION = torch.linalg.inv(SIGMA)


def gaussian_energy(x):
    centred = x - MU.to(x.dtype)
    return 0.5 * ((centred @ PRECISION.to(x.dtype)) * centred).sum(1)


def test_registered_with_keyword_only_knobs():
    assert SAMPLERS["hmc"] is sample_hmc
    assert sampler_knobs(sample_hmc) == ("steps", "leapfrog_steps", "step_size", "target_accept", "adapt", "adapt_rate")


@pytest.mark.parametrize("initial_step_size", [0.01, 2.0])
def test_recovers_a_correlated_gaussian_and_adapts_to_the_target_acceptance(initial_step_size):
    torch.manual_seed(0)
    n, steps, burn_in = 2000, 400, 250  # from 0.01 the step size needs ≈ ln(83)/ln(1.02) ≈ 220 transitions
    accept, step_sizes = [], []

    def record(info):
        accept.append(info["accept_prob"].mean())
        step_sizes.append(info["step_size"])

    # L = 3 as in paper 002. (A fixed trajectory length εL can resonate with the target: with L = 5 the
    # adapted ε ≈ 0.85 turns the slow direction by ≈ π per transition, x ↦ ≈ −x, and the overdispersed start
    # is still visible after 400 transitions. Slow mixing, not bias — but this test needs the chain mixed.)
    x = sample_hmc(
        gaussian_energy,
        3 * torch.randn(n, 2, dtype=torch.float64),
        steps=steps,
        leapfrog_steps=3,
        step_size=initial_step_size,
        callback=record,
    )
    accept, step_sizes = torch.stack(accept), torch.stack(step_sizes)
    assert abs(accept[burn_in:].mean().item() - 0.651) < 0.05
    assert 0.1 < step_sizes[-1].item() < 0.89  # adapted into the stable range, whichever side it came from
    # MH makes the chain exact (no discretisation bias, unlike Langevin): n independent chains, ± 4 s.e.
    assert torch.allclose(x.mean(0), MU, atol=4 * math.sqrt(1 / n))
    assert torch.allclose(torch.cov(x.T), SIGMA, atol=4 * math.sqrt(2 / n))


def test_leaves_the_target_exactly_invariant():
    # Started in the target, fixed ε: any bias is the kernel's own. A wrong integrator (e.g. a full first kick,
    # not reversible) still accepts often but biases the covariance by ≈ 0.1, ~ 8 s.e. with 20000 chains.
    torch.manual_seed(0)
    n = 20000
    x0 = MU + torch.randn(n, 2, dtype=torch.float64) @ torch.linalg.cholesky(SIGMA).T
    x = sample_hmc(gaussian_energy, x0, steps=30, leapfrog_steps=3, step_size=0.5, adapt=False)
    assert torch.allclose(x.mean(0), MU, atol=4 * math.sqrt(1 / n))
    assert torch.allclose(torch.cov(x.T), SIGMA, atol=4 * math.sqrt(2 / n))


def test_adapt_false_keeps_the_step_size_and_a_tensor_step_size_carries_over():
    torch.manual_seed(0)
    seen = []
    sample_hmc(
        gaussian_energy,
        torch.randn(64, 2),
        steps=20,
        leapfrog_steps=3,
        step_size=0.05,
        adapt=False,
        callback=seen.append,
    )
    assert all(info["step_size"].item() == pytest.approx(0.05) for info in seen)
    # Adapting: acceptance ≈ 1 at ε = 0.05, so ε grows by (1 + rate) every transition...
    seen = []
    sample_hmc(
        gaussian_energy,
        torch.randn(64, 2),
        steps=10,
        leapfrog_steps=3,
        step_size=0.05,
        adapt_rate=0.1,
        callback=seen.append,
    )
    assert seen[-1]["step_size"].item() == pytest.approx(0.05 * 1.1**10, rel=1e-5)
    # ...and a persistent chain resumes from the reported 0-d tensor.
    resumed = []
    sample_hmc(
        gaussian_energy,
        torch.randn(64, 2),
        steps=1,
        leapfrog_steps=3,
        step_size=seen[-1]["step_size"],
        adapt=False,
        callback=resumed.append,
    )
    assert resumed[0]["step_size"].item() == pytest.approx(0.05 * 1.1**10, rel=1e-5)


def test_callback_keys_shapes_and_per_chain_accept_reject_under_no_grad():
    torch.manual_seed(0)
    x0 = torch.randn(32, 3, 4)  # any (n, ...) shape, float32
    energy_fn = lambda x: 0.5 * x.flatten(1).pow(2).sum(1)  # noqa: E731
    seen = []
    with torch.no_grad():
        x = sample_hmc(energy_fn, x0, steps=5, leapfrog_steps=4, step_size=0.9, callback=seen.append)
    assert len(seen) == 5 and [info["step"] for info in seen] == list(range(5))
    assert set(seen[0]) == {"step", "x", "energy", "grad", "accept_prob", "accepted", "step_size"}
    assert x.shape == x0.shape and x.dtype == torch.float32 and not x.requires_grad
    previous = x0
    for info in seen:
        assert info["x"].shape == x0.shape and info["grad"].shape == x0.shape
        assert info["energy"].shape == info["accept_prob"].shape == info["accepted"].shape == (32,)
        assert info["accepted"].dtype == torch.bool and info["step_size"].shape == ()
        assert all(not t.requires_grad for t in info.values() if isinstance(t, torch.Tensor))
        assert ((info["accept_prob"] >= 0) & (info["accept_prob"] <= 1)).all()
        # Per chain: rejected chains stay put, accepted ones moved; reported E and ∇E belong to the new state.
        stayed = (info["x"] == previous).flatten(1).all(1)
        assert torch.equal(stayed, ~info["accepted"])
        assert torch.allclose(info["energy"], energy_fn(info["x"])) and torch.allclose(info["grad"], info["x"])
        previous = info["x"]
    assert 0 < sum(int(info["accepted"].sum()) for info in seen) < 5 * 32  # both outcomes occur
    assert torch.equal(x, seen[-1]["x"])


def test_create_graph_is_refused():
    with pytest.raises(ValueError, match="not differentiable"):
        sample_hmc(gaussian_energy, torch.randn(4, 2), steps=1, leapfrog_steps=1, step_size=0.1, create_graph=True)


@pytest.mark.parametrize("forbidden", [math.inf, math.nan])
def test_non_finite_proposals_are_rejected(forbidden):
    # A standard normal with the half-plane x₁ > 0 forbidden (energy inf or NaN there): exact HMC must stay in
    # x₁ ≤ 0 and sample the half-normal there, mean −√(2/π); accepting a non-finite proposal would leak across
    # (or poison the chain with NaNs).
    def walled_energy(x):
        return torch.where(x[:, 0] > 0, forbidden, 0.5 * x.pow(2).sum(1))

    torch.manual_seed(0)
    n = 2000
    accept = []
    x0 = torch.stack([-torch.randn(n).abs(), torch.randn(n)], 1).double()
    x = sample_hmc(
        walled_energy,
        x0,
        steps=60,
        leapfrog_steps=3,
        step_size=0.5,
        adapt=False,
        callback=lambda info: accept.append(info["accept_prob"]),
    )
    assert torch.isfinite(x).all() and (x[:, 0] <= 0).all()
    assert (torch.stack(accept) == 0).any()  # the wall was hit and the proposals refused
    assert x[:, 0].mean().item() == pytest.approx(-math.sqrt(2 / math.pi), abs=4 * 0.6 / math.sqrt(n))
    assert x[:, 1].mean().item() == pytest.approx(0.0, abs=4 / math.sqrt(n))
