"""`diffebm`: the joint control/energy step, its ablations (η, α), skipping of non-finite steps, sampling
cost, Prodigy, and exact continuation."""

import copy
import math

import pytest
import torch
from method_checks import assert_continues_exactly, params, with_overrides

import ebm_scale.methods.diffebm as diffebm_module
from ebm_scale.errors import ConfigError
from ebm_scale.methods import DataSpec, build_method
from ebm_scale.methods.diffebm import DiffebmConfig, DiffebmSdeConfig
from ebm_scale.nets.diffusion_nets import DiffusionNetConfig
from ebm_scale.nets.energy import EnergyNetConfig

SPEC = DataSpec(shape=(2,), bounds=(-4.0, 4.0))


def small_config(**overrides) -> DiffebmConfig:
    cfg = DiffebmConfig(
        sde=DiffebmSdeConfig(steps=8, sample_steps=5),
        energy=EnergyNetConfig(hidden=16, layers=3, activation="silu"),
        control=DiffusionNetConfig(hidden=16, layers=3, activation="silu", embedding="fourier", embed_dim=8),
    )
    return with_overrides(cfg, overrides)


def test_step_updates_both_networks_and_reports_every_term():
    torch.manual_seed(0)
    method = build_method(small_config(), SPEC, "cpu")
    before = {k: params(net) for k, net in method.networks.items()}
    out = method.train_step(torch.randn(32, 2))
    for key, value in out.items():
        assert value.dim() == 0 and not value.requires_grad and torch.isfinite(value), key
    assert {"loss/dsm", "loss/lv_control", "loss/lv_energy", "loss/mle", "energy_gap"} <= set(out)
    assert out["loss/lv_control"] >= 0 and out["loss/lv_energy"] >= 0
    # η = α = ½: each loss is the even mix of its two terms
    assert torch.allclose(out["loss/control"], 0.5 * out["loss/dsm"] + 0.5 * out["loss/lv_control"])
    assert torch.allclose(out["loss/energy"], 0.5 * out["loss/mle"] + 0.5 * out["loss/lv_energy"])
    for name, net in method.networks.items():
        assert any(not torch.equal(a, b) for a, b in zip(before[name], net.parameters(), strict=True)), name


def test_energy_step_follows_its_formula(monkeypatch):
    """The energy's gradient is that of (1 − α)·(mean E(x) − mean E(Y_1)) + α·Var_paths[A + log N(Y_0; 0, I)
    + E(Y_1)] / dim, written out here on the step's own path: A = Σ_k ½‖u_k‖²Δs + u_k·ΔW_k from the path's
    stored controls and increments (the control re-evaluated before its step is the one that drew them), the
    prior's log-density by hand. α ≠ ½, so swapping the two terms shows too."""
    torch.manual_seed(0)
    alpha = 0.3
    method = build_method(small_config(alpha=alpha), SPEC, "cpu")
    energy_before = copy.deepcopy(method.networks["energy"])
    paths = []
    simulate = diffebm_module.simulate_generative
    record = lambda *a, **kw: paths.append(simulate(*a, **kw)) or paths[-1]
    monkeypatch.setattr(diffebm_module, "simulate_generative", record)
    x = torch.randn(32, 2) + torch.tensor([1.0, -0.5])
    out = method.train_step(x)

    (path,) = paths
    u, dw = path.controls, path.noise_increments
    running = (0.5 * u.pow(2).sum(-1) * path.dt + (u * dw).sum(-1)).sum(0)
    y0, y1 = path.xs[0], path.xs[-1]
    log_prior = -0.5 * y0.pow(2).sum(1) - math.log(2 * math.pi)  # N(0, I) in 2D
    e_data, e_model = energy_before(x), energy_before(y1)
    mle = e_data.mean() - e_model.mean()
    log_rnd = running + log_prior + e_model
    lv = (log_rnd - log_rnd.mean()).pow(2).mean() / 2
    loss = (1 - alpha) * mle + alpha * lv
    expected = torch.autograd.grad(loss, list(energy_before.parameters()))

    assert torch.allclose(out["loss/mle"], mle.detach(), atol=1e-5)
    assert torch.allclose(out["loss/lv_energy"], lv.detach(), rtol=1e-4)
    assert torch.allclose(out["loss/lv_control"], lv.detach(), rtol=1e-4)  # same path, same energies
    assert torch.allclose(out["loss/energy"], loss.detach(), rtol=1e-4)
    # Adam has stepped; .grad still holds this step's gradient.
    for (name, p), g in zip(method.networks["energy"].named_parameters(), expected, strict=True):
        assert torch.allclose(p.grad, g, rtol=1e-3, atol=1e-6), name


@pytest.mark.parametrize(
    "eta,alpha,present,absent",
    [
        (0.0, 0.0, {"loss/dsm"}, {"loss/lv_control", "loss/lv_energy"}),
        (1.0, 1.0, {"loss/lv_control", "loss/lv_energy"}, {"loss/dsm"}),
    ],
)
def test_eta_and_alpha_switch_the_terms(eta, alpha, present, absent):
    torch.manual_seed(0)
    out = build_method(small_config(eta=eta, alpha=alpha), SPEC, "cpu").train_step(torch.randn(16, 2))
    assert present <= set(out) and not (absent & set(out))
    if alpha == 0:
        assert torch.allclose(out["loss/energy"], out["loss/mle"])


def test_non_finite_step_is_skipped():
    """Paper 004 skips a step whose loss is not finite; counting skips and ending a run that keeps skipping is
    the engine's (tests/test_skips.py)."""
    torch.manual_seed(0)
    method = build_method(small_config(), SPEC, "cpu")
    with torch.no_grad():  # an energy that overflows everywhere: every loss is non-finite
        method.networks["energy"].net[-1].bias.fill_(float("inf"))
    before = {k: params(method.networks[k]) for k in ("control", "energy")}
    out = method.train_step(torch.randn(16, 2))
    assert method.skipped_steps == ["control", "energy"]
    assert not torch.isfinite(out["loss"]) and "grad_norm/energy" not in out and "grad_norm/control" not in out
    for k in ("control", "energy"):
        assert all(torch.equal(a, b) for a, b in zip(before[k], method.networks[k].parameters(), strict=True))


def test_sample_simulates_the_sde_with_sample_steps_control_calls():
    torch.manual_seed(0)
    method = build_method(small_config(), SPEC, "cpu")
    calls = []
    method.networks["control"].register_forward_hook(lambda *_: calls.append(1))
    x = method.sample(10)
    assert x.shape == (10, 2) and len(calls) == 5 == method.nfe
    assert torch.allclose(method.log_density(x)["ebm"], -method.networks["energy"](x))


def test_with_ema_sampling_uses_the_averaged_control_and_the_density_the_averaged_energy():
    torch.manual_seed(0)
    method = build_method(small_config(ema_decay=0.9), SPEC, "cpu")
    for _ in range(3):
        method.train_step(torch.randn(16, 2))
    for name in ("control", "energy"):  # the averages trail the live networks
        ema, live = method.networks[f"{name}_ema"], method.networks[name]
        assert any(not torch.equal(a, b) for a, b in zip(ema.parameters(), live.parameters(), strict=True)), name
    calls = {"ema": 0, "live": 0}
    method.networks["control_ema"].register_forward_hook(lambda *_: calls.__setitem__("ema", calls["ema"] + 1))
    method.networks["control"].register_forward_hook(lambda *_: calls.__setitem__("live", calls["live"] + 1))
    x = method.sample(10)
    assert calls == {"ema": 5, "live": 0}
    assert torch.allclose(method.log_density(x)["ebm"], -method.networks["energy_ema"](x))
    assert not torch.allclose(method.networks["energy_ema"](x), method.networks["energy"](x))


def test_prodigy_is_selectable():
    torch.manual_seed(0)
    cfg = small_config()
    cfg.optim_control.kind, cfg.optim_control.lr = "prodigy", 1.0
    method = build_method(cfg, SPEC, "cpu")
    assert type(method.optimizers["control"]).__name__ == "Prodigy"
    out = method.train_step(torch.randn(16, 2))
    assert torch.isfinite(out["loss/control"])
    with pytest.raises(ConfigError, match="clip_elementwise_std"):
        cfg.optim_control.clip_elementwise_std = 3.0
        cfg.validate()


def test_continues_exactly():
    torch.manual_seed(2)
    batches = [torch.randn(16, 2) for _ in range(4)]
    assert_continues_exactly(lambda: build_method(small_config(), SPEC, "cpu"), batches)
    assert_continues_exactly(lambda: build_method(small_config(ema_decay=0.9), SPEC, "cpu"), batches)


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="method.eta"):
        small_config(eta=1.5).validate()
    with pytest.raises(ConfigError, match="method.ema_decay"):
        small_config(ema_decay=1.0).validate()
    with pytest.raises(ConfigError, match="method.sde.beta_max"):
        small_config(sde=DiffebmSdeConfig(beta_min=1.0, beta_max=0.5)).validate()
    with pytest.raises(ConfigError, match="method.control.arch"):
        build_method(small_config(control=DiffusionNetConfig(arch="unet")), SPEC, "cpu")
