import math

import pytest
import torch
from torch import nn

from ebm_scale.diffusion.embeddings import EMBEDDINGS, FourierFeatures, SinusoidalEmbedding
from ebm_scale.errors import ConfigError
from ebm_scale.nets.diffusion_nets import (
    DiffusionNetConfig,
    build_control,
    build_encoder,
    build_generator,
    build_time_energy,
)
from ebm_scale.nets.time_mlp import TimeEnergyMLP, TimeMLP, TimeMLPConfig
from ebm_scale.nets.unet import UNet, UNetConfig

N = 3
# Tiny nets: the tests check wiring, not capacity.
MLP = dict(arch="mlp", hidden=16, layers=3, embed_dim=8)
UNET = dict(arch="unet", channels=4, channel_mults=(1, 2), embed_dim=8, activation="swish")
CASES = [((2,), MLP), ((1, 8, 8), MLP), ((1, 8, 8), UNET), ((3, 8, 8), UNET)]
IDS = ["mlp-2d", "mlp-image", "unet-1ch", "unet-3ch"]


def _times(kind: str) -> torch.Tensor:
    return torch.tensor([0, 5, 999]) if kind == "long" else torch.tensor([0.0, 0.3, 1.0])


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ---- embeddings ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(EMBEDDINGS))
def test_embedding_shapes_and_integer_times(name):
    emb = EMBEDDINGS[name](6)
    out_long, out_float = emb(torch.tensor([0, 1, 7])), emb(torch.tensor([0.0, 1.0, 7.0]))
    assert out_long.shape == (3, 6) and out_long.dtype == torch.float32
    assert torch.equal(out_long, out_float)
    with pytest.raises(ValueError):
        EMBEDDINGS[name](5)


def test_sinusoidal_at_zero_and_frequencies():
    emb = SinusoidalEmbedding(8, max_period=10000.0)
    assert torch.equal(emb(torch.zeros(2)), torch.tensor([[0.0] * 4 + [1.0] * 4] * 2))
    t = torch.tensor([3.0])
    freqs = torch.tensor([10000.0 ** (-k / 4) for k in range(4)])
    assert torch.allclose(emb(t), torch.cat([(t * freqs).sin(), (t * freqs).cos()])[None])
    assert "freqs" not in emb.state_dict()  # a function of (dim, max_period): nothing to save


def test_fourier_weight_is_a_saved_buffer_drawn_with_scale():
    emb = FourierFeatures(4000, scale=16.0)
    assert "weight" in emb.state_dict() and not list(emb.parameters())
    assert emb.weight.shape == (2000,) and abs(emb.weight.std().item() - 16.0) < 1.0
    small = FourierFeatures(4, scale=2.0)
    t = torch.tensor([0.25, -1.0])
    angles = 2 * math.pi * t[:, None] * small.weight
    assert torch.allclose(small(t), torch.cat([angles.sin(), angles.cos()], 1))
    restored = FourierFeatures(4)
    restored.load_state_dict(small.state_dict())
    assert torch.equal(restored(t), small(t))


# ---- builders: shapes, time conditioning, gradients ---------------------------------------------------------


@pytest.mark.parametrize("shape, net", CASES, ids=IDS)
@pytest.mark.parametrize("time_kind", ["long", "float"])
def test_builders_output_shapes(shape, net, time_kind):
    cfg, t, x = DiffusionNetConfig(**net), _times(time_kind), torch.randn(N, *shape)
    assert build_time_energy(shape, cfg)(x, t).shape == (N,)
    assert build_control(shape, cfg)(x, t).shape == (N, *shape)
    for z_dim in (0, 2):
        gen = build_generator(shape, z_dim, cfg)
        assert gen(x, torch.randn(N, z_dim), t).shape == (N, *shape)
        mean, log_var = build_encoder(shape, z_dim, cfg)(x, x + 0.1, t)
        assert mean.shape == log_var.shape == (N, z_dim)


@pytest.mark.parametrize("shape, net", CASES, ids=IDS)
def test_time_conditions_every_net(shape, net):
    # UNET's 4 channels make GroupNorm one channel per group: a time shift placed before a norm would vanish.
    cfg, x = DiffusionNetConfig(**net), torch.randn(N, *shape)
    t0, t1 = torch.full((N,), 2), torch.full((N,), 7)
    z = torch.randn(N, 2)
    pairs = [
        (build_time_energy(shape, cfg), lambda f, t: f(x, t)),
        (build_control(shape, cfg), lambda f, t: f(x, t)),
        (build_generator(shape, 2, cfg), lambda f, t: f(x, z, t)),
        (build_encoder(shape, 2, cfg), lambda f, t: torch.cat(f(x, x, t), 1)),
    ]
    for net_, call in pairs:
        assert not torch.allclose(call(net_, t0), call(net_, t1)), type(net_).__name__
        assert torch.equal(call(net_, torch.tensor(2)), call(net_, t0))  # a 0-d t is broadcast to the batch


@pytest.mark.parametrize("shape, net", CASES, ids=IDS)
def test_generator_depends_on_z(shape, net):
    gen, x, t = build_generator(shape, 2, DiffusionNetConfig(**net)), torch.randn(N, *shape), _times("long")
    assert not torch.allclose(gen(x, torch.zeros(N, 2), t), gen(x, torch.ones(N, 2), t))


@pytest.mark.parametrize("shape, net", CASES, ids=IDS)
def test_energy_double_backward(shape, net):
    # The gradient penalty differentiates ‖∇_x E‖² w.r.t. the parameters: create_graph must work.
    energy = build_time_energy(shape, DiffusionNetConfig(**net))
    x = torch.randn(N, *shape, requires_grad=True)
    (grad,) = torch.autograd.grad(energy(x, _times("long")).sum(), x, create_graph=True)
    assert grad.shape == x.shape and grad.abs().sum() > 0
    grad.square().sum().backward()
    first_weight = next(p for p in energy.parameters() if p.dim() >= 2)
    assert first_weight.grad is not None and first_weight.grad.abs().sum() > 0


def test_unet_energy_is_half_squared_residual():
    shape, cfg = (1, 8, 8), DiffusionNetConfig(**UNET)
    energy, x, t = build_time_energy(shape, cfg), torch.randn(N, *shape), _times("long")
    assert torch.allclose(energy(x, t), 0.5 * (x - energy.f(x, t)).square().sum((1, 2, 3)))
    assert (energy(x, t) >= 0).all()


# ---- TimeMLP / UNet directly ---------------------------------------------------------------------------------


def test_time_mlp_concatenates_inputs_and_accepts_empty_latent():
    cfg = TimeMLPConfig(hidden=8, embed_dim=4)
    net, x, t = TimeMLP(5, 2, cfg), torch.randn(N, 5), _times("long")
    parts = (x[:, :2], x[:, 2:].reshape(N, 3, 1), torch.empty(N, 0))
    assert torch.equal(net(parts, t), net(x, t))
    assert net([x], t).shape == (N, 2)


def test_time_mlp_layers_and_additive_conditioning():
    net = TimeMLP(2, 3, TimeMLPConfig(hidden=8, layers=4, embed_dim=4))
    assert [m.out_features for m in net.trunk.linears] == [8, 8, 8] and net.out.out_features == 3
    assert net.trunk.time_proj.out_features == 3 * 8  # one time shift per hidden layer
    assert len({id(a) for a in net.trunk.acts}) == 3 and all(isinstance(a, nn.PReLU) for a in net.trunk.acts)
    energy = TimeEnergyMLP(2, TimeMLPConfig(hidden=8, embed_dim=4))
    assert type(energy.trunk) is type(net.trunk)


def test_time_scale_scales_the_time():
    a = TimeMLP(2, 2, TimeMLPConfig(hidden=8, embed_dim=4))
    b = TimeMLP(2, 2, TimeMLPConfig(hidden=8, embed_dim=4, time_scale=1000.0))
    b.load_state_dict(a.state_dict())
    x = torch.randn(N, 2)
    assert torch.allclose(b(x, torch.full((N,), 0.003)), a(x, torch.full((N,), 3.0)), atol=1e-5)


def test_unet_levels_and_odd_sizes():
    net = UNet(2, 5, UNetConfig(channels=6, channel_mults=(1, 2, 2), blocks_per_level=2, embed_dim=4))
    out = net(torch.randn(2, 2, 12, 20), torch.tensor([1, 2]))  # any H, W divisible by 2^(3 − 1)
    assert out.shape == (2, 5, 12, 20)
    assert len(net.downsample) == len(net.upsample) == 2
    assert all(len(level) == 2 for level in net.down)


def test_unet_cond_is_required_when_declared():
    net = UNet(1, 1, UNetConfig(channels=4, embed_dim=4), cond_dim=3)
    with pytest.raises(ValueError):
        net(torch.randn(2, 1, 4, 4), torch.tensor([1, 2]))


# ---- config validation ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, key",
    [
        (dict(arch="transformer"), "method.net.arch"),
        (dict(layers=1), "method.net.layers"),
        (dict(activation="nope"), "method.net.activation"),
        (dict(embedding="nope"), "method.net.embedding"),
        (dict(embed_dim=7), "method.net.embed_dim"),
        (dict(time_scale=0.0), "method.net.time_scale"),
        (dict(arch="unet", channel_mults=()), "method.net.channel_mults"),
        (dict(arch="unet", blocks_per_level=0), "method.net.blocks_per_level"),
        (dict(arch="unet", channels=0), "method.net.channels"),
    ],
)
def test_config_errors_name_the_key(overrides, key):
    with pytest.raises(ConfigError) as err:  # checked once, at compose time: the builders do not re-validate
        DiffusionNetConfig(**overrides).validate("method.net")
    assert err.value.key == key


def test_unet_rejects_shapes_it_cannot_take():
    cfg = DiffusionNetConfig(arch="unet", channels=4, channel_mults=(1, 2, 2))
    with pytest.raises(ConfigError) as err:
        build_generator((2,), 1, cfg, prefix="method.generator")
    assert err.value.key == "method.generator.arch"
    with pytest.raises(ConfigError) as err:
        build_control((1, 6, 8), cfg, prefix="method.control")  # 6 is not divisible by 2^2
    assert err.value.key == "method.control.channel_mults"


def test_channel_mults_round_trips_through_omegaconf():
    from omegaconf import OmegaConf

    merged = OmegaConf.merge(OmegaConf.structured(DiffusionNetConfig), {"arch": "unet", "channel_mults": [1, 2, 2]})
    cfg = OmegaConf.to_object(merged)  # OmegaConf hands the tuple back as a list
    assert list(cfg.channel_mults) == [1, 2, 2]
    assert build_control((1, 8, 8), cfg)(torch.randn(2, 1, 8, 8), torch.tensor([0, 1])).shape == (2, 1, 8, 8)
