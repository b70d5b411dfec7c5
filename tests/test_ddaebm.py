"""`ddaebm`: one adversarial step, the paper's ablation switches, T-step sampling (NFE = T), the terminal
marginal check, images through the U-Net nets, and exact continuation."""

import pytest
import torch
from method_checks import assert_continues_exactly, params, with_overrides

from ebm_scale.errors import ConfigError
from ebm_scale.methods import DataSpec, build_method
from ebm_scale.methods.ddaebm import DdaebmConfig, DiffusionChainConfig
from ebm_scale.nets.diffusion_nets import DiffusionNetConfig

SPEC = DataSpec(shape=(2,), bounds=(-4.0, 4.0))


def small_config(nets: DiffusionNetConfig | None = None, **overrides) -> DdaebmConfig:
    """`nets`: one architecture for the energy, generator and encoder alike."""
    nets = nets or DiffusionNetConfig(hidden=16, layers=3, embed_dim=8)
    cfg = DdaebmConfig(
        energy=nets, generator=nets, encoder=nets, diffusion=DiffusionChainConfig(steps=3, beta_min=0.1, beta_max=20.0)
    )
    return with_overrides(cfg, overrides)


def test_step_trains_all_three_networks_and_reports_each_term():
    torch.manual_seed(0)
    method = build_method(small_config(), SPEC, "cpu")
    before = {k: params(method.networks[k]) for k in ("energy", "generator", "encoder")}
    out = method.train_step(torch.randn(32, 2))
    for key, value in out.items():
        assert value.dim() == 0 and not value.requires_grad and torch.isfinite(value), key
    assert {
        "loss/energy",
        "loss/generator",
        "loss/l1",
        "loss/l2",
        "encoder/kl",
        "gradient_penalty",
        "energy/real",
        "energy/fake",
        "energy_gap",
    } <= set(out)
    for name, old in before.items():
        assert any(not torch.equal(a, b) for a, b in zip(old, method.networks[name].parameters())), name
    assert all(p.requires_grad for p in method.networks["energy"].parameters())  # unfrozen after the G step


@pytest.mark.parametrize(
    "ablation,missing",
    [
        ({"latent_dim": 0}, {"encoder/kl"}),  # no latent z: deterministic G, no encoder at all
        ({"reverse_kl_weight": 0.0}, {"loss/l2", "encoder/kl"}),  # KL only
        ({"encoder_term": False}, set()),  # no encoder term in L1
        ({"gradient_penalty": 0.0}, {"gradient_penalty"}),
    ],
)
def test_ablations_run(ablation, missing):
    torch.manual_seed(0)
    method = build_method(small_config(**ablation), SPEC, "cpu")
    out = method.train_step(torch.randn(16, 2))
    assert not (missing & set(out)) and all(torch.isfinite(v) for v in out.values())
    if ablation.get("latent_dim") == 0:
        assert "encoder" not in method.networks


def test_gradient_penalty_at_data_scales_only_the_t1_pairs():
    """The penalty is a sum over pairs, those at t = 1 weighted by the multiplier: linear in it, for the
    same draws, with the t > 1 pairs alone left at multiplier 0."""
    penalties = []
    for at_data in (0.0, 1.0, 3.0):
        torch.manual_seed(0)
        method = build_method(small_config(gradient_penalty_at_data=at_data), SPEC, "cpu")
        penalties.append(float(method.train_step(torch.randn(64, 2))["gradient_penalty"]))
    rest, base, triple = penalties
    assert 0 < rest < base < triple
    assert triple - base == pytest.approx(2 * (base - rest), rel=1e-5)


def test_sample_with_floor_generates_from_the_floored_posterior():
    """With sample_with_floor the last (t = 1) step adds N(0, floor) around G's x_0, in training and sampling
    alike; without it that step is deterministic given z."""
    torch.manual_seed(0)
    method = build_method(small_config(posterior_var_floor=0.25, sample_with_floor=True), SPEC, "cpu")
    assert method.sample_var_floor == 0.25
    assert build_method(small_config(posterior_var_floor=0.25), SPEC, "cpu").sample_var_floor == 0.0
    generator = method.averages.network("generator")
    outputs = []
    generator.register_forward_hook(lambda module, args, out: outputs.append(out))
    x = method.sample(4000)
    residual = x - outputs[-1]  # the t = 1 step: x_0 = G(x_1, z, 1) + √floor·ε
    assert abs(float(residual.std()) - 0.5) < 0.02


def test_encoder_term_enters_the_generator_loss():
    """L1 with and without −log q_ψ(z | x̃, x_t) differ for the same draws."""
    losses = []
    for term in (True, False):
        torch.manual_seed(0)
        method = build_method(small_config(encoder_term=term, reverse_kl_weight=0.0), SPEC, "cpu")
        losses.append(method.train_step(torch.randn(16, 2))["loss/l1"])
    assert not torch.equal(*losses)


def test_sampling_takes_T_steps_of_the_ema_generator_and_the_density_uses_the_ema_energy():
    torch.manual_seed(0)
    method = build_method(small_config(), SPEC, "cpu")
    for _ in range(3):
        method.train_step(torch.randn(16, 2))
    ema, live = method.networks["generator_ema"], method.networks["generator"]
    assert any(not torch.equal(a, b) for a, b in zip(ema.parameters(), live.parameters()))
    calls = {"ema": 0, "live": 0}
    ema.register_forward_hook(lambda *_: calls.__setitem__("ema", calls["ema"] + 1))
    live.register_forward_hook(lambda *_: calls.__setitem__("live", calls["live"] + 1))
    x = method.sample(7)
    assert x.shape == (7, 2) and calls == {"ema": 3, "live": 0} and method.nfe == 3
    # the density is read off the averaged energy, which trails the live one
    t0 = torch.zeros(7, dtype=torch.long)
    assert torch.allclose(method.log_density(x)["ebm"], -method.networks["energy_ema"](x, t0))
    assert not torch.allclose(method.networks["energy_ema"](x, t0), method.networks["energy"](x, t0))


def test_terminal_start_follows_the_measured_marginal():
    """Far-out data and a narrow β range: q(x_T) is not N(0, I), so `auto` starts from the diffused data; a
    wide range reaches N(0, I) and `auto` keeps the Gaussian start."""
    far = torch.full((64, 2), 4.0) + 0.1 * torch.randn(64, 2)
    narrow = build_method(small_config(diffusion=DiffusionChainConfig(steps=3, beta_max=2.0)), SPEC, "cpu")
    out = narrow.train_step(far)
    assert narrow.start_from_data and out["terminal_kl_bound"] > 1.0
    starts = []  # x_T, the first generator input of a sampling run
    narrow.networks["generator_ema"].register_forward_pre_hook(lambda _, args: starts.append(args[0]))
    narrow.sample(2000)
    a = float(narrow.schedule.alpha_bar[-1])
    assert abs(float(starts[0].mean()) - 4.0 * a**0.5) < 0.1  # √ᾱ_T·x_0 of the data, not N(0, I)'s 0
    wide = build_method(small_config(), SPEC, "cpu")
    assert float(wide.train_step(far)["terminal_kl_bound"]) < 0.05 and not wide.start_from_data
    forced = build_method(
        small_config(diffusion=DiffusionChainConfig(steps=3, beta_max=2.0, terminal="gaussian")), SPEC, "cpu"
    )
    forced.train_step(far)
    assert not forced.start_from_data


def test_data_start_pool_is_a_uniform_reservoir_of_every_point_seen():
    """Algorithm R: after streaming 5 batches of 100 points into a pool of 50, each batch holds ~1/5 of it."""
    torch.manual_seed(0)
    method = build_method(
        small_config(diffusion=DiffusionChainConfig(steps=3, terminal="data", terminal_pool=50)), SPEC, "cpu"
    )
    counts = torch.zeros(5)
    for _ in range(400):
        method.pool, method.pool_seen = torch.empty(0, 2), 0
        for batch in range(5):  # each point's first coordinate names its batch
            method._remember(torch.full((100, 2), float(batch)))
        assert len(method.pool) == 50 and method.pool_seen == 500
        counts += torch.bincount(method.pool[:, 0].long(), minlength=5)
    share = counts / counts.sum()
    assert torch.allclose(share, torch.full((5,), 0.2), atol=0.015), share


def test_images_through_the_unet_nets():
    torch.manual_seed(0)
    cfg = small_config(
        nets=DiffusionNetConfig(arch="unet", channels=8, channel_mults=(1, 2), embed_dim=8, activation="swish")
    )
    method = build_method(cfg, DataSpec(shape=(1, 8, 8), kind="image"), "cpu")
    out = method.train_step(torch.randn(4, 1, 8, 8))
    assert all(torch.isfinite(v) for v in out.values())
    assert method.sample(2).shape == (2, 1, 8, 8)


def test_continues_exactly():
    torch.manual_seed(2)
    batches = [torch.randn(16, 2) for _ in range(4)]
    assert_continues_exactly(lambda: build_method(small_config(), SPEC, "cpu"), batches)


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="method.diffusion.beta_max"):
        small_config(diffusion=DiffusionChainConfig(beta_min=1.0, beta_max=0.5)).validate()
    with pytest.raises(ConfigError, match="method.diffusion.steps"):
        small_config(diffusion=DiffusionChainConfig(steps=1, time_schedule="drl")).validate()
    with pytest.raises(ConfigError, match="method.ema_decay"):
        small_config(ema_decay=1.0).validate()
    with pytest.raises(ConfigError, match="method.gradient_penalty_at_data"):
        small_config(gradient_penalty_at_data=-1.0).validate()
    with pytest.raises(ConfigError, match="method.energy.arch"):
        build_method(small_config(nets=DiffusionNetConfig(arch="unet")), SPEC, "cpu")
