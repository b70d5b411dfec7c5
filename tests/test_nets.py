import pytest
import torch
from torch import nn

from ebm_scale.errors import ConfigError
from ebm_scale.nets import ACTIVATIONS, EnergyMLP, MLPConfig, ScalarHead


def test_energy_mlp_shape_and_layer_count():
    net = EnergyMLP(2, MLPConfig(hidden=32, layers=4))
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(2, 32), (32, 32), (32, 32)]
    assert isinstance(net.net[-1], ScalarHead) and net.net[-1].in_features == 32
    assert net(torch.randn(7, 2)).shape == (7,)


def test_scalar_head_is_a_width_to_one_linear_layer():
    torch.manual_seed(0)
    head, h = ScalarHead(16), torch.randn(5, 16, requires_grad=True)
    reference = nn.Linear(16, 1)
    with torch.no_grad():
        reference.weight.copy_(head.weight[None]), reference.bias.copy_(head.bias[None])
    assert torch.allclose(head(h), reference(h).squeeze(-1))
    # Second derivatives go through it (generator loss, exact trace of the Hessian).
    (g,) = torch.autograd.grad(torch.tanh(head(h)).sum(), h, create_graph=True)
    assert g.requires_grad
    # nn.Linear's init scale: |w|, |b| ≤ 1/sqrt(width).
    assert head.weight.abs().max() <= 0.25 and head.bias.abs() <= 0.25


def test_energy_mlp_flattens_input():
    net = EnergyMLP(12, MLPConfig(hidden=8, layers=2))
    x = torch.randn(5, 3, 2, 2)
    assert torch.equal(net(x), net(x.flatten(1)))


def test_paper_default_is_five_linear_layers_of_256_swish():
    net = EnergyMLP(2)
    linears = [m for m in net.modules() if isinstance(m, (nn.Linear, ScalarHead))]
    assert len(linears) == 5 and linears[0].out_features == 256
    assert any(isinstance(m, nn.SiLU) for m in net.modules())


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_every_activation_builds_and_its_input_gradient_is_differentiable(name):
    net = EnergyMLP(2, MLPConfig(hidden=8, layers=3, activation=name))
    x = torch.randn(4, 2, requires_grad=True)
    (grad,) = torch.autograd.grad(net(x).sum(), x, create_graph=True)
    assert grad.shape == x.shape and torch.isfinite(grad).all()


def test_lipswish_is_swish_over_1_1():
    x = torch.linspace(-5, 5, 11)
    assert torch.allclose(ACTIVATIONS["lipswish"]()(x), nn.functional.silu(x) / 1.1)


@pytest.mark.parametrize("field, value", [("activation", "sigmoidish"), ("hidden", 0), ("layers", 1)])
def test_validation_names_the_key(field, value):
    cfg = MLPConfig(**{field: value})
    with pytest.raises(ConfigError, match=f"method.net.{field}"):
        cfg.validate("method.net")


def test_unknown_activation_lists_allowed_names():
    with pytest.raises(ConfigError) as info:
        MLPConfig(activation="nope").validate("method.net")
    assert "swish" in str(info.value) and "lipswish" in str(info.value)


def test_weight_averages_follow_the_warmed_up_decay_and_copy_buffers():
    from ebm_scale.nets.ema import WeightAverages

    networks = {"norm": torch.nn.BatchNorm1d(3)}  # one parameter vector (weight) and running-stat buffers
    averages = WeightAverages(0.99, networks, ("norm",))
    live, ema = networks["norm"], networks["norm_ema"]
    assert averages.network("norm") is ema and not any(p.requires_grad for p in ema.parameters())
    expected = live.weight.detach().clone()
    for k, value in enumerate([2.0, -1.0, 5.0], start=1):
        with torch.no_grad():
            live.weight.fill_(value)
            live.running_mean.fill_(value)
        averages.step()
        averages.update("norm")
        decay = min(0.99, (1 + k) / (10 + k))  # warm-up: early updates follow the live weights closely
        expected = decay * expected + (1 - decay) * value
        assert torch.allclose(ema.weight, expected)
        assert torch.equal(ema.running_mean, live.running_mean)
    off = {"norm": torch.nn.BatchNorm1d(3)}
    disabled = WeightAverages(0.0, off, ("norm",))
    disabled.update("norm")
    assert list(off) == ["norm"] and disabled.network("norm") is off["norm"]
    with pytest.raises(ValueError, match="decay"):
        WeightAverages(1.0, {}, ())
