import copy
import math

import pytest
import torch

from ebm_scale.errors import ConfigError
from ebm_scale.nets.flow import ARCHS, COUPLINGS, ActNorm, Flow, FlowConfig, squeeze

# (arch, shape, levels): 2D toys, an odd split (1 | 2), a tiny image (squeezed to 8 channels of 2×2) and two
# multi-scale ones: 1×8×8 over 3 levels (4@4² → split → 8@2² → split → 16@1²) and 3×4×4 over 2.
CASES = [("mlp", (2,), 1), ("mlp", (3,), 1), ("conv", (2, 4, 4), 1), ("conv", (1, 8, 8), 3), ("conv", (3, 4, 4), 2)]


def perturbed_flow(shape, arch="mlp", coupling="affine", seed=0, scale=None, depth=3, hidden=16, levels=1):
    """A float64 flow moved away from its identity init: zero-initialised couplings and unit actnorms would
    make every log-determinant test trivial. Multi-scale flows stack 3·levels steps: perturbed by 0.2 they
    reach |x| ~ 1e6 and float64 round trips lose 1e-6, so they get 0.1."""
    scale = scale if scale is not None else (0.2 if levels == 1 else 0.1)
    torch.manual_seed(seed)
    cfg = FlowConfig(arch=arch, depth=depth, hidden=hidden, coupling=coupling, levels=levels)
    flow = Flow(shape, cfg).double()
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(scale * torch.randn_like(p))
    return flow.eval()


def std_normal_log_prob(z):
    return -0.5 * (z.flatten(1).square().sum(1) + z[0].numel() * math.log(2 * math.pi))


@pytest.mark.parametrize("coupling", COUPLINGS)
@pytest.mark.parametrize("arch, shape, levels", CASES)
def test_forward_and_inverse_are_inverse_with_opposite_logdets(arch, shape, levels, coupling):
    flow = perturbed_flow(shape, arch, coupling, levels=levels)
    z = torch.randn(16, *shape, dtype=torch.float64)
    x, logdet_fwd = flow.forward_with_logdet(z)
    assert x.shape == z.shape and logdet_fwd.shape == (16,)
    z_back, logdet_inv = flow.inverse(x)
    assert torch.allclose(z_back, z, atol=1e-9, rtol=0)
    assert torch.allclose(logdet_inv, -logdet_fwd, atol=1e-9, rtol=0)
    x_back = flow(flow.inverse(x)[0])
    assert torch.allclose(x_back, x, atol=1e-9, rtol=0)
    assert not torch.allclose(x, z, atol=1e-2)  # the perturbed flow is not the identity


@pytest.mark.parametrize("coupling", COUPLINGS)
@pytest.mark.parametrize("arch, shape, levels", CASES)
def test_logdet_is_the_log_abs_det_of_the_autograd_jacobian(arch, shape, levels, coupling):
    flow = perturbed_flow(shape, arch, coupling, seed=1, levels=levels)
    dim = math.prod(shape)
    g = lambda v: flow(v.view(1, *shape)).flatten()  # noqa: E731
    g_inv = lambda v: flow.inverse(v.view(1, *shape))[0].flatten()  # noqa: E731
    for z in torch.randn(3, dim, dtype=torch.float64):
        x, logdet = flow.forward_with_logdet(z.view(1, *shape))
        expected = torch.linalg.slogdet(torch.autograd.functional.jacobian(g, z, vectorize=True))[1]
        assert abs(expected) > 0.05  # not volume preserving, so the test has something to check
        assert torch.allclose(logdet[0], expected, atol=1e-9)
        jac_inv = torch.autograd.functional.jacobian(g_inv, x.flatten(), vectorize=True)
        expected_inv = torch.linalg.slogdet(jac_inv)[1]
        assert torch.allclose(flow.inverse(x)[1][0], expected_inv, atol=1e-9)


@pytest.mark.parametrize("coupling", COUPLINGS)
def test_log_prob_integrates_to_one_over_the_plane(coupling):
    flow = perturbed_flow((2,), coupling=coupling, seed=2)
    grid = torch.linspace(-8, 8, 300, dtype=torch.float64)
    x = torch.stack(torch.meshgrid(grid, grid, indexing="ij"), -1).reshape(-1, 2)
    cell = (grid[1] - grid[0]) ** 2
    with torch.no_grad():
        z, logdet = flow.inverse(x)
        mass = (flow.log_prob(x).exp().sum() * cell).item()
        mass_without_logdet = (std_normal_log_prob(z).exp().sum() * cell).item()
    assert mass == pytest.approx(1.0, abs=2e-3)
    assert abs(mass_without_logdet - 1.0) > 0.05  # the log-determinant matters for this flow


def test_untrained_flow_is_a_rotation_of_the_standard_normal():
    # Identity couplings and unit actnorms leave the random orthogonal mixings: q(x) = N(x; 0, I).
    for arch, shape, levels in CASES:
        flow = Flow(shape, FlowConfig(arch=arch, depth=3, hidden=8, levels=levels)).double().eval()
        x = torch.randn(8, *shape, dtype=torch.float64)
        assert torch.allclose(flow.log_prob(x), std_normal_log_prob(x), atol=1e-10)
        assert not torch.allclose(flow(x), x, atol=1e-3)


@pytest.mark.parametrize("arch, shape", [("mlp", (2,)), ("conv", (2, 4, 4))])
def test_actnorm_data_init_normalizes_once_and_survives_a_state_dict_round_trip(arch, shape):
    torch.manual_seed(0)
    cfg = FlowConfig(arch=arch, depth=3, hidden=8)
    flow = Flow(shape, cfg)  # training mode
    channel_dims = (0,) if arch == "mlp" else (0, 2, 3)
    spread = torch.linspace(0.2, 2.0, shape[0]).view(-1, *[1] * (len(shape) - 1))  # per-channel scales

    def data(n):
        return 3.0 + 5.0 * spread * torch.randn(n, *shape)

    x = data(512)
    flow.log_prob(x)
    # Every actnorm was initialised on what reached it: its output has mean 0, std 1 per channel.
    h = squeeze(x) if arch == "conv" else x
    actnorms = 0
    with torch.no_grad():
        for layer in flow.layers:
            h = layer.encode(h)[0]
            if isinstance(layer, ActNorm):
                actnorms += 1
                assert bool(layer.initialized)
                assert torch.allclose(h.mean(channel_dims), torch.zeros(1), atol=1e-4)
                assert torch.allclose(h.std(channel_dims, correction=0), torch.ones(1), atol=1e-4)
    assert actnorms == 3

    params = copy.deepcopy(flow.state_dict())
    flow.log_prob(10 * data(64) - 7)  # a second training batch with other statistics: no re-init
    assert all(torch.equal(params[k], v) for k, v in flow.state_dict().items())

    torch.manual_seed(1)
    restored, fresh = Flow(shape, cfg), Flow(shape, cfg)
    restored.load_state_dict(params)
    other = 10 * data(64) - 7
    restored.log_prob(other), fresh.log_prob(other)  # training mode, first batch each
    assert all(torch.equal(params[k], v) for k, v in restored.state_dict().items())
    assert torch.allclose(restored.eval().log_prob(x), flow.eval().log_prob(x))
    # Control: a module that was not restored does initialise on its first batch.
    assert not torch.equal(fresh.state_dict()["layers.0.loc"], params["layers.0.loc"])


def test_actnorm_does_not_initialise_in_eval_mode_or_in_the_generative_direction():
    flow = Flow((2,), FlowConfig(depth=2, hidden=8))
    flow(torch.randn(32, 2) * 5 + 3)  # training mode, but latent → data
    flow.eval().log_prob(torch.randn(32, 2) * 5 + 3)
    for layer in flow.layers:
        if isinstance(layer, ActNorm):
            assert not bool(layer.initialized) and torch.equal(layer.loc, torch.zeros(2))


def test_latent_gradients_agree_in_float32_and_float64_and_are_differentiable():
    # HMC in latent space differentiates f(g(z)) w.r.t. z.
    for arch, shape in [("mlp", (2,)), ("conv", (2, 4, 4))]:
        flow64 = perturbed_flow(shape, arch, seed=3)
        flow32 = copy.deepcopy(flow64).float()
        z64 = torch.randn(5, *shape, dtype=torch.float64, requires_grad=True)
        z32 = z64.detach().float().requires_grad_()
        (g64,) = torch.autograd.grad(flow64(z64).square().sum(), z64, create_graph=True)
        (g32,) = torch.autograd.grad(flow32(z32).square().sum(), z32)
        assert g32.dtype == torch.float32 and torch.isfinite(g32).all()
        assert torch.allclose(g32.double(), g64, rtol=1e-4, atol=1e-4)
        assert g64.requires_grad  # second derivatives go through the flow too
        assert flow32.sample(7).shape == (7, *shape) and flow32.sample(7).dtype == torch.float32


def mixture(n, generator):
    centers = torch.tensor([[-2.0, -2.0], [2.0, 2.0]])
    return centers[torch.randint(0, 2, (n,), generator=generator)] + 0.5 * torch.randn(n, 2, generator=generator)


def test_maximum_likelihood_fits_a_two_mode_mixture():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    flow = Flow((2,), FlowConfig(depth=3, hidden=32))
    test = mixture(2000, gen)
    flow.log_prob(mixture(256, gen))  # actnorm data init
    with torch.no_grad():
        before = flow.log_prob(test).mean().item()
    opt = torch.optim.Adam(flow.parameters(), lr=1e-2)
    for _ in range(150):
        loss = -flow.log_prob(mixture(256, gen)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    flow.eval()
    with torch.no_grad():
        after = flow.log_prob(test).mean().item()
        samples = flow.sample(4000)
    # Truth: E log p = -H(mixture) ≈ -2.13; the best single Gaussian (mixture's covariance) reaches
    # -log(2πe) - 0.5 log det Σ ≈ -3.20, so a flow that stays Gaussian-like fails the second check.
    det_cov = 4.25**2 - 4.0**2
    best_gaussian = -math.log(2 * math.pi * math.e) - 0.5 * math.log(det_cov)
    assert after > before + 0.5
    assert after > best_gaussian + 0.6
    upper = (samples.sum(1) > 0).float().mean().item()
    between = (samples.norm(dim=1) < 1).float().mean().item()  # a Gaussian fit puts ~13 % here
    assert 0.4 < upper < 0.6 and between < 0.1


@pytest.mark.parametrize(
    "field, value, allowed",
    [
        ("arch", "resnet", ARCHS),
        ("coupling", "spline", COUPLINGS),
        ("depth", 0, None),
        ("hidden", 0, None),
        ("coupling_layers", 0, None),
    ],
)
def test_validation_names_the_key(field, value, allowed):
    cfg = FlowConfig(**{field: value})
    with pytest.raises(ConfigError) as err:
        cfg.validate("method.flow")
    assert err.value.key == f"method.flow.{field}" and str(err.value).startswith(f"method.flow.{field}:")
    assert err.value.allowed == (list(allowed) if allowed else None)  # the schema lists them, in this order
    if allowed:
        assert f"(allowed: {', '.join(allowed)})" in str(err.value)


def test_shapes_the_architecture_cannot_take_are_refused():
    with pytest.raises(ConfigError, match="divisible by 2;") as err:
        Flow((3, 5, 4), FlowConfig(arch="conv"))
    assert err.value.key == "method.flow.levels"
    with pytest.raises(ConfigError, match="divisible by 2;"):
        Flow((2,), FlowConfig(arch="conv"))
    with pytest.raises(ConfigError, match="divisible by 8;"):  # 3 levels halve 16×12 three times: 12 does not fit
        Flow((1, 16, 12), FlowConfig(arch="conv", levels=3))
    with pytest.raises(ConfigError, match="at least 2"):
        Flow((1,), FlowConfig())


def test_the_composed_config_is_checked_once_at_compose_time():
    from ebm_scale.config import compose

    with pytest.raises(ConfigError) as err:  # Flow() does not re-validate: compose does, naming the full key
        compose(None, ["method=flow", "method.flow.coupling=spline"])
    assert err.value.key == "method.flow.coupling"


def test_multi_scale_levels_factor_half_the_channels_out_and_keep_the_data_shape():
    # 1×8×8 over 3 levels of 2 steps: squeeze → 4@4², split 2 off → squeeze → 8@2², split 4 off → 16@1².
    flow = Flow((1, 8, 8), FlowConfig(arch="conv", levels=3, depth=2, hidden=8))
    assert [m.loc.numel() for m in flow.modules() if isinstance(m, ActNorm)] == [4, 4, 8, 8, 16, 16]
    z, _ = flow.inverse(torch.randn(5, 1, 8, 8))
    assert z.shape == (5, 1, 8, 8) and flow.sample(3).shape == (3, 1, 8, 8)
    # One level keeps the single-scale flow's state_dict layout (backbone files written before levels existed):
    # layers.<3·step + (0 actnorm | 1 mixing | 2 coupling)>.
    keys = Flow((2, 4, 4), FlowConfig(arch="conv", depth=2, hidden=8)).state_dict().keys()
    assert {k.split(".")[1] for k in keys} == {str(i) for i in range(6)} and all(k.startswith("layers.") for k in keys)
    assert {"layers.0.loc", "layers.1.lower", "layers.2.net.0.weight", "layers.5.net.4.bias"} <= set(keys)
