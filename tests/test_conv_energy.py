import math

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from ebm_scale.errors import ConfigError
from ebm_scale.nets.conv_energy import CONV_ENERGIES, ConvEnergyConfig, ResBlock, build_conv_energy
from ebm_scale.nets.energy import EnergyNetConfig
from ebm_scale.nets.mlp import LipSwish, ScalarHead


def _output_shapes(net: nn.Module, x: torch.Tensor, kinds: tuple[type, ...]) -> list[tuple[int, ...]]:
    """(C, H, W) of every `kinds` module's output, in execution order (forward hooks)."""
    shapes = []
    handles = [
        m.register_forward_hook(lambda m, i, out: shapes.append(tuple(out.shape[1:])))
        for m in net.modules()
        if isinstance(m, kinds)
    ]
    with torch.no_grad():
        out = net(x)
    for handle in handles:
        handle.remove()
    assert out.shape == (len(x),)
    return shapes


@pytest.mark.parametrize(
    "side, nf, growth, layout",
    [
        # Paper 000 Table 2, one column each: Swish after every conv, then flatten + FC to a scalar.
        (32, 32, "constant", [(32, 32, 32), (64, 16, 16), (64, 8, 8), (64, 4, 4)]),  # MNIST, Fashion-MNIST
        (32, 64, "doubling", [(64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4)]),  # CIFAR-10
        (64, 32, "doubling", [(32, 64, 64), (64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4)]),  # CelebA
    ],
)
def test_mle_conv_matches_paper_000_table2(side, nf, growth, layout):
    net = build_conv_energy((3, side, side), ConvEnergyConfig("mle_conv", channels=nf, growth=growth))
    assert _output_shapes(net, torch.randn(2, 3, side, side), (nn.SiLU,)) == layout
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert [(m.kernel_size[0], m.stride[0]) for m in convs] == [(3, 1)] + [(4, 2)] * (len(layout) - 1)
    heads = [m for m in net.modules() if isinstance(m, ScalarHead)]
    assert len(heads) == 1 and heads[0].in_features == layout[-1][0] * 16


@pytest.mark.parametrize(
    "side, layout",
    [
        # Paper 002 Table 4 (32×32×3) and Table 5 (64×64×3) with n_f = 32: each conv + LipSwish, then conv(1).
        (32, [(32, 32, 32), (64, 16, 16), (128, 8, 8), (128, 4, 4)]),
        (64, [(32, 64, 64), (64, 32, 32), (128, 16, 16), (256, 8, 8), (256, 4, 4)]),
    ],
)
def test_nt_ebm_matches_paper_tables(side, layout):
    net = build_conv_energy((3, side, side), ConvEnergyConfig("nt_ebm", channels=32))
    assert _output_shapes(net, torch.randn(1, 3, side, side), (LipSwish,)) == layout
    assert _output_shapes(net, torch.randn(1, 3, side, side), (nn.Conv2d,))[-1] == (1, 1, 1)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert [(m.kernel_size[0], m.stride[0]) for m in convs] == [(3, 1)] + [(4, 2)] * (len(layout) - 1) + [(4, 1)]


def test_nt_ebm_uses_lipswish_and_xavier_init():
    net = build_conv_energy((3, 32, 32), ConvEnergyConfig("nt_ebm", channels=32))
    activations = [m for m in net.modules() if not isinstance(m, (nn.Conv2d, nn.Sequential, type(net)))]
    assert len(activations) == 4 and all(type(m) is LipSwish for m in activations)
    for conv in (m for m in net.modules() if isinstance(m, nn.Conv2d)):
        fan_in, fan_out = conv.weight[0].numel(), conv.out_channels * conv.weight[0, 0].numel()
        bound = math.sqrt(6 / (fan_in + fan_out))  # Glorot & Bengio's uniform rule
        assert torch.all(conv.bias == 0)
        assert conv.weight.abs().max() <= bound and conv.weight.abs().max() > 0.9 * bound
    assert not any(parametrize.is_parametrized(m) for m in net.modules())


def test_vaebm_matches_paper_table7_cifar10():
    # Table 7, CIFAR-10 column: 3×3 conv2d 128, then [RB down 128, RB 128], [RB down 256, RB 256],
    # [RB down 256, RB 256] (down = halve the side), global sum pooling, FC → scalar.
    net = build_conv_energy((3, 32, 32), ConvEnergyConfig("vaebm_resnet", channels=128, blocks_per_stage=1))
    x = torch.randn(1, 3, 32, 32)
    assert _output_shapes(net, x, (ResBlock,)) == [
        (128, 16, 16),
        (128, 16, 16),
        (256, 8, 8),
        (256, 8, 8),
        (256, 4, 4),
        (256, 4, 4),
    ]
    assert [b.down for b in net.blocks] == [True, False] * 3
    assert net.stem.out_channels == 128 and isinstance(net.head, ScalarHead) and net.head.in_features == 256


def test_vaebm_uses_swish_and_global_sum_pooling():
    torch.manual_seed(0)
    net = build_conv_energy((3, 16, 16), ConvEnergyConfig("vaebm_resnet", channels=4))
    kinds = (nn.SiLU, LipSwish, nn.LeakyReLU, nn.ReLU, nn.Softplus, nn.ELU, nn.GELU, nn.Tanh)
    # Swish (paper 003, appendix E), not Du & Mordatch's LeakyReLU nor the reference code's LipSwish.
    assert {type(m) for m in net.modules() if isinstance(m, kinds)} == {nn.SiLU}
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():  # plain Swish, not LipSwish: the output of a block is silu(...) exactly
        block, h = net.blocks[0], net.act(net.stem(x))
        pre = nn.functional.avg_pool2d(block.conv2(nn.functional.silu(block.conv1(h))) + block.skip(h), 2)
        assert torch.allclose(block(h), nn.functional.silu(pre))
        features = net.blocks(net.act(net.stem(x)))
        assert torch.allclose(net(x), net.head(features.sum((2, 3))))  # global SUM pooling, then FC
        assert not torch.allclose(net(x), net.head(features.mean((2, 3))))


def test_vaebm_generalises_with_channel_rule_and_block_count():
    net = build_conv_energy((3, 64, 64), ConvEnergyConfig("vaebm_resnet", channels=4, blocks_per_stage=2))
    shapes = _output_shapes(net, torch.randn(1, 3, 64, 64), (ResBlock,))
    # 4 stages to a 4×4 map, widths ×1, ×2, ×4, ×4 (the last stage repeats), 1 down + 2 plain blocks each.
    assert shapes == [s for c, side in [(4, 32), (8, 16), (16, 8), (16, 4)] for s in [(c, side, side)] * 3]


@pytest.mark.parametrize("arch", sorted(CONV_ENERGIES))
@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 16, 16)])
def test_small_inputs_give_per_sample_energies(arch, shape):
    torch.manual_seed(0)
    net = build_conv_energy(shape, ConvEnergyConfig(arch, channels=4))
    x = torch.randn(5, *shape)
    energy = net(x)
    assert energy.shape == (5,) and torch.isfinite(energy).all()
    assert energy.std() > 0  # depends on the input
    # No batch statistics: a sample's energy does not depend on the rest of the batch (samplers rely on it).
    assert torch.allclose(energy[2:3], net(x[2:3]), atol=1e-6)


@pytest.mark.parametrize("arch", sorted(CONV_ENERGIES))
def test_input_gradient_and_second_derivatives(arch):
    torch.manual_seed(0)
    net = build_conv_energy((3, 16, 16), ConvEnergyConfig(arch, channels=4))
    x = torch.randn(4, 3, 16, 16, requires_grad=True)
    (grad_x,) = torch.autograd.grad(net(x).sum(), x, create_graph=True)  # what Langevin / HMC step along
    assert torch.isfinite(grad_x).all() and grad_x.abs().sum() > 0
    grad_x.pow(2).sum().backward()  # ‖∇ₓE‖² w.r.t. the parameters: a double backward
    # Every parameter (weight-norm g and v included) gets a finite, nonzero gradient, except the output
    # bias: ∇ₓE does not depend on it.
    no_grad = {name for name, p in net.named_parameters() if p.grad is None}
    assert no_grad == {"net.6.bias" if arch == "nt_ebm" else "head.bias"}
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("arch", sorted(CONV_ENERGIES))
def test_gradients_match_finite_differences(arch):
    torch.manual_seed(0)
    net = build_conv_energy((1, 8, 8), ConvEnergyConfig(arch, channels=2)).double()
    x = torch.randn(2, 1, 8, 8, dtype=torch.double, requires_grad=True)
    # fast_mode checks random projections of the Jacobian / Hessian: as able to fail, ~100x cheaper.
    assert torch.autograd.gradcheck(net, (x,), fast_mode=True)
    assert torch.autograd.gradgradcheck(net, (x,), fast_mode=True)


def test_vaebm_weight_norm_is_applied_to_every_conv():
    net = build_conv_energy((3, 16, 16), ConvEnergyConfig("vaebm_resnet", channels=4))
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 1 + 2 * 4 + 2  # stem + 2 per block (2 stages × 2 blocks) + a skip per down block
    for conv in convs:
        assert parametrize.is_parametrized(conv, "weight")
        g, v = conv.parametrizations.weight.original0, conv.parametrizations.weight.original1
        assert g.shape == (conv.out_channels, 1, 1, 1) and v.shape == conv.weight.shape
        assert torch.allclose(conv.weight, g * v / v.flatten(1).norm(dim=1).view_as(g))
    # The effective weight really is g·v/‖v‖: doubling g doubles it, rescaling v leaves it unchanged.
    conv, before = net.stem, net.stem.weight.detach().clone()
    with torch.no_grad():
        conv.parametrizations.weight.original0.mul_(2)
        conv.parametrizations.weight.original1.mul_(3)
    assert torch.allclose(conv.weight, 2 * before, atol=1e-6)


def test_vaebm_data_dependent_init_normalises_conv_outputs():
    torch.manual_seed(0)
    net = build_conv_energy((3, 16, 16), ConvEnergyConfig("vaebm_resnet", channels=4))
    x = torch.randn(64, 3, 16, 16) * 3 + 1
    net.data_init(x)
    outs = {}
    handles = [
        m.register_forward_hook(lambda m, i, o, name=name: outs.__setitem__(name, o))
        for name, m in net.named_modules()
        if isinstance(m, nn.Conv2d)
    ]
    with torch.no_grad():
        net(x)
    for handle in handles:
        handle.remove()
    assert not net.stem._forward_hooks  # data_init removed its own hooks
    for name, out in outs.items():
        assert torch.allclose(out.std((0, 2, 3)), torch.ones(out.shape[1]), atol=1e-3), name
        if not name.endswith("skip"):  # the bias-free skip convs are only rescaled
            assert out.mean((0, 2, 3)).abs().max() < 1e-4, name


@pytest.mark.parametrize("arch", sorted(CONV_ENERGIES))
@pytest.mark.parametrize("shape", [(3, 32, 16), (3, 24, 24), (3, 4, 4), (32, 32), (3, 12, 12), (0, 8, 8)])
def test_unsupported_shapes_are_rejected_readably(arch, shape):
    with pytest.raises(ConfigError, match="power of two") as info:
        build_conv_energy(shape, ConvEnergyConfig(arch), prefix="method.energy")
    assert info.value.key == "method.energy.arch"
    assert str(tuple(shape)) in str(info.value) and arch in str(info.value)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("arch", "unet", "unknown conv energy 'unet' (allowed: mle_conv, nt_ebm, vaebm_resnet)"),
        ("growth", "tripling", "unknown width growth 'tripling' (allowed: doubling, constant)"),
        ("channels", 0, "must be >= 1, got 0"),
        ("blocks_per_stage", -1, "must be >= 0, got -1"),
    ],
)
def test_config_validation_names_the_key(field, value, message):
    cfg = ConvEnergyConfig(**{field: value})
    with pytest.raises(ConfigError) as info:
        cfg.validate("method.energy")
    assert info.value.key == f"method.energy.{field}"
    assert str(info.value) == f"method.energy.{field}: {message}"
    with pytest.raises(ConfigError) as info:  # the methods' energy config checks it through its conv view
        EnergyNetConfig(**{"arch": "vaebm_resnet", field: value}).validate("method.energy")
    assert info.value.key == f"method.energy.{field}"
    ConvEnergyConfig().validate("method.energy")  # the defaults are valid
