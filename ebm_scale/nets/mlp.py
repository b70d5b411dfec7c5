"""Fully connected energy network for low-dimensional (toy 2D) data.

Paper 000 (appendix A.1) uses "a 5-layer fully connected network with 256 hidden units and swish
activation"; here `layers` counts Linear layers, so the default is 2 → 256 → 256 → 256 → 256 → 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ebm_scale.schema import Config, knob


class LipSwish(nn.Module):
    """swish(x) / 1.1: swish's Lipschitz constant is ~1.1, so this is 1-Lipschitz (Chen et al., residual
    flows). Keeping the energy's gradient Lipschitz keeps small-step gradient flows invertible."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.silu(x) / 1.1


# Factories rather than instances: every layer gets its own module (PReLU has a learnable slope).
# Samplers differentiate the energy twice (ODE density, generator loss), so prefer smooth activations:
# with relu the Hessian is zero almost everywhere and the gradient-flow density is meaningless.
ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "swish": nn.SiLU,
    "silu": nn.SiLU,
    "lipswish": LipSwish,
    "softplus": nn.Softplus,
    "elu": nn.ELU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "leaky_relu": lambda: nn.LeakyReLU(0.2),
    "prelu": nn.PReLU,
}


@dataclass
class MLPConfig(Config):
    hidden: int = knob(256, ge=1)
    # Linear layers in total, input and output included. One Linear layer is a linear energy: exp(-E) cannot
    # be normalized and its gradient is constant.
    layers: int = knob(5, ge=2, note="Linear layers in total")
    activation: str = knob("swish", choices=ACTIVATIONS, noun="activation")


class ScalarHead(nn.Module):
    """The output layer of an energy: Linear(width → 1) returning (n,) energies directly, as one addmv.

    Why not nn.Linear(width, 1) + squeeze: samplers evaluate E and ∇_x E tens of times per training
    iteration, and the squeeze's extra autograd node made a small MLP's fwd+grad measurably slower on CPU
    (docs/performance.md). Initialised like nn.Linear.
    """

    def __init__(self, width: int):
        super().__init__()
        self.in_features = width
        bound = 1.0 / math.sqrt(width)  # nn.Linear's default init for both weight and bias
        self.weight = nn.Parameter(torch.empty(width).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(()).uniform_(-bound, bound))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        # addmv has no autocast rule: under bf16 autocast h arrives bf16, so match it (a no-op in fp32).
        return torch.addmv(self.bias.to(h.dtype), h, self.weight.to(h.dtype))


class EnergyMLP(nn.Module):
    """E: R^dim → R. Takes (n, *shape) with prod(shape) == dim and returns (n,) energies."""

    def __init__(self, dim: int, cfg: MLPConfig | None = None):
        super().__init__()
        cfg = cfg or MLPConfig()
        widths = [dim] + [cfg.hidden] * (cfg.layers - 1)
        blocks: list[nn.Module] = []
        for width_in, width_out in zip(widths[:-1], widths[1:]):
            blocks += [nn.Linear(width_in, width_out), ACTIVATIONS[cfg.activation]()]
        blocks.append(ScalarHead(widths[-1]))
        self.net = nn.Sequential(*blocks)
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x if x.dim() == 2 else x.flatten(1))
