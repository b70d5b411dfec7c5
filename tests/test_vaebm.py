"""`vaebm`: Langevin and HMC in the VAE's noise space target the tilted joint, the training step, the replay-buffer
ramp, the adapted HMC step, densities, and exact continuation from extra_state."""

import copy

import pytest
import torch
from method_checks import assert_continues_exactly
from torch import nn

from ebm_scale.errors import ConfigError
from ebm_scale.methods import DataSpec, build_method
from ebm_scale.methods.backbone import backbone_state, save_backbone
from ebm_scale.methods.vaebm import VaebmConfig, VaebmSamplerConfig
from ebm_scale.nets.energy import EnergyNetConfig
from ebm_scale.nets.vae import VAE, VAEConfig
from ebm_scale.samplers import HmcStats, sample_langevin

SPEC = DataSpec(shape=(2,), bounds=(-4.0, 4.0))
W = torch.tensor([[1.5], [-0.5]], dtype=torch.float64)
B = torch.tensor([0.5, 1.0], dtype=torch.float64)
SIGMA, A = 0.5, 0.8  # decoder std, curvature of the quadratic energy E(x) = ½ a ‖x‖²


class Quadratic(nn.Module):
    def forward(self, x):
        return 0.5 * A * x.pow(2).sum(1)


def linear_vae_backbone(tmp_path) -> str:
    vae = VAE((2,), VAEConfig(arch="linear", latent_dim=1, learn_sigma_x=False, sigma_x=SIGMA))
    with torch.no_grad():
        vae.decoder.mean.weight.copy_(W.float()), vae.decoder.mean.bias.copy_(B.float())
    return save_backbone(str(tmp_path), backbone_state("vae", (2,), vae.cfg, vae))


def tilted_joint():
    """Mean and covariance of (z, x) under N(z; 0, 1) N(x; Wz + b, σ² I) exp(−½ a ‖x‖²): Gaussian, so exact."""
    precision = torch.zeros(3, 3, dtype=torch.float64)
    precision[0, 0] = 1 + (W.T @ W).item() / SIGMA**2
    precision[0, 1:] = precision[1:, 0] = -W[:, 0] / SIGMA**2
    precision[1:, 1:] = (1 / SIGMA**2 + A) * torch.eye(2, dtype=torch.float64)
    linear = torch.cat([-(W.T @ B) / SIGMA**2, B / SIGMA**2])
    cov = torch.linalg.inv(precision)
    return cov @ linear, cov


def test_hmc_in_noise_space_targets_the_tilted_joint_and_adapts_to_the_target_acceptance(tmp_path):
    # The method's own sampler (kind hmc, MALA: L = 1), started far from the adapted step size.
    torch.manual_seed(0)
    cfg = VaebmConfig(
        backbone=linear_vae_backbone(tmp_path), sampler=VaebmSamplerConfig(kind="hmc", step_size=2.0, leapfrog_steps=1)
    )
    method = build_method(cfg, SPEC, "cpu")
    method.vae.double()
    method.networks["energy"] = Quadratic()
    method.step_size = method.step_size.double()
    stats = HmcStats()
    eps = method.run_chains(torch.randn(4000, method.space.dim, dtype=torch.float64), 600, callback=stats)
    x, z = method.vae.transform(*method.space.unpack(eps))
    samples = torch.cat([z, x.detach()], 1)
    mean, cov = tilted_joint()
    assert torch.allclose(samples.mean(0), mean, atol=0.05)
    assert torch.allclose(samples.T.cov(), cov, atol=0.05)
    assert 0.55 < float(stats.mean_accept()) < 0.75 and float(stats.step_size) < 1.0


def test_langevin_in_noise_space_targets_the_same_joint_as_in_data_and_latent_space(tmp_path):
    torch.manual_seed(0)
    method = build_method(VaebmConfig(backbone=linear_vae_backbone(tmp_path)), SPEC, "cpu")
    method.vae.double()
    method.networks["energy"] = Quadratic()
    mean, cov = tilted_joint()
    chains, steps = 4000, 1500

    # ε-space, one step size for ε_z and ε_x (the method's own sampler), pushed through T.
    eps = sample_langevin(
        method.noise_energy,
        torch.randn(chains, method.space.dim, dtype=torch.float64),
        steps=steps,
        step_size=0.01,
        noise_scale=1.0,
    )
    eps_z, eps_x = method.space.unpack(eps)
    x, z = method.vae.transform(eps_z, eps_x)
    from_noise_space = torch.cat([z, x.detach()], 1)

    # (z, x)-space directly, on −log of the tilted joint.
    def joint_energy(v):
        z, x = v[:, :1], v[:, 1:]
        return 0.5 * z.pow(2).sum(1) + 0.5 * (x - z @ W.T - B).pow(2).sum(1) / SIGMA**2 + 0.5 * A * x.pow(2).sum(1)

    direct = sample_langevin(
        joint_energy, torch.randn(chains, 3, dtype=torch.float64), steps=3000, step_size=0.005, noise_scale=1.0
    )
    for samples in (from_noise_space, direct):
        assert torch.allclose(samples.mean(0), mean, atol=0.05)
        assert torch.allclose(samples.T.cov(), cov, atol=0.05)
    # And the two samplers agree with each other (not only each with the formula).
    assert torch.allclose(from_noise_space.T.cov(), direct.T.cov(), atol=0.06)


def small_config(backbone, **sampler):
    return VaebmConfig(
        backbone=backbone,
        energy=EnergyNetConfig(hidden=16, layers=3),
        sampler=VaebmSamplerConfig(step_size=0.05, steps=3, sample_steps=4, **sampler),
        iw_samples=8,
    )


def small_vae_backbone(tmp_path) -> str:
    torch.manual_seed(0)
    vae = VAE((2,), VAEConfig(hidden=16, layers=2, latent_dim=3))
    return save_backbone(str(tmp_path), backbone_state("vae", (2,), vae.cfg, vae))


@pytest.mark.parametrize("spectral_weight, energy_reg", [(0.0, 0.0), (0.2, 0.1)])
def test_train_step_reports_detached_finite_terms_and_never_touches_the_vae(tmp_path, spectral_weight, energy_reg):
    cfg = small_config(small_vae_backbone(tmp_path))
    cfg.spectral_weight, cfg.energy_reg = spectral_weight, energy_reg
    method = build_method(cfg, SPEC, "cpu")
    vae_before = copy.deepcopy(method.vae.state_dict())
    out = method.train_step(torch.randn(32, 2))
    assert ("loss/spectral" in out) == (spectral_weight > 0) and ("loss/energy_reg" in out) == (energy_reg > 0)
    for key, value in out.items():
        assert value.dim() == 0 and not value.requires_grad and torch.isfinite(value), key
    assert torch.allclose(out["loss"], out["loss/ml"] + out.get("loss/spectral", 0.0) + out.get("loss/energy_reg", 0.0))
    assert all(torch.equal(v, vae_before[k]) for k, v in method.vae.state_dict().items())
    assert set(method.optimizers["energy"].param_groups[0]["params"]) == set(method.energy.parameters())


def test_hmc_training_reports_acceptance_and_carries_its_adapted_step(tmp_path):
    method = build_method(small_config(small_vae_backbone(tmp_path), kind="hmc", leapfrog_steps=2), SPEC, "cpu")
    steps = []
    for _ in range(3):
        out = method.train_step(torch.randn(32, 2))
        assert 0 <= float(out["mcmc/accept_rate"]) <= 1
        steps.append(float(out["mcmc/step_size"]))
        assert float(method.step_size) == steps[-1]  # the next iteration starts from the adapted ε
    # 3 transitions per iteration, each multiplying ε by 1.02 or 1/1.02: it moved, by at most 1.02^9 in all.
    assert steps[-1] != 0.05 and 1.02**-9 - 1e-6 <= steps[-1] / 0.05 <= 1.02**9 + 1e-6
    assert method.sample(6).shape == (6, 2)
    assert set(method.long_chains(3, 5)) == {"eps_hmc"}


def test_unknown_sampler_kind_is_a_config_error(tmp_path):
    # Configs are checked once, when composed (the constructor no longer re-validates).
    with pytest.raises(ConfigError, match=r"method\.sampler\.kind.*'gibbs'"):
        small_config(small_vae_backbone(tmp_path), kind="gibbs").validate()


def test_samples_and_densities(tmp_path):
    method = build_method(small_config(small_vae_backbone(tmp_path)), SPEC, "cpu")
    assert method.sample(10).shape == (10, 2)
    x = torch.randn(5, 2)
    densities = method.log_density(x)
    assert set(densities) == {"vaebm", "vae"}
    # The same importance-weighted log p_vae enters both, so the tilt is exactly −E(x).
    assert torch.allclose(densities["vaebm"], densities["vae"] - method.energy(x).detach(), atol=1e-6)
    traces = method.long_chains(3, 7)
    assert set(traces) == {"eps_langevin"} and traces["eps_langevin"].shape == (3, 7, 2)


def test_replay_buffer_reuse_probability_ramps_linearly(tmp_path):
    method = build_method(
        small_config(small_vae_backbone(tmp_path), buffer=True, buffer_max_prob=0.6, buffer_ramp_iters=4), SPEC, "cpu"
    )
    seen = []
    for _ in range(6):
        method.train_step(torch.randn(16, 2))
        seen.append(1 - method.buffer.reinit_prob)
    assert seen == pytest.approx([0.15, 0.3, 0.45, 0.6, 0.6, 0.6])
    assert len(method.buffer) == 16 * 6


@pytest.mark.parametrize("kind", ["langevin", "hmc"])
def test_continues_exactly_from_its_state(tmp_path, kind):
    cfg = small_config(small_vae_backbone(tmp_path), buffer=True, buffer_ramp_iters=3, kind=kind)
    a, b = assert_continues_exactly(lambda: build_method(cfg, SPEC, "cpu"), [torch.randn(16, 2) for _ in range(4)])
