"""Shared training pieces: the spectral regularizer and IGEBM-style elementwise gradient clipping."""

import torch
from torch import nn

from ebm_scale.methods.base import OptimConfig, _clip_to_adam_std
from ebm_scale.nets import EnergyMLP, MLPConfig
from ebm_scale.nets.spectral import SpectralPenalty


def test_spectral_penalty_converges_to_the_sum_of_largest_singular_values():
    torch.manual_seed(0)
    net = EnergyMLP(2, MLPConfig(hidden=12, layers=3))
    penalty = SpectralPenalty(net)
    for _ in range(100):  # persistent power iteration: converges across calls
        value = penalty()
    exact = sum(torch.linalg.matrix_norm(m.weight, 2) for m in net.modules() if isinstance(m, nn.Linear))
    exact = exact + net.net[-1].weight.norm()
    assert torch.allclose(value, exact, rtol=1e-4)
    value.backward()  # differentiable in the weights
    assert all(m.weight.grad is not None for m in net.modules() if isinstance(m, nn.Linear))


def test_spectral_penalty_state_round_trips():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 5), nn.Conv2d(2, 4, 3))
    a = SpectralPenalty(net)
    a()
    b = SpectralPenalty(net)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a(), b())


def test_elementwise_clipping_bounds_each_gradient_by_adams_second_moment():
    torch.manual_seed(0)
    p = nn.Parameter(torch.zeros(1000))
    opt = OptimConfig(lr=1e-3, clip_elementwise_std=3.0).build([p])
    p.grad = torch.randn(1000)
    _clip_to_adam_std(opt, 3.0)  # before Adam's first step: nothing to clip against, passes unchanged
    first = p.grad.clone()
    opt.step()
    p.grad = 100 * torch.randn(1000)  # a wild batch
    _clip_to_adam_std(opt, 3.0)
    state = opt.state[p]
    bound = 3 * (state["exp_avg_sq"] / (1 - 0.999 ** float(state["step"]))).sqrt() + 0.1
    assert (p.grad.abs() <= bound + 1e-6).all()
    assert (p.grad.abs() == bound).float().mean() > 0.5  # most elements were clipped...
    assert torch.allclose(bound, 3 * first.abs() + 0.1, rtol=1e-3)  # ...to 3 × the one gradient seen so far


def test_lr_halflife_halves_the_learning_rate_and_resumes_from_the_checkpointed_rate():
    from ebm_scale.methods import DataSpec, build_method
    from ebm_scale.methods.mle import MleConfig  # any method: the decay lives in the shared optimizer_step

    cfg = MleConfig()
    cfg.optim.lr, cfg.optim.lr_halflife = 1e-3, 4
    method = build_method(cfg, DataSpec(shape=(2,), bounds=(-4.0, 4.0)), "cpu")
    optimizer = next(iter(method.optimizers.values()))
    for _ in range(8):
        method.train_step(torch.randn(16, 2))
    assert abs(optimizer.param_groups[0]["lr"] - 1e-3 / 4) < 1e-12  # two half-lives
    restored = build_method(cfg, DataSpec(shape=(2,), bounds=(-4.0, 4.0)), "cpu")
    restored.load_state_dict(method.state_dict())
    assert next(iter(restored.optimizers.values())).param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]
