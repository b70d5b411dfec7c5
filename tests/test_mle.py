import copy

import pytest
import torch

from ebm_scale.errors import ConfigError
from ebm_scale.methods import METHODS, DataSpec, OptimConfig, build_method
from ebm_scale.methods.mle import Mle, MleConfig, MleLossConfig, MleSamplerConfig
from ebm_scale.nets import EnergyNetConfig

SPEC = DataSpec(shape=(2,), bounds=(-4.0, 4.0))
METRIC_KEYS = {
    "loss",
    "loss/ml",
    "energy/pos",
    "energy/neg",
    "energy_gap",
    "chain/grad_norm_first",
    "chain/grad_norm_last",
    "grad_norm",
}


def small_config(kind="euler", steps=10, generator_weight=0.0, init="noise", **sampler):
    return MleConfig(
        energy=EnergyNetConfig(hidden=32, layers=3),
        sampler=MleSamplerConfig(kind=kind, steps=steps, init=init, **sampler),
        loss=MleLossConfig(generator_weight=generator_weight),
    )


def two_modes(n, generator=None):
    """Equal mixture of N((±2, 0), 0.2² I)."""
    sign = torch.randint(0, 2, (n,), generator=generator) * 2.0 - 1.0
    return torch.stack([2.0 * sign, torch.zeros(n)], 1) + 0.2 * torch.randn(n, 2, generator=generator)


def test_registered():
    assert METHODS["mle"] is Mle and Mle.config_class is MleConfig


@pytest.mark.parametrize("kind", ["langevin", "euler", "ode"])
@pytest.mark.parametrize("generator_weight", [0.0, 1.0])
@pytest.mark.parametrize("energy_reg", [0.0, 0.1])
def test_one_step_reports_finite_detached_scalars(kind, generator_weight, energy_reg):
    torch.manual_seed(0)
    cfg = small_config(kind, generator_weight=generator_weight)
    cfg.loss.energy_reg = energy_reg
    method = build_method(cfg, SPEC, "cpu")
    out = method.train_step(two_modes(64))
    # A weighted term is reported exactly when its weight is on.
    expected = (
        METRIC_KEYS
        | ({"loss/generator"} if generator_weight else set())
        | ({"loss/energy_reg"} if energy_reg else set())
    )
    assert set(out) == expected
    for key, value in out.items():
        assert value.dim() == 0 and not value.requires_grad and torch.isfinite(value), key
    terms = out["loss/ml"] + out.get("loss/generator", 0.0) + out.get("loss/energy_reg", 0.0)
    assert torch.allclose(out["loss"], terms, atol=1e-6)
    assert torch.allclose(out["energy_gap"], out["energy/pos"] - out["energy/neg"])
    if generator_weight:
        assert out["loss/generator"] != 0
    # Chain diagnostics: the mean ‖∇E‖ where the chain started and where it ended.
    assert out["chain/grad_norm_first"] > 0 and out["chain/grad_norm_last"] > 0


def test_paper_default_step_runs():
    """The paper's defaults (256×5 swish, noisy Langevin K=40) build and step; their speed is measured by
    benchmarks/mle_step_time.py, not asserted here (wall-clock bounds are flaky on a shared machine)."""
    torch.manual_seed(0)
    method = build_method(MleConfig(), SPEC, "cpu")
    before = [p.detach().clone() for p in method.energy.parameters()]
    out = method.train_step(two_modes(256))
    assert set(out) == METRIC_KEYS and all(torch.isfinite(v) for v in out.values())
    assert any(not torch.equal(a, b) for a, b in zip(before, method.energy.parameters(), strict=True))


def test_sample_and_log_density():
    torch.manual_seed(0)
    method = build_method(small_config("ode", horizon=0.1), SPEC, "cpu")
    x = method.sample(20)
    assert x.shape == (20, 2) and not x.requires_grad
    with torch.no_grad():  # evaluation code may call it under no_grad; both still work
        densities = method.log_density(two_modes(10))
    assert set(densities) == {"ebm", "flow"} and all(v.shape == (10,) for v in densities.values())
    assert set(build_method(small_config("euler"), SPEC, "cpu").log_density(two_modes(3))) == {"ebm"}


def euler_by_hand(energy, x0, *, steps, step_size, create_graph=False):
    """The paper's noise-free dynamics x ← x − (η/2)·∇E(x), written out (the reference for sample_euler);
    create_graph keeps the chain differentiable in the energy's parameters."""
    x = x0.detach().requires_grad_(True)
    for _ in range(steps):
        if not create_graph:
            x = x.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(energy(x).sum(), x, create_graph=create_graph)
        x = x - 0.5 * step_size * grad
    return x if create_graph else x.detach()


def test_sample_steps_override_only_changes_evaluation():
    cfg = small_config("euler", steps=10, sample_steps=3)
    method = build_method(cfg, SPEC, "cpu")
    torch.manual_seed(1)
    sampled = method.sample(8)
    torch.manual_seed(1)
    expected = euler_by_hand(method.energy, torch.randn(8, 2), steps=3, step_size=cfg.sampler.step_size)
    assert torch.equal(sampled, expected) and method.sampler.keywords["steps"] == 10


def _gradients_after_step(generator_weight):
    torch.manual_seed(0)
    method = build_method(small_config("euler", steps=5, generator_weight=generator_weight), SPEC, "cpu")
    before = copy.deepcopy(method.energy)
    torch.manual_seed(1)
    method.train_step(two_modes(128))
    # Adam has stepped, but .grad still holds this step's gradient (zeroed only at the next step).
    return method, before, {name: p.grad.clone() for name, p in method.energy.named_parameters()}


def test_generator_loss_reaches_parameters_through_the_sampler_only():
    _, before, grads_ml = _gradients_after_step(0.0)
    method, _, grads_both = _gradients_after_step(1.0)

    # 1. The term changes the gradient, and by exactly ∇θ mean E_θ̄(G_θ(x0)) with the critic θ̄ a frozen copy.
    torch.manual_seed(1)
    two_modes(128)  # replay the RNG stream: the data batch, then the chain's starting noise
    x0 = torch.randn(128, 2)
    critic = copy.deepcopy(before).requires_grad_(False)
    generated = euler_by_hand(before, x0, steps=5, step_size=method.cfg.sampler.step_size, create_graph=True)
    critic(generated).mean().backward()
    for name, p in before.named_parameters():
        independent = torch.zeros_like(p) if p.grad is None else p.grad  # None: the chain never uses it
        assert torch.allclose(grads_both[name] - grads_ml[name], independent, atol=1e-6), name
    assert any((grads_both[n] - grads_ml[n]).abs().max() > 1e-4 for n in grads_ml)

    # 2. The outer energy gets no gradient from the term. The last layer's bias b shifts E by a constant:
    # ∇x E, hence the chain, does not depend on it, and the ML term's gradient in b is 1 − 1 = 0; so b's
    # gradient is λ_gen·1 if the outer energy were differentiated, and 0 if it is stopped.
    last_bias = [name for name, _ in method.energy.named_parameters()][-1]
    assert last_bias.endswith("bias")
    assert grads_both[last_bias].abs().max() < 1e-5 and grads_ml[last_bias].abs().max() < 1e-5


def test_fast_path_builds_no_graph_through_the_chain():
    torch.manual_seed(0)
    method = build_method(small_config("euler", steps=3), SPEC, "cpu")
    captured = []
    original = method.sampler
    method.sampler = lambda *args, **kw: captured.append(kw["create_graph"]) or original(*args, **kw)
    method.train_step(two_modes(16))
    assert captured == [False]


@pytest.mark.parametrize("init", ["buffer", "noise", "data"])
def test_state_dict_round_trip_reproduces_next_step(init):
    cfg = small_config("langevin", steps=5, init=init, buffer_size=100, buffer_reinit_prob=0.3)
    torch.manual_seed(0)
    method = build_method(cfg, SPEC, "cpu")
    for _ in range(3):
        method.train_step(two_modes(64))
    state = copy.deepcopy(method.state_dict())
    batch = two_modes(64)

    torch.manual_seed(123)
    expected = method.train_step(batch)
    expected_params = [p.detach().clone() for p in method.energy.parameters()]

    torch.manual_seed(999)  # a different initialisation, overwritten by the checkpoint
    resumed = build_method(cfg, SPEC, "cpu")
    resumed.load_state_dict(state)
    if init == "buffer":
        assert len(resumed.chain_init) == 100
    torch.manual_seed(123)
    got = resumed.train_step(batch)
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
    assert all(torch.equal(a, b) for a, b in zip(resumed.energy.parameters(), expected_params, strict=True))


def test_short_training_moves_samples_onto_the_modes():
    torch.manual_seed(0)
    cfg = MleConfig(
        energy=EnergyNetConfig(hidden=64, layers=3),
        sampler=MleSamplerConfig(kind="euler", steps=20, step_size=0.1),
        optim=OptimConfig(lr=2e-3),
    )
    method = build_method(cfg, SPEC, "cpu")
    modes = torch.tensor([[-2.0, 0.0], [2.0, 0.0]])

    def distance_to_nearest_mode(x):
        return torch.cdist(x, modes).min(1).values.mean()

    initial = distance_to_nearest_mode(method.sample(2000))  # ≈ 1.5: the untrained flow barely moves N(0, I)
    for _ in range(150):
        method.train_step(two_modes(256))
    samples = method.sample(2000)
    final = distance_to_nearest_mode(samples)
    # Data themselves sit at ≈ 0.25 (0.2·sqrt(π/2)); untrained, ≈ 1.5.
    assert final < 0.45 and final < 0.4 * initial, (initial, final)
    share_right = (samples[:, 0] > 0).float().mean()
    assert 0.25 < share_right < 0.75, share_right  # both modes, not a collapse onto one


@pytest.mark.parametrize(
    "section, field, value",
    [
        ("sampler", "step_size", 0.0),
        ("sampler", "steps", 0),
        ("sampler", "noise_scale", -0.1),
        ("sampler", "horizon", 0.0),
        ("sampler", "rtol", 0.0),
        ("sampler", "kind", "hmc"),
        ("sampler", "init", "pcd"),
        ("sampler", "solver", "rk4"),
        ("sampler", "buffer_reinit_prob", 1.5),
        ("sampler", "buffer_size", 0),
        ("sampler", "sample_steps", 0),
        ("loss", "generator_weight", -1.0),
        ("loss", "energy_reg", -0.5),
        ("energy", "activation", "nope"),
        ("optim", "lr", 0.0),
    ],
)
def test_validation_names_the_full_key(section, field, value):
    cfg = MleConfig()
    setattr(getattr(cfg, section), field, value)
    with pytest.raises(ConfigError, match=f"method\\.{section}\\.{field}"):
        cfg.validate()


def test_validation_lists_allowed_values():
    with pytest.raises(ConfigError) as info:
        MleConfig(sampler=MleSamplerConfig(kind="hmc")).validate()
    assert all(name in str(info.value) for name in ("langevin", "euler", "ode"))


def test_nfe_counts_the_evaluation_chain_steps():
    from ebm_scale.data.spec import DataSpec
    from ebm_scale.methods.mle import Mle, MleConfig, MleSamplerConfig

    spec = DataSpec(shape=(2,))
    assert Mle(MleConfig(sampler=MleSamplerConfig(steps=7)), spec, "cpu").nfe == 7
    assert Mle(MleConfig(sampler=MleSamplerConfig(steps=7, sample_steps=11)), spec, "cpu").nfe == 11
    assert Mle(MleConfig(sampler=MleSamplerConfig(kind="ode")), spec, "cpu").nfe is None
